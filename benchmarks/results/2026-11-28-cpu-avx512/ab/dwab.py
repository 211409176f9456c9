# python dwab.py fwd|bwd threads srcA:nsA srcB:nsB rounds [N,C,H[,stride] ...]
# dw_conv3x3's forward (a build of csrc/cpu/dw_conv3x3.cpp) or its channels_last backward (a build of
# csrc/cpu/repso_moments.cpp), relu6, two builds under their own op namespaces, alternated (each timed call
# after an untimed one of the same build, order flipped each round): median of per-round time ratios B/A
import os, sys, time, statistics as st, torch
from torch.utils.cpp_extension import load
from falconnet import malloc_tuning; malloc_tuning.apply()
RENAME = ('namespace falconnet::cpu {', 'namespace falconnet::cpu_NS {\nusing namespace falconnet::cpu;')
# forward: dw_conv3x3.cpp registered as NS::dwf, the backward it calls stubbed out
FWD_REG = ('TORCH_LIBRARY_IMPL(falconnet_C, CPU, m) {\n  m.impl("dw_conv3x3_forward", &falconnet::cpu::',
           'TORCH_LIBRARY(NS, m) { m.def("dwf(Tensor x, Tensor w, Tensor? b, int stride, str act) -> Tensor"); }\n'
           'TORCH_LIBRARY_IMPL(NS, CPU, m) {\n  m.impl("dwf", &falconnet::cpu_NS::')
FWD_TAIL = '''
namespace falconnet::cpu_NS {
bool dw3x3_backward_channels_last(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                  falconnet::cpu::Activation, at::Tensor&, at::Tensor&, at::Tensor&) { return false; }
}
'''
# backward: repso_moments.cpp (its ops under NS) plus NS::dwbwd calling its dw3x3_backward_channels_last
BWD_TAIL = '''
#include <torch/library.h>
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwbwd(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                                                     const c10::optional<at::Tensor>& b, c10::string_view act) {
  at::Tensor gx, gw, gb;
  const auto a = falconnet::cpu::parse_activation(std::string_view(act.data(), act.size()));
  TORCH_CHECK(falconnet::cpu_NS::dw3x3_backward_channels_last(gy, x, w, b, a, gx, gw, gb));
  return {gx, gw, gb};
}
}
TORCH_LIBRARY_FRAGMENT(NS, m) { m.def("dwbwd(Tensor gy, Tensor x, Tensor w, Tensor? b, str act) -> (Tensor, Tensor, Tensor)"); }
TORCH_LIBRARY_IMPL(NS, CPU, m) { m.impl("dwbwd", &dwbwd); }
'''
mode = sys.argv[1]


def get(spec):
    src, ns = spec.split(':')
    d = f'/tmp/rmab/{ns}'; os.makedirs(d, exist_ok=True)
    t = open(src).read().replace(RENAME[0], RENAME[1].replace('NS', ns))
    if mode == 'fwd':
        t = t.replace(FWD_REG[0], FWD_REG[1].replace('NS', ns)) + FWD_TAIL.replace('NS', ns)
        t = t.replace('  m.impl("dw_conv3x3_backward", &falconnet::cpu::dw_conv3x3_backward_cpu);\n', '')
        flags = []
    else:
        t += BWD_TAIL.replace('NS', ns)
        flags = [f'-DFALCONNET_OPS_NAMESPACE={ns}']
    p = f'{d}/k.cpp'
    if not os.path.exists(p) or open(p).read() != t: open(p, 'w').write(t)
    load(name=ns, sources=[p], extra_include_paths=['/work/main/csrc', '/work/main/csrc/cpu'],
         extra_cflags=['-O3', '-g', '-fopenmp', '-march=native', '-std=c++20'] + flags, extra_ldflags=['-fopenmp'],
         is_python_module=False, build_directory=d, verbose=False)
    return getattr(getattr(torch.ops, ns), 'dwf' if mode == 'fwd' else 'dwbwd')


torch.set_num_threads(int(sys.argv[2]))
A, B = get(sys.argv[3]), get(sys.argv[4])
R = int(sys.argv[5])
for shp in sys.argv[6:] or ['16,128,56', '16,256,28', '16,512,14', '16,1024,7']:
    v = list(map(int, shp.split(','))); N, C, H = v[:3]; stride = v[3] if len(v) > 3 else 1
    torch.manual_seed(0)
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    args = (x, w, b, stride, 'relu6') if mode == 'fwd' else (gy, x, w, b, 'relu6')
    ra, rb = A(*args), B(*args)
    same = all(torch.equal(u, v) for u, v in zip(ra, rb)) if mode == 'bwd' else torch.equal(ra, rb)
    ta, tb, rat = [], [], []
    for r in range(R):
        t = {}
        for name, f in ((('a', A), ('b', B)) if r % 2 == 0 else (('b', B), ('a', A))):
            f(*args); s = time.perf_counter(); f(*args); t[name] = time.perf_counter() - s
        ta.append(t['a']); tb.append(t['b']); rat.append(t['b'] / t['a'])
    q = st.quantiles(rat, n=4)
    print(f"{N}x{C}@{H}/s{stride}: A med {st.median(ta)*1e3:.3f}  B med {st.median(tb)*1e3:.3f}  B/A {st.median(rat):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f})  bitwise equal {same}", flush=True)
