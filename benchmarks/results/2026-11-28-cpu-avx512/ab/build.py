# build a copy of csrc/cpu/sf_conv.cpp under namespace NS: python build.py SRC NS
import sys, os, re
from torch.utils.cpp_extension import load
src, ns = sys.argv[1], sys.argv[2]
text = open(src).read().replace('TORCH_LIBRARY_IMPL(falconnet_C, CPU, m)', f'''TORCH_LIBRARY({ns}, m) {{
  m.def("sf_conv_forward(Tensor x, Tensor w1, Tensor w2, Tensor? bias, Tensor? residual, str activation) -> Tensor");
  m.def("sf_conv_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor? bias, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
}}
TORCH_LIBRARY_IMPL({ns}, CPU, m)''')
os.makedirs(f'/tmp/sfdev/{ns}', exist_ok=True)
open(f'/tmp/sfdev/{ns}/sf_conv.cpp', 'w').write(text)
