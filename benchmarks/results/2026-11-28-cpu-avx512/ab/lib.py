import torch, os
from torch.utils.cpp_extension import load
def get(ns):
    load(name=ns, sources=[f'/tmp/sfdev/{ns}/sf_conv.cpp'], extra_include_paths=[f'/tmp/sfdev/{ns}/inc' if os.path.isdir(f'/tmp/sfdev/{ns}/inc') else '/work/main/csrc'],
         extra_cflags=['-O3','-g0','-fopenmp','-march=native'], extra_ldflags=['-fopenmp'],
         is_python_module=False, build_directory=f'/tmp/sfdev/{ns}', verbose=False)
    import sys
    return getattr(torch.ops, ns).sf_conv_backward if 'bwd' in sys.argv else getattr(torch.ops, ns).sf_conv_forward
