# build copies of dw_conv3x3.cpp + repso_moments.cpp (given repso source) as torch.ops.<ns>
import os, torch
from torch.utils.cpp_extension import load
def get(repso_src, ns):
    d = f'/tmp/dwdev/{ns}'; os.makedirs(d, exist_ok=True)
    dw = open('/work/main/csrc/cpu/dw_conv3x3.cpp').read().replace('TORCH_LIBRARY_IMPL(falconnet_C, CPU, m)', f'''TORCH_LIBRARY({ns}, m) {{
  m.def("dw_conv3x3_forward(Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> Tensor");
  m.def("dw_conv3x3_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> (Tensor, Tensor, Tensor)");
}}
TORCH_LIBRARY_IMPL({ns}, CPU, m)''').replace('namespace falconnet::cpu {', f'namespace falconnet::cpu_{ns} {{\nusing namespace falconnet::cpu;').replace('&falconnet::cpu::dw_conv3x3', f'&falconnet::cpu_{ns}::dw_conv3x3')
    rm = open(repso_src).read().replace('namespace falconnet::cpu {', f'namespace falconnet::cpu_{ns} {{\nusing namespace falconnet::cpu;')
    open(f'{d}/dw.cpp', 'w').write(dw); open(f'{d}/rm.cpp', 'w').write(rm)
    load(name=ns, sources=[f'{d}/dw.cpp', f'{d}/rm.cpp'], extra_include_paths=['/work/main/csrc', '/work/main/csrc/cpu'],
         extra_cflags=['-O3', '-g0', '-fopenmp', '-march=native', '-std=c++20', f'-DFALCONNET_OPS_NAMESPACE={ns}'], extra_ldflags=['-fopenmp'],
         is_python_module=False, build_directory=d, verbose=False)
    return getattr(torch.ops, ns)
