import sys, time, statistics, torch
sys.path.insert(0, '/tmp/dwdev'); import build_bwd
from falconnet import malloc_tuning; malloc_tuning.apply()
a = sys.argv; N, HW, C = int(a[1]), int(a[2]), int(a[3]); act = a[4]
torch.set_num_threads(int(a[5]) if len(a) > 5 else 2)
old = build_bwd.get('/tmp/dwdev/rm_old.cpp', 'rmold'); new = build_bwd.get('/tmp/rm_new.cpp', 'rmnew')
x = torch.randn(N, C, HW, HW).to(memory_format=torch.channels_last); w = torch.randn(C, 1, 3, 3); b = torch.randn(C); gy = torch.randn_like(x)
ro = old.dw_conv3x3_backward(gy, x, w, b, 1, act); rn = new.dw_conv3x3_backward(gy, x, w, b, 1, act)
assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-4) for p, q in zip(ro, rn))
ts = {"old": [], "new": []}
for r in range(21):
    for k, op in ((("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old))):
        t = time.perf_counter(); op.dw_conv3x3_backward(gy, x, w, b, 1, act); ts[k].append(time.perf_counter() - t)
print(f"N={N} {C}@{HW} {act} t{torch.get_num_threads()}: old {statistics.median(ts['old'])*1e3:.3f} new {statistics.median(ts['new'])*1e3:.3f} ms (medians); new/old {statistics.median([p/q for p,q in zip(ts['new'], ts['old'])]):.3f}")
