# The installed falconnet_kernels.sf_conv against dense oneDNN 1x1 (F.conv2d with the composed
# weight, same layout), the 8 shapes of SPEC section 6, float32 batch 16; the two calls alternated
# with their order flipped every round, minimum of 21 rounds (this machine's speed drifts within
# minutes, so both sides of a ratio are timed in the same seconds).
#   python sfall2.py cl,nchw THREADS [bwd]
import math
import sys
import time

import torch
import torch.nn.functional as F

import falconnet_kernels as fk
from falconnet import malloc_tuning

malloc_tuning.apply()
torch.set_num_threads(int(sys.argv[2]))
TRAIN = "bwd" in sys.argv
PW = [(32, 128, 56, 8), (128, 32, 56, 4), (64, 256, 28, 16), (256, 64, 28, 8),
      (128, 512, 14, 16), (512, 128, 14, 8), (256, 1024, 7, 32), (1024, 256, 7, 16)]


def pair(c_in, c_out, hw, k, fmt):
    """(fused, dense) callables for one shape: forward, or forward + backward with TRAIN."""
    groups, m = c_in // k, c_out // k
    x = torch.randn(16, c_in, hw, hw).contiguous(memory_format=fmt).requires_grad_(TRAIN)
    w1 = (torch.randn(groups, k, k) / math.sqrt(k)).requires_grad_(TRAIN)
    w2 = (torch.randn(k, m, groups) / math.sqrt(groups)).requires_grad_(TRAIN)
    wd = fk.sf_conv_dense_weight(w1.detach(), w2.detach()).reshape(c_out, c_in, 1, 1)
    wd = wd.contiguous(memory_format=fmt).requires_grad_(TRAIN)
    gy = torch.randn(16, c_out, hw, hw).contiguous(memory_format=fmt)
    if TRAIN:
        return (lambda: fk.sf_conv(x, w1, w2).backward(gy)), (lambda: F.conv2d(x, wd).backward(gy))
    return (lambda: fk.sf_conv(x, w1, w2)), (lambda: F.conv2d(x, wd))


for lay in sys.argv[1].split(","):
    fmt = torch.channels_last if lay == "cl" else torch.contiguous_format
    ratios = []
    for c_in, c_out, hw, k in PW:
        calls = pair(c_in, c_out, hw, k, fmt)
        best = [float("inf"), float("inf")]
        for f in calls * 3:  # warm-up
            f()
        for i in range(21):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                calls[j]()
                best[j] = min(best[j], time.perf_counter() - t)
        ratios.append(best[1] / best[0])
        gbs = 16 * hw * hw * (c_in + c_out) * 4 / best[0] / 1e9
        print(f"{lay} {c_in}->{c_out}@{hw} sf {best[0] * 1e3:.3f} dense {best[1] * 1e3:.3f} ms  "
              f"{ratios[-1]:.2f}x  sf {gbs:.1f} GB/s", flush=True)
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(lay, "geomean %.2fx min %.2fx" % (geo, min(ratios)))
