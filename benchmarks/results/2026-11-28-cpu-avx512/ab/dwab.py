# python dwab.py threads srcA:nsA srcB:nsB rounds [N,C,H ...]: dw3x3_backward_channels_last of two builds of
# repso_moments.cpp, alternated (each timed call after an untimed one), median of per-round ratios B/A
import os, sys, time, statistics as st, torch
from torch.utils.cpp_extension import load
from falconnet import malloc_tuning; malloc_tuning.apply()
EXTRA = '''
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
def get(spec):
    src, ns = spec.split(':')
    d = f'/tmp/rmab/{ns}'; os.makedirs(d, exist_ok=True)
    rm = open(src).read().replace('namespace falconnet::cpu {', f'namespace falconnet::cpu_{ns} {{\nusing namespace falconnet::cpu;')
    rm += EXTRA.replace('NS', ns)
    p = f'{d}/rm.cpp'
    if not os.path.exists(p) or open(p).read() != rm: open(p, 'w').write(rm)
    load(name=ns, sources=[p], extra_include_paths=['/work/main/csrc', '/work/main/csrc/cpu'],
         extra_cflags=['-O3', '-g', '-fopenmp', '-march=native', '-std=c++20', f'-DFALCONNET_OPS_NAMESPACE={ns}'],
         extra_ldflags=['-fopenmp'], is_python_module=False, build_directory=d, verbose=False)
    return getattr(torch.ops, ns).dwbwd
torch.set_num_threads(int(sys.argv[1]))
A, B = get(sys.argv[2]), get(sys.argv[3])
R = int(sys.argv[4])
for shp in sys.argv[5:] or ['16,128,56', '16,256,28', '16,512,14', '16,1024,7']:
    N, C, H = map(int, shp.split(','))
    torch.manual_seed(0)
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3), torch.randn(C)
    ra, rb = A(gy, x, w, b, 'relu6'), B(gy, x, w, b, 'relu6')
    same = all(torch.equal(u, v) for u, v in zip(ra, rb))
    ta, tb, rat = [], [], []
    for r in range(R):
        t = {}
        for name, f in ((('a', A), ('b', B)) if r % 2 == 0 else (('b', B), ('a', A))):
            f(gy, x, w, b, 'relu6'); s = time.perf_counter(); f(gy, x, w, b, 'relu6'); t[name] = time.perf_counter() - s
        ta.append(t['a']); tb.append(t['b']); rat.append(t['b'] / t['a'])
    q = st.quantiles(rat, n=4)
    print(f"{N}x{C}@{H}: A med {st.median(ta)*1e3:.3f}  B med {st.median(tb)*1e3:.3f}  B/A {st.median(rat):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f})  bitwise equal {same}", flush=True)
