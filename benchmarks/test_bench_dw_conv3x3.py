"""The folded RepSO depthwise 3x3 conv vs nn.Conv2d depthwise (cuDNN / oneDNN), at the hidden
widths of SPEC section 6, stride 1. GPU: bfloat16 channels_last batch 128; CPU: float32 batch 16."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from common import BATCH, DTYPE, DW_SHAPES, cuda_sync_timer, fused_impls, run_benchmark

import falconnet_kernels


def impls(device: str) -> list[str]:
    return ["torch-dw"] + fused_impls("dw_conv3x3", device)


@pytest.mark.benchmark(group="dw_conv3x3", timer=cuda_sync_timer)
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"{c}@{h}" for c, h in DW_SHAPES])
@pytest.mark.parametrize("impl", ["torch-dw", "falconnet-cpp", "falconnet-cuda", "falconnet-triton"])
def test_dw_conv3x3(benchmark, device, impl, shape, train):
    if impl not in impls(device):
        pytest.skip(f"{impl} is not benchmarked on {device}")
    C, H = shape
    N, dtype = BATCH[device], DTYPE[device]
    x = torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, 3, 3, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    x.requires_grad_(train), w.requires_grad_(train), b.requires_grad_(train)
    torch_dw = lambda: F.relu(F.conv2d(x, w, b, padding=1, groups=C))  # noqa: E731
    if impl == "torch-dw":
        forward = torch_dw
    else:
        forward = lambda: falconnet_kernels.dw_conv3x3(x, w, b, 1, "relu")  # noqa: E731
    P, elem = N * H * H, x.element_size()
    if train:
        gy = torch.randn_like(x)

        def fn(forward=forward):
            return torch.autograd.grad(forward(), (x, w, b), gy)

        bytes_min, flops = P * C * 5 * elem, 3 * 2 * 9 * P * C  # fwd: x, y; bwd: grad_y, x, grad_x
    else:

        def fn(forward=forward):
            with torch.no_grad():
                return forward()

        bytes_min, flops = 2 * P * C * elem, 2 * 9 * P * C
    info = {
        "op": "dw_conv3x3", "pass": "fwd+bwd" if train else "fwd", "impl": impl, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last", "batch": N,
        "shape": f"{C}@{H}", "bytes_min": bytes_min, "flops": flops,
    }
    backend = impl.split("-")[1] if impl in ("falconnet-cuda", "falconnet-triton") else None
    # on CPU also timed alternately with PyTorch's depthwise conv (run_benchmark's paired ratio)
    paired = functools.partial(fn, forward=torch_dw) if device == "cpu" and impl != "torch-dw" else None
    run_benchmark(benchmark, fn, device, info, backend=backend, paired=paired)
