# repso_train_backward_x: installed falconnet_C ("old") vs a dev build of the working tree ("new"), alternated
import sys, os, time, statistics, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); import build  # noqa: E402
import falconnet_kernels  # loads falconnet_C
from falconnet import malloc_tuning; malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[1]))
src = sys.argv[2] if len(sys.argv) > 2 else '/work/main/csrc/cpu/repso_moments.cpp'
new = build.get(src, sys.argv[3] if len(sys.argv) > 3 else 'rmnew')
old = torch.ops.falconnet_C
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 25
shapes = [(16, 128, 56), (16, 256, 28), (16, 512, 14), (16, 1024, 7)] if len(sys.argv) <= 5 else [tuple(int(v) for v in s.split(',')) for s in sys.argv[5:]]
for N, C, H in shapes:
    gm, gc, x, mean, gy, w = build.inputs(N, C, H)
    fo = lambda: old.repso_train_backward_x(gm, gc, x, mean, gy, w)
    fn = lambda: new.repso_train_backward_x(gm, gc, x, mean, gy, w)
    a, b = fo(), fn()
    err = ((a - b).abs().max() / a.abs().max()).item()
    ts = {"old": [], "new": []}
    for r in range(rounds):
        for k, f in ((("old", fo), ("new", fn)) if r % 2 else (("new", fn), ("old", fo))):
            t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
    rat = [n / o for n, o in zip(ts["new"], ts["old"])]
    q = statistics.quantiles(rat, n=4)
    print(f"{N}x{C}@{H} t{torch.get_num_threads()}: old {statistics.median(ts['old'])*1e3:.3f} new {statistics.median(ts['new'])*1e3:.3f} ms; new/old median {statistics.median(rat):.3f} (q1 {q[0]:.3f} q3 {q[2]:.3f}); max rel diff {err:.1e}", flush=True)
