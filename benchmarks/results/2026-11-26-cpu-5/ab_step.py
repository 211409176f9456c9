"""A/B in one process: 'new' = working tree behaviour; 'old' = HEAD's (module patched back)."""
import sys, time, torch
import falconnet.malloc_tuning as mt; mt.apply()
sys.path.insert(0, "/work/main/benchmarks")
from common import saved_bytes
from falconnet.models import create_model
import falconnet.layers.conv_bn as cb
import falconnet.layers.repso as rp
from falconnet.layers.activation import apply_activation
import torch.nn.functional as F
size, batch, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
new_bn_act = cb.batch_norm_act
def old_bn_act(bn, x, act):  # HEAD: bn then in-place activation (clones under autograd)
    y = bn(x)
    return {"relu6": lambda t: F.relu6(t, inplace=True), "relu": lambda t: F.relu(t, inplace=True), "none": lambda t: t}.get(act, lambda t: apply_activation(t, act))(y)
new_tf = rp.RepSO._train_forward
def old_tf(self, x, activation="none"):
    return apply_activation(new_tf(self, x, "none"), activation)
def set_mode(m):
    cb.batch_norm_act = new_bn_act if m == "new" else old_bn_act
    rp.RepSO._train_forward = new_tf if m == "new" else old_tf
torch.manual_seed(0)
model = create_model("falconnet", num_classes=100).train().to(memory_format=torch.channels_last)
x = torch.randn(batch,3,size,size).contiguous(memory_format=torch.channels_last)
t = torch.randint(0,100,(batch,))
params=[p for p in model.parameters()]
def fn():
    loss = F.cross_entropy(model(x), t)
    return torch.autograd.grad(loss, params)
res = {"old": [], "new": []}
for m in res:
    set_mode(m); print(m, "saved MB %.1f" % (saved_bytes(lambda: model(x), x)/1e6))
for r in range(rounds):
    for m in (("old","new") if r % 2 == 0 else ("new","old")):
        set_mode(m); fn()
        ts=[]
        for _ in range(3):
            s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
        res[m].append(min(ts)*1e3)
for m,v in res.items(): print(m, sorted(round(a,1) for a in v))
import statistics
print("median ratio old/new %.3f" % (statistics.median(res["old"])/statistics.median(res["new"])))
