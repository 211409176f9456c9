import sys, time, torch, statistics as st
from falconnet import malloc_tuning; malloc_tuning.apply()
from falconnet.layers.repso import RepSO
from falconnet.layers.repso_train import repso_train_forward
from torch.utils._python_dispatch import TorchDispatchMode
torch.set_num_threads(2)
C, H = 1024, 7
layer = RepSO(C).train()
x = torch.randn(16, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_()
gy = torch.randn(16, C, H, H).contiguous(memory_format=torch.channels_last)
cap = {}
class M(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("falconnet_C."):
            cap[name] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        return func(*args, **(kwargs or {}))
with M():
    y = repso_train_forward(x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn)
    y.backward(gy)
print(list(cap))
a = cap[[k for k in cap if "backward_x" in k][0]]
for t in a:
    if isinstance(t, torch.Tensor): print(tuple(t.shape), t.dtype, "absmax %.2e" % t.abs().max().item(), "min nonzero %.2e" % t.abs()[t != 0].min().item() if (t != 0).any() else "")
op = torch.ops.falconnet_C.repso_train_backward_x
def run(): op(*a)
r = {0: [], 1: []}
for i in range(20):
    for f in (0, 1):
        torch.set_flush_denormal(bool(f)); run(); s = time.perf_counter(); run(); r[f].append(time.perf_counter() - s)
print("real args: no-ftz %.3f ftz %.3f ms" % (st.median(r[0])*1e3, st.median(r[1])*1e3))
tim = {}
class T(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        s = time.perf_counter(); out = func(*args, **(kwargs or {})); d = time.perf_counter() - s
        tim.setdefault(str(func), []).append(d); return out
def step():
    y = repso_train_forward(x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn)
    y.backward(gy)
for _ in range(3): step()
ts = []
for _ in range(20):
    s = time.perf_counter(); step(); ts.append(time.perf_counter() - s)
print("step (no mode) %.3f ms" % (st.median(ts) * 1e3))
with T():
    for _ in range(20): step()
tot = 0
for k, v in sorted(tim.items(), key=lambda kv: -sum(kv[1])):
    tot += st.median(v) * len(v) / 20
    if st.median(v) > 5e-6: print("%-55s n/step %.0f median %.3f ms" % (k, len(v) / 20, st.median(v) * 1e3))
print("sum of medians per step %.3f ms" % (tot * 1e3))
