import time, torch, torch.nn.functional as F, statistics as st, os
import falconnet_kernels as fk
from falconnet import malloc_tuning; malloc_tuning.apply()
cpp = torch.ops.falconnet_C
for T in (1, 2):
    torch.set_num_threads(T)
    for N, C, H in [(16, 128, 56), (16, 256, 28), (16, 512, 14), (16, 1024, 7), (4, 1024, 7)]:
        x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last); w = torch.randn(C, 1, 3, 3); b = torch.randn(C)
        f1 = lambda: cpp.dw_conv3x3_forward(x, w, b, 1, "relu"); f2 = lambda: F.relu(F.conv2d(x, w, b, padding=1, groups=C))
        f3 = lambda: F.conv2d(x, w, b, padding=1, groups=C)
        r = {0: [], 1: [], 2: []}
        for _ in range(3): f1(); f2()
        for _ in range(25):
            for i, f in enumerate((f1, f2, f3)):
                t = time.perf_counter(); f(); r[i].append(time.perf_counter() - t)
        a, b_, c_ = (min(r[i]) * 1e3 for i in range(3))
        print(T, N, C, H, 'ours %.3f onednn+relu %.3f onednn %.3f ratio %.2f' % (a, b_, c_, b_ / a))
