# alternated A/B: HEAD's dw_conv3x3 forward (dwold) vs the working tree's (dwnew) [vs oneDNN]
# python ab2.py N HW C [stride] [threads] [rounds]
import sys, time, statistics, torch
sys.path.insert(0, '/tmp/dwdev'); import build
a = sys.argv
N, HW, C = int(a[1]), int(a[2]), int(a[3]); S = int(a[4]) if len(a) > 4 else 1
torch.set_num_threads(int(a[5]) if len(a) > 5 else 2); R = int(a[6]) if len(a) > 6 else 25
old = build.get('/tmp/dwdev/dw_old.cpp', 'dwold'); new = build.get('/work/main/csrc/cpu/dw_conv3x3.cpp', 'dwnew')
x = torch.randn(N, C, HW, HW).to(memory_format=torch.channels_last)
w = torch.randn(C, 1, 3, 3); b = torch.randn(C)
conv = torch.nn.Conv2d(C, C, 3, S, 1, groups=C).to(memory_format=torch.channels_last)
ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), S, 1, 1, C))
for k, op in (("old", old), ("new", new)):
    y = op.dw_conv3x3_forward(x, w, b, S, "relu")
    err = (y.double() - ref).abs().max().item(); assert err < 1e-4, (k, err)
fs = {"old": lambda: old.dw_conv3x3_forward(x, w, b, S, "relu"), "new": lambda: new.dw_conv3x3_forward(x, w, b, S, "relu"),
      "dnn": lambda: torch.relu(conv(x))}
ts = {k: [] for k in fs}
with torch.no_grad():
    for r in range(R):
        for k, f in (fs.items() if r % 2 else list(fs.items())[::-1]):
            t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
rat = statistics.median([n / o for n, o in zip(ts["new"], ts["old"])])
rd = statistics.median([d / n for n, d in zip(ts["new"], ts["dnn"])])
print(f"N={N} {C}@{HW} s{S} t{torch.get_num_threads()}: old {min(ts['old'])*1e3:.3f} new {min(ts['new'])*1e3:.3f} dnn {min(ts['dnn'])*1e3:.3f} ms (min); new/old {rat:.3f}, dnn/new {rd:.2f} (median of per-round ratios)")
