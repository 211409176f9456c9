import torch, time, sys, falconnet_kernels
import torch.nn.functional as F
from falconnet.layers import SFConv2d
torch.manual_seed(0)
C_in, C_out, H = [int(v) for v in sys.argv[1:4]]
layer = SFConv2d(C_in, C_out)
w1 = layer.weight1.detach(); w2 = layer.weight2.detach()
print("w1", tuple(w1.shape), "w2", tuple(w2.shape))
x = torch.randn(16, C_in, H, H).contiguous(memory_format=torch.channels_last)
wd = falconnet_kernels.sf_conv_dense_weight(w1, w2)[:, :, None, None].contiguous(memory_format=torch.channels_last)
f_op = lambda: torch.ops.falconnet.sf_conv(x, w1, w2, None, None, "none")
f_d = lambda: F.conv2d(x, wd)
for _ in range(5): f_op(); f_d()
rs=[]; to=[]; td=[]
for r in range(int(sys.argv[4]) if len(sys.argv)>4 else 30):
    t0=time.perf_counter(); f_op(); t1=time.perf_counter(); f_d(); t2=time.perf_counter()
    to.append(t1-t0); td.append(t2-t1); rs.append((t2-t1)/(t1-t0))
import statistics as st
print(f"op {st.median(to)*1e3:.2f} ms dense {st.median(td)*1e3:.2f} ms  speedup median {st.median(rs):.2f}x min-op {min(to)*1e3:.2f} min-d {min(td)*1e3:.2f}")
