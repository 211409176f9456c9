import sys, time, torch, statistics as st
from falconnet import malloc_tuning; malloc_tuning.apply()
import falconnet_kernels
torch.set_num_threads(int(sys.argv[1]))
N,C,H = map(int, sys.argv[2].split(','))
torch.manual_seed(0)
x = (torch.randn(N,C,H,H)*2+0.5).contiguous(memory_format=torch.channels_last)
gy = torch.randn(N,C,H,H).contiguous(memory_format=torch.channels_last)
w = torch.randn(C,1,3,3); b = torch.randn(C)
op = torch.ops.falconnet_C
mean, cov = op.repso_moments_forward(x, 3)
gm, gc = torch.randn(C,9)*0.1, torch.randn(C,9,9)*0.01
fs = {
 "moments_fwd": lambda: op.repso_moments_forward(x, 3),
 "conv_fwd": lambda: op.dw_conv3x3_forward(x, w, b, 1, "none"),
 "conv_wgrad": lambda: op.repso_conv_weight_grad(gy, x),
 "bwd_x": lambda: op.repso_train_backward_x(gm, gc, x, mean, gy, w),
 "dw_bwd": lambda: op.dw_conv3x3_backward(gy, x, w, b, 1, "relu6"),
}
for f in fs.values(): f(); f()
r = {k: [] for k in fs}
for i in range(15):
    for k, f in fs.items():
        f(); s = time.perf_counter(); f(); r[k].append(time.perf_counter() - s)
print(sys.argv[2], " ".join(f"{k} {st.median(v)*1e3:.3f}" for k, v in r.items()))
