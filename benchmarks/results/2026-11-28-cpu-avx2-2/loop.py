import sys, os, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); import build  # noqa: E402
import falconnet_kernels
torch.set_num_threads(2)
ns = sys.argv[1]
op = torch.ops.falconnet_C if ns == 'old' else build.get('/work/main/csrc/cpu/repso_moments.cpp', ns)
N, C, H = [int(v) for v in sys.argv[2].split(',')]
torch.manual_seed(0)
x = (torch.randn(N, C, H, H) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
gy = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
mean, cov = torch.ops.falconnet_C.repso_moments_forward(x, 3)
gm, gc = torch.randn(C, 9) * 0.1, torch.randn(C, 9, 9) * 0.01
w = torch.randn(C, 1, 3, 3)
for _ in range(int(sys.argv[3])): op.repso_train_backward_x(gm, gc, x, mean, gy, w)
