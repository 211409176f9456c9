import sys, time, statistics, torch
sys.path.insert(0, '/tmp/dwdev'); import build
torch.set_num_threads(2)
new = build.get('/work/main/csrc/cpu/dw_conv3x3.cpp', 'dwnew2')
import falconnet_kernels  # noqa: loads falconnet_C
a = sys.argv; N, HW, C = int(a[1]), int(a[2]), int(a[3])
x = torch.randn(N, C, HW, HW).to(memory_format=torch.channels_last); w = torch.randn(C, 1, 3, 3); b = torch.randn(C)
fs = {"cl3": lambda: torch.ops.falconnet_C.dw_conv3x3_forward(x, w, b, 1, "relu"), "rows": lambda: new.dw_conv3x3_forward(x, w, b, 1, "relu")}
assert torch.allclose(fs["cl3"](), fs["rows"](), atol=1e-5)
ts = {k: [] for k in fs}
for r in range(30):
    for k, f in (fs.items() if r % 2 else list(fs.items())[::-1]):
        t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
print(f"N={N} {C}@{HW}: cl3 {min(ts['cl3'])*1e3:.3f} rows {min(ts['rows'])*1e3:.3f} ms; rows/cl3 {statistics.median([p/q for p,q in zip(ts['rows'], ts['cl3'])]):.3f}")
