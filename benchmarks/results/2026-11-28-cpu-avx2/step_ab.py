# RepSO one-conv training step (fwd+bwd, batch 16, channels_last) with the installed _C's
# dw_conv3x3 forward ("old") vs the working tree's (dev build "dwnew"), alternated, + seven branches
import sys, time, statistics, torch
sys.path.insert(0, '/tmp/dwdev'); sys.path.insert(0, '/work/main/benchmarks'); import build
from test_bench_repso_train import make_layer, one_conv, seven_branch
import falconnet.layers.repso_train as rt
from falconnet import malloc_tuning; malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
new = build.get('/work/main/csrc/cpu/dw_conv3x3.cpp', 'dwnew')
mode = {"new": False}
class Proxy:
    def __getattr__(self, name):
        if name == "dw_conv3x3_forward" and mode["new"]: return new.dw_conv3x3_forward
        return getattr(torch.ops.falconnet_C, name)
torch.ops.dwproxy = Proxy(); rt.CPP_NAMESPACE = "dwproxy"
C, H = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0); layer = make_layer(C, "cpu", torch.float32)
x = torch.randn(16, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_(True)
gy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
params = [x] + list(layer.parameters())
fs = {"old": lambda: torch.autograd.grad(one_conv(layer, x), params, gy), "new": lambda: torch.autograd.grad(one_conv(layer, x), params, gy),
      "seven": lambda: torch.autograd.grad(seven_branch(layer, x), params, gy)}
ga = fs["old"](); mode["new"] = True; gb = fs["new"]()
assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ga, gb))
ts = {k: [] for k in fs}
for r in range(int(sys.argv[4]) if len(sys.argv) > 4 else 21):
    for k, f in (fs.items() if r % 2 else list(fs.items())[::-1]):
        mode["new"] = k == "new"; t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
med = lambda k: statistics.median(ts[k]) * 1e3
print(f"{C}@{H} t{torch.get_num_threads()}: old {med('old'):.2f} new {med('new'):.2f} seven {med('seven'):.2f} ms (medians); new/old {statistics.median([n/o for n,o in zip(ts['new'], ts['old'])]):.3f}; seven/old {statistics.median([s/o for s,o in zip(ts['seven'], ts['old'])]):.2f}x seven/new {statistics.median([s/n for s,n in zip(ts['seven'], ts['new'])]):.2f}x")
