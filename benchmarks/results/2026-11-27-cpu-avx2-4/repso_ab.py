"""Issue 5 layer step, A/B in one process: the previous commit's Python node (ab87dfe, copied to
falconnet/layers/_old_repso_train.py with `git show ab87dfe:falconnet/layers/repso_train.py`) vs this
one, and the seven branches, alternated each round; medians. Both nodes call this build's C++ kernels.
Usage: python repso_ab.py THREADS N_SHAPES ROUNDS"""
import sys, time, torch, statistics as st
sys.path.insert(0, "/work/main/benchmarks")
import falconnet.malloc_tuning as mt; mt.apply()
from test_bench_repso_train import make_layer, seven_branch
from falconnet.layers import repso_train as new, _old_repso_train as old
torch.set_num_threads(int(sys.argv[1]))
N = 16
for C, H in [(1024, 7), (512, 14), (128, 56)][: int(sys.argv[2]) if len(sys.argv) > 2 else 1]:
    torch.manual_seed(0)
    layer = make_layer(C, "cpu", torch.float32)
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    gy = torch.randn_like(x)
    params = [x] + list(layer.parameters())
    def mk(mod):
        def f():
            y = mod.repso_train_forward(x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn)
            return torch.autograd.grad(y, params, gy)
        return f
    fs = {"old": mk(old), "new": mk(new), "seven": lambda: torch.autograd.grad(seven_branch(layer, x), params, gy)}
    ga, gb = fs["old"](), fs["new"]()
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ga, gb))
    for f in fs.values(): f(); f()
    ts = {k: [] for k in fs}
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 20):
        for k, f in fs.items():
            a = time.perf_counter(); f(); ts[k].append(time.perf_counter() - a)
    m = {k: st.median(v) * 1e3 for k, v in ts.items()}
    print(f"{C}@{H} thr{torch.get_num_threads()}: old {m['old']:.2f} new {m['new']:.2f} ms (new/old {m['new']/m['old']:.3f}); seven {m['seven']:.2f}: ratio old {m['seven']/m['old']:.2f} new {m['seven']/m['new']:.2f}")
