# RepSO layer training step (forward + backward), the exact one-conv path vs the seven branches,
# calls alternated in one process (order flipped every round), float32 batch 16 channels_last.
# python repso_ab.py C H THREADS ROUNDS   (run from the repository root)
import statistics as st
import sys
import time

import torch

sys.path.insert(0, 'benchmarks')
from falconnet import malloc_tuning  # noqa: E402

malloc_tuning.apply()
from test_bench_repso_train import make_layer, one_conv, seven_branch  # noqa: E402

C, H, T, R = map(int, sys.argv[1:5])
torch.set_num_threads(T)
torch.manual_seed(0)
layer = make_layer(C, 'cpu', torch.float32)
x = torch.randn(16, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_(True)
gy = torch.randn_like(x)
params = [x] + list(layer.parameters())
fs = {'one-conv': lambda: torch.autograd.grad(one_conv(layer, x), params, gy),
      'seven-branch': lambda: torch.autograd.grad(seven_branch(layer, x), params, gy)}
for f in fs.values():
    for _ in range(3):
        f()
r = {n: [] for n in fs}
items = list(fs.items())
for i in range(R):
    for n, f in items[i % 2:] + items[:i % 2]:
        t = time.perf_counter()
        f()
        r[n].append(time.perf_counter() - t)
o, s = r['one-conv'], r['seven-branch']
print(f"{C}@{H} {T} thread(s): one-conv min {min(o)*1e3:.2f} median {st.median(o)*1e3:.2f} ms, seven-branch min "
      f"{min(s)*1e3:.2f} median {st.median(s)*1e3:.2f} ms; ratio of medians {st.median(s)/st.median(o):.2f}x, "
      f"of minima {min(s)/min(o):.2f}x")
