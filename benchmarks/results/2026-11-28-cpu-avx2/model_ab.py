# deployed FalconNet inference (batch 8, 224 px, channels_last, float32, 2 threads) with the
# dw_conv3x3 forward of HEAD~1 (dwold) vs this tree's, alternated in one process
import sys, time, statistics, torch
sys.path.insert(0, '/tmp/dwdev'); import build
import falconnet, falconnet_kernels.ops as ops
from falconnet import malloc_tuning; malloc_tuning.apply()
torch.set_num_threads(2)
old = build.get('/tmp/dwdev/dw_old.cpp', 'dwold')
orig_run = ops._run
mode = {"old": False}
def run(op, pass_, x, *args):
    if mode["old"] and op == "dw_conv3x3" and pass_ == "forward" and not (args[3] == 1 and x.shape[2] * x.shape[3] <= 64):
        return old.dw_conv3x3_forward(*args).contiguous(memory_format=ops._out_format(x))
    return orig_run(op, pass_, x, *args)
ops._run = run
m = falconnet.reparameterize_model(falconnet.create_model("falconnet", num_classes=1000).eval()).to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
ts = {"old": [], "new": []}
with torch.no_grad():
    ref = m(x); mode["old"] = True; assert torch.allclose(m(x), ref, atol=1e-3, rtol=1e-3)
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
        for k in (("old", "new") if r % 2 else ("new", "old")):
            mode["old"] = k == "old"; t = time.perf_counter(); m(x); ts[k].append(time.perf_counter() - t)
print(f"FalconNet deployed, batch 8: old dw min {min(ts['old'])*1e3:.1f} med {statistics.median(ts['old'])*1e3:.1f} ms; new min {min(ts['new'])*1e3:.1f} med {statistics.median(ts['new'])*1e3:.1f} ms; new/old median per-round ratio {statistics.median([n/o for n, o in zip(ts['new'], ts['old'])]):.3f}")
