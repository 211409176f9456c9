# python order_ab.py VAR values rounds N,C,H...: a development variable's values alternated in one process
# (a dev build of the working tree, which read VAR), each against the installed op; VAR was FALCONNET_DEV_GB
# (item groups) or FALCONNET_DEV_KF (planes filled per pass), patches not kept: NOTES.md describes them
import sys, os, time, statistics, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); import build  # noqa: E402
import falconnet_kernels
torch.set_num_threads(2)
var = sys.argv[1]
new = build.get('/work/main/csrc/cpu/repso_moments.cpp', 'rmdev')
old = torch.ops.falconnet_C
gbs = sys.argv[2].split(',')
for N, C, H in [tuple(int(v) for v in s.split(',')) for s in sys.argv[4:]]:
    gm, gc, x, mean, gy, w = build.inputs(N, C, H)
    ref = old.repso_train_backward_x(gm, gc, x, mean, gy, w)
    ts = {g: [] for g in gbs}; ts['old'] = []
    for g in gbs:
        os.environ[var] = g
        assert torch.equal(new.repso_train_backward_x(gm, gc, x, mean, gy, w), ref)
    keys = ['old'] + gbs
    for r in range(int(sys.argv[3])):
        for k in (keys if r % 2 else keys[::-1]):
            if k != 'old': os.environ[var] = k
            f = old if k == 'old' else new
            t = time.perf_counter(); f.repso_train_backward_x(gm, gc, x, mean, gy, w); ts[k].append(time.perf_counter() - t)
    print(f"{N}x{C}@{H}: old {statistics.median(ts['old'])*1e3:.2f} ms; " + "; ".join(
        f"{g}: {statistics.median(ts[g])*1e3:.2f} ms ratio {statistics.median([a/b for a, b in zip(ts[g], ts['old'])]):.3f}" for g in gbs), flush=True)
