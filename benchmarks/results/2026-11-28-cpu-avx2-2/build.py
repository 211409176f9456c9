# build a copy of repso_moments.cpp (given path) as torch.ops.<ns>, its C++ namespace renamed
import os, torch
from torch.utils.cpp_extension import load
def get(src, ns):
    d = f'/tmp/rmab/{ns}'; os.makedirs(d, exist_ok=True)
    rm = open(src).read().replace('namespace falconnet::cpu {', f'namespace falconnet::cpu_{ns} {{\nusing namespace falconnet::cpu;')
    p = f'{d}/rm.cpp'
    if not os.path.exists(p) or open(p).read() != rm: open(p, 'w').write(rm)
    load(name=ns, sources=[p], extra_include_paths=['/work/main/csrc', '/work/main/csrc/cpu'],
         extra_cflags=['-O3', '-g', '-fopenmp', '-march=native', '-std=c++20', f'-DFALCONNET_OPS_NAMESPACE={ns}'], extra_ldflags=['-fopenmp'],
         is_python_module=False, build_directory=d, verbose=False)
    return getattr(torch.ops, ns)


def inputs(N, C, H):
    """repso_train_backward_x's arguments (grad_mean, grad_cov, x, mean, grad_y, weight), seeded"""
    torch.manual_seed(0)
    x = (torch.randn(N, C, H, H) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    mean, _ = torch.ops.falconnet_C.repso_moments_forward(x, 3)
    return torch.randn(C, 9) * 0.1, torch.randn(C, 9, 9) * 0.01, x, mean, gy, torch.randn(C, 1, 3, 3)
