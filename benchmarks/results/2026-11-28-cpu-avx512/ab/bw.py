import time, torch, statistics as st
from falconnet import malloc_tuning; malloc_tuning.apply()
import falconnet_kernels as fk, torch.nn.functional as F
x = torch.randn(16,128,56,56).contiguous(memory_format=torch.channels_last)
big = torch.randn(64*1024*1024//4)
w1=torch.randn(32,4,4); w2=torch.randn(4,8,32); wd=torch.randn(32,128,1,1)
def evict(): big.add_(1.0)
def t(f, ev):
    r=[]
    for i in range(15):
        if ev: evict()
        s=time.perf_counter(); f(); r.append(time.perf_counter()-s)
    return st.median(r)*1e3, min(r)*1e3
with torch.inference_mode():
  for ev in (False, True):
    print("evict" if ev else "warm ",
      "sum %.3f/%.3f" % t(lambda: x.sum(), ev),
      "op %.3f/%.3f" % t(lambda: torch.ops.falconnet_C.sf_conv_forward(x,w1,w2,None,None,'none'), ev),
      "dense %.3f/%.3f" % t(lambda: F.conv2d(x,wd), ev))
