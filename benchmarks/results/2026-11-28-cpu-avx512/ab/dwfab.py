# python dwfab.py threads srcA:nsA srcB:nsB rounds [N,C,H[,stride] ...]: dw_conv3x3 forward (relu6) of two builds of
# dw_conv3x3.cpp alternated (each timed call after an untimed one), median of per-round ratios B/A
import os, sys, time, statistics as st, torch
from torch.utils.cpp_extension import load
from falconnet import malloc_tuning; malloc_tuning.apply()
STUB = '''
namespace falconnet::cpu_NS {
bool dw3x3_backward_channels_last(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                  falconnet::cpu::Activation, at::Tensor&, at::Tensor&, at::Tensor&) { return false; }
}
'''
def get(spec):
    src, ns = spec.split(':')
    d = f'/tmp/rmab/{ns}'; os.makedirs(d, exist_ok=True)
    t = open(src).read().replace('namespace falconnet::cpu {', f'namespace falconnet::cpu_{ns} {{\nusing namespace falconnet::cpu;')
    t = t.replace('TORCH_LIBRARY_IMPL(falconnet_C, CPU, m) {', f'TORCH_LIBRARY({ns}, m) {{ m.def("dwf(Tensor x, Tensor w, Tensor? b, int stride, str act) -> Tensor"); m.def("dwb(Tensor gy, Tensor x, Tensor w, Tensor? b, int stride, str act) -> (Tensor, Tensor, Tensor)"); }}\nTORCH_LIBRARY_IMPL({ns}, CPU, m) {{')
    t = t.replace('m.impl("dw_conv3x3_forward", &falconnet::cpu::', f'm.impl("dwf", &falconnet::cpu_{ns}::').replace('m.impl("dw_conv3x3_backward", &falconnet::cpu::', f'm.impl("dwb", &falconnet::cpu_{ns}::')
    t += STUB.replace('NS', ns)
    p = f'{d}/dw.cpp'
    if not os.path.exists(p) or open(p).read() != t: open(p, 'w').write(t)
    load(name=ns, sources=[p], extra_include_paths=['/work/main/csrc', '/work/main/csrc/cpu'],
         extra_cflags=['-O3', '-g', '-fopenmp', '-march=native', '-std=c++20'], extra_ldflags=['-fopenmp'],
         is_python_module=False, build_directory=d, verbose=False)
    return getattr(torch.ops, ns).dwf
torch.set_num_threads(int(sys.argv[1]))
A, B = get(sys.argv[2]), get(sys.argv[3])
R = int(sys.argv[4])
for shp in sys.argv[5:] or ['16,128,56', '16,256,28', '16,512,14', '16,1024,7', '8,128,56', '16,128,112,2']:
    v = list(map(int, shp.split(','))); N, C, H = v[:3]; stride = v[3] if len(v) > 3 else 1
    torch.manual_seed(0)
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    same = torch.equal(A(x, w, b, stride, 'relu6'), B(x, w, b, stride, 'relu6'))
    ta, tb, rat = [], [], []
    for r in range(R):
        t = {}
        for name, f in ((('a', A), ('b', B)) if r % 2 == 0 else (('b', B), ('a', A))):
            f(x, w, b, stride, 'relu6'); s = time.perf_counter(); f(x, w, b, stride, 'relu6'); t[name] = time.perf_counter() - s
        ta.append(t['a']); tb.append(t['b']); rat.append(t['b'] / t['a'])
    q = st.quantiles(rat, n=4)
    print(f"{N}x{C}@{H}/s{stride}: A med {st.median(ta)*1e3:.3f}  B med {st.median(tb)*1e3:.3f}  B/A {st.median(rat):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f})  equal {same}", flush=True)
