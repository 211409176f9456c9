"""SF-Conv pair vs the dense 1x1 conv it replaces, per point-wise shape of SPEC section 6.

Implementations, side by side in one run: the fused op on each built backend ("falconnet-cpp",
"falconnet-cuda", "falconnet-triton"), the dense nn.Conv2d 1x1 (cuDNN / oneDNN: "dense"), and
SF-Conv in plain PyTorch as grouped conv + channel shuffle + grouped conv ("sf-torch"); on a GPU
also the Triton backend's two forms, each forced for every shape and pass: the composed-weight
GEMM ("falconnet-triton-gemm", falconnet_kernels/triton_sf_gemm.py) and the two-stage kernel
("falconnet-triton-two-stage", triton_sf_conv.py). "falconnet-triton" is the op as routed
(triton_sf_gemm.COMPOSED).
GPU: bfloat16, channels_last, batch 128. CPU: float32, batch 16, channels_last and NCHW.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from common import BATCH, DTYPE, PW_SHAPES, cuda_sync_timer, fused_impls, run_benchmark

import falconnet_kernels
from falconnet.layers import SFConv2d


def sf_torch(x, w1, w2):
    """SF-Conv as the paper's layers: grouped 1x1 conv, shuffle (G, c_h), grouped 1x1 conv."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    N, _, H, W = x.shape
    h = F.conv2d(x, w1.reshape(G * c_h, k, 1, 1), groups=G)  # channels g*c_h + j
    h = h.view(N, G, c_h, H, W).transpose(1, 2).reshape(N, c_h * G, H, W)  # channels j*G + g
    return F.conv2d(h, w2.reshape(c_h * m, G, 1, 1), groups=c_h)


def impls(device: str) -> list[str]:
    return ["dense", "sf-torch"] + fused_impls("sf_conv", device)


LAYOUTS = {"cuda": ["channels_last"], "cpu": ["channels_last", "nchw"]}


def _case(device, impl, shape, layout, train):
    C_in, C_out, H = shape
    N, dtype = BATCH[device], DTYPE[device]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layer = SFConv2d(C_in, C_out)
    w1 = layer.weight1.detach().to(device, dtype).requires_grad_(train)
    w2 = layer.weight2.detach().to(device, dtype).requires_grad_(train)
    x = torch.randn(N, C_in, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(train)
    G, c_h, k = w1.shape
    P = N * H * H
    elem = x.element_size()
    if impl == "dense":
        wd = falconnet_kernels.sf_conv_dense_weight(w1.detach(), w2.detach())[:, :, None, None]
        wd = wd.contiguous(memory_format=fmt).requires_grad_(train)
        params, forward = (x, wd), (lambda: F.conv2d(x, wd))
        macs = P * C_in * C_out
    elif impl == "falconnet-triton-gemm":
        params = (x, w1, w2)
        forward = lambda: falconnet_kernels.sf_conv(x, w1, w2)  # noqa: E731
        macs = P * C_in * C_out  # the composed weight's dense product (+ C_in*C_out to compose it)
    else:
        params = (x, w1, w2)
        forward = (lambda: sf_torch(x, w1, w2)) if impl == "sf-torch" else (lambda: falconnet_kernels.sf_conv(x, w1, w2))
        macs = P * (C_in * c_h + C_out * G)
    if train:
        gy = torch.randn(N, C_out, H, H, device=device, dtype=dtype).contiguous(memory_format=fmt)

        def fn():
            return torch.autograd.grad(forward(), params, gy)

        bytes_min = P * (3 * C_in + 2 * C_out) * elem  # fwd: x, y; bwd: grad_y, x, grad_x
        flops = 3 * 2 * macs
    else:

        def fn():
            with torch.no_grad():
                return forward()

        bytes_min = P * (C_in + C_out) * elem
        flops = 2 * macs
    info = {
        "op": "sf_conv", "pass": "fwd+bwd" if train else "fwd", "impl": impl, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "layout": layout, "batch": N,
        "shape": f"{C_in}->{C_out}@{H}", "sf_config": {"G": G, "c_h": c_h, "k": k, "m": w2.shape[1]},
        "bytes_min": bytes_min, "flops": flops,
    }
    backend = impl.split("-")[1] if impl.startswith("falconnet-") and impl != "falconnet-cpp" else None
    if impl in ROUTES:
        inner = fn

        def fn():
            with _routes(ROUTES[impl]):
                return inner()

    return fn, info, backend


# the Triton backend's form forced for every shape and both passes (the routing happens at call
# time, inside the timed function, so forward and backward both follow it)
ROUTES = {"falconnet-triton-gemm": {("*", "*", "forward"), ("*", "*", "backward")},
          "falconnet-triton-two-stage": set()}


@contextlib.contextmanager
def _routes(routes):
    from falconnet_kernels import triton_sf_gemm

    saved = triton_sf_gemm.COMPOSED
    triton_sf_gemm.COMPOSED = routes
    try:
        yield
    finally:
        triton_sf_gemm.COMPOSED = saved


@pytest.mark.benchmark(group="sf_conv", timer=cuda_sync_timer)
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", PW_SHAPES, ids=[f"{a}-{b}@{h}" for a, b, h in PW_SHAPES])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("impl", ["dense", "sf-torch", "falconnet-cpp", "falconnet-cuda", "falconnet-triton",
                                  "falconnet-triton-gemm", "falconnet-triton-two-stage"])
def test_sf_conv(benchmark, device, impl, shape, layout, train):
    if impl in ROUTES:
        if device != "cuda" or "falconnet-triton" not in impls(device) or layout not in LAYOUTS[device]:
            pytest.skip("the Triton backend's forms are timed apart on a GPU only")
    elif impl not in impls(device) or layout not in LAYOUTS[device]:
        pytest.skip(f"{impl} / {layout} is not benchmarked on {device}")
    fn, info, backend = _case(device, impl, shape, layout, train)
    # on CPU also timed alternately with the dense conv (run_benchmark's paired ratio)
    paired = _case(device, "dense", shape, layout, train)[0] if device == "cpu" and impl != "dense" else None
    run_benchmark(benchmark, fn, device, info, backend=backend, paired=paired)
