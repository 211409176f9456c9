# build a copy of csrc/cpu/dw_conv3x3.cpp as torch.ops.<ns>.dw_conv3x3_forward with a variant knob
import sys, os, torch
from torch.utils.cpp_extension import load
def get(src, ns):
    text = open(src).read()
    text = text.replace('TORCH_LIBRARY_IMPL(falconnet_C, CPU, m)', f'''TORCH_LIBRARY({ns}, m) {{
  m.def("dw_conv3x3_forward(Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> Tensor");
  m.def("set_variant(Tensor t, int v) -> int");
}}
TORCH_LIBRARY_IMPL({ns}, CPU, m)''')
    text = text.replace('m.impl("dw_conv3x3_backward", &falconnet::cpu::dw_conv3x3_backward_cpu);',
                        'm.impl("set_variant", [](const at::Tensor&, int64_t v) { falconnet::cpu::g_variant = v; return v; });')
    text = text.replace('namespace falconnet::cpu {', 'namespace falconnet::cpu {\nint64_t g_variant = 0;\nbool g_stream = false;\n'
        'bool dw3x3_backward_channels_last(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, Activation, at::Tensor&, at::Tensor&, at::Tensor&) { return false; }\n'
        'bool dw3x3_forward_channels_last(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, Activation, at::Tensor&) { return false; }\n', 1)
    os.makedirs(f'/tmp/dwdev/{ns}', exist_ok=True)
    open(f'/tmp/dwdev/{ns}/dw.cpp', 'w').write(text)
    load(name=ns, sources=[f'/tmp/dwdev/{ns}/dw.cpp'], extra_include_paths=['/work/main/csrc'],
         extra_cflags=['-O3', '-g0', '-fopenmp', '-march=native', '-std=c++20'], extra_ldflags=['-fopenmp'], is_python_module=False,
         build_directory=f'/tmp/dwdev/{ns}', verbose=False)
    return getattr(torch.ops, ns)
