import torch, time, statistics as st, falconnet_kernels
from falconnet.layers import SFConv2d
x = torch.randn(16, 128, 56, 56).contiguous(memory_format=torch.channels_last)
y = torch.empty_like(x)
layer = SFConv2d(128, 32); w1 = layer.weight1.detach(); w2 = layer.weight2.detach()
def t(f, n=30):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return st.median(ts)*1e3
for th in (2,1):
    torch.set_num_threads(th)
    print(th, "sum %.2f ms" % t(lambda: x.sum()), "copy %.2f ms" % t(lambda: y.copy_(x)), "op %.2f ms" % t(lambda: torch.ops.falconnet.sf_conv(x, w1, w2, None, None, "none")))
