"""The CUDA C++ kernels (csrc/cuda/*.cu) against the float64 references of reference.py.

Every check compares ||out - ref64|| / ||ref64|| (ref64: the reference evaluated in float64 on
the same inputs) with PyTorch's own error at the same precision (the reference evaluated in the
test dtype, i.e. cuBLAS/cuDNN with float32 accumulation): the kernel may be at most 4x worse,
or under a floor of two unit roundoffs of the dtype (the error of rounding the output once),
whichever is larger. Float32 floors sit far under that of any float16/bfloat16 computation, so a
kernel that silently computed in reduced precision would fail the float32 cases.

Outputs are checked for being fully written: before each call the caching allocator is handed
blocks of the output's size filled with NaN, so an element the kernel skipped shows up as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

from falconnet_kernels import _backend
from falconnet_kernels import reference as ref

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Two unit roundoffs for float16/bfloat16 (the relative error of rounding a result once, doubled);
# for float32, sqrt(n) unit roundoffs of the longest sums here (n ~ 5e4 terms of a weight gradient).
FLOOR = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}
FACTOR = 4.0

# (C_in, C_out, G, c_h, k, m): the default configs (r = 1, k nearest sqrt(C_out)) of the 8
# point-wise shapes of the benchmarks, then awkward ones: k not a multiple of 4, odd m, r > 1
# (c_h < k), m > 32, c_h = 1 - all of which take the generic kernels.
DEFAULT_CONFIGS = [
    (32, 128, 4, 8, 8, 16),
    (128, 32, 32, 4, 4, 8),
    (64, 256, 4, 16, 16, 16),
    (256, 64, 32, 8, 8, 8),
    (128, 512, 8, 16, 16, 32),
    (512, 128, 64, 8, 8, 16),
    (256, 1024, 8, 32, 32, 32),
    (1024, 256, 64, 16, 16, 16),
]
AWKWARD_CONFIGS = [
    (15, 14, 5, 2, 3, 7),
    (12, 24, 3, 4, 4, 6),
    (16, 80, 4, 2, 4, 40),
    (8, 8, 1, 1, 8, 8),
    (32, 64, 4, 8, 8, 8),  # fast (8, 8) kernel with G = 4
]


def ops():
    return torch.ops.falconnet_C


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert out.shape == expected.shape, (out.shape, expected.shape)
    diff = out.double() - expected.double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = expected.double().norm().item()
    return diff.norm().item() / max(denom, 1e-30)


def assert_close(name: str, out, low, exact, dtype):
    """out: kernel result; low: PyTorch at the same precision; exact: float64."""
    err = rel_err(out, exact)
    torch_err = rel_err(low, exact)
    tol = max(FACTOR * torch_err, FLOOR[dtype])
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} (PyTorch's own {torch_err:.3g}, {dtype})"


def poison(shape, dtype, count: int = 4):
    """Leave NaN-filled blocks of this size in the caching allocator for the next allocations."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for _ in range(count)]
    del blocks


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def expected_format(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@pytest.fixture(scope="module", autouse=True)
def _require_kernels():
    assert _backend.cuda_available("sf_conv") and _backend.cuda_available("dw_conv3x3"), (
        "a GPU is visible but the CUDA kernels are not built: rebuild the extension with the GPU visible or FORCE_CUDA=1"
    )


# ---------------------------------------------------------------------------------------------
# SF-Conv


def sf_inputs(cfg, N, H, W, dtype, layout, with_bias=True, with_residual=True):
    C_in, C_out, G, ch, k, m = cfg
    dev = "cuda"
    x = torch.randn(N, C_in, H, W, device=dev, dtype=torch.float64)
    w1 = torch.randn(G, ch, k, device=dev, dtype=torch.float64) / math.sqrt(k)
    w2 = torch.randn(ch, m, G, device=dev, dtype=torch.float64) / math.sqrt(G)
    b = torch.randn(C_out, device=dev, dtype=torch.float64) if with_bias else None
    r = torch.randn(N, C_out, H, W, device=dev, dtype=torch.float64) if with_residual else None
    # round the inputs to the dtype first, so that every computation sees the same values
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, w1, w2, b, r = (cast(t) for t in (x, w1, w2, b, r))
    x = to_layout(x, layout)
    r = None if r is None else to_layout(r, layout)
    return x, w1, w2, b, r


def d64(t):
    return None if t is None else t.double()


def check_sf_forward(cfg, N, H, W, dtype, layout, activation, with_bias, with_residual):
    x, w1, w2, b, r = sf_inputs(cfg, N, H, W, dtype, layout, with_bias, with_residual)
    poison((N, cfg[1], H, W), dtype)
    y = ops().sf_conv_forward(x, w1, w2, b, r, activation)
    assert y.dtype == dtype and y.shape == (N, cfg[1], H, W)
    assert y.is_contiguous(memory_format=expected_format(x))
    exact = ref.sf_conv_ref(x.double(), w1.double(), w2.double(), d64(b), d64(r), activation)
    low = ref.sf_conv_ref(x, w1, w2, b, r, activation)
    assert_close("y", y, low, exact, dtype)


# (activation, bias, residual) rotated over the parameter grid to keep the test count small.
EPILOGUES = [("relu6", True, True), ("none", False, False), ("relu", True, False), ("none", True, True)]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS + AWKWARD_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_sf_conv_forward(cfg, dtype, layout):
    i = (DEFAULT_CONFIGS + AWKWARD_CONFIGS).index(cfg) + DTYPES.index(dtype)
    activation, with_bias, with_residual = EPILOGUES[i % len(EPILOGUES)]
    # 2 x 11 x 13 = 286 pixels: several tiles, the last one partial, tiles not aligned to images
    check_sf_forward(cfg, 2, 11, 13, dtype, layout, activation, with_bias, with_residual)


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_sf_conv_forward_epilogues(activation):
    for with_bias in (False, True):
        for with_residual in (False, True):
            check_sf_forward(DEFAULT_CONFIGS[0], 3, 7, 9, torch.bfloat16, "channels_last", activation, with_bias, with_residual)


def check_sf_backward(cfg, N, H, W, dtype, layout, activation, with_bias, gy_layout=None):
    x, w1, w2, b, _ = sf_inputs(cfg, N, H, W, dtype, layout, with_bias, False)
    gy = to_layout(torch.randn(N, cfg[1], H, W, device="cuda", dtype=dtype), gy_layout or layout)
    poison(x.shape, dtype)
    gx, gw1, gw2, gb = ops().sf_conv_backward(gy, x, w1, w2, b, activation)
    assert gx.is_contiguous(memory_format=expected_format(x))
    assert gw1.dtype == dtype and gw2.dtype == dtype and gb.dtype == dtype
    exact = ref.sf_conv_backward_ref(gy.double(), x.double(), w1.double(), w2.double(), d64(b), activation)
    low = ref.sf_conv_backward_ref(gy, x, w1, w2, b, activation)
    for name, out, lo, ex in zip(("grad_x", "grad_w1", "grad_w2", "grad_bias"), (gx, gw1, gw2, gb), low, exact):
        assert out.shape == ex.shape, name
        assert_close(name, out, lo, ex, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS + AWKWARD_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_sf_conv_backward(cfg, dtype, layout):
    i = (DEFAULT_CONFIGS + AWKWARD_CONFIGS).index(cfg) + DTYPES.index(dtype)
    activation, with_bias, _ = EPILOGUES[i % len(EPILOGUES)]
    check_sf_backward(cfg, 2, 9, 7, dtype, layout, activation, with_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [DEFAULT_CONFIGS[0], DEFAULT_CONFIGS[7]], ids=lambda c: "x".join(map(str, c)))
def test_sf_conv_backward_large_reduction(cfg, dtype):
    # 8 x 56 x 56 = 25088 pixels (hundreds of tiles and blocks): the weight-gradient reduction
    # across blocks (atomics) must add every tile exactly once.
    N, H = (8, 56) if cfg[0] <= 64 else (2, 28)
    check_sf_backward(cfg, N, H, H, dtype, "channels_last", "relu", True)


# stage width (the narrower side of the point-wise conv) -> resolution at 224x224 input
BENCH_SIZES = {32: 56, 64: 28, 128: 14, 256: 7}


@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_sf_conv_benchmark_shapes(cfg):
    # The benchmarked case exactly (bf16, channels_last, batch 128 at the stage's resolution), so
    # the kernel variants, tiles and buffering the launcher picks are the ones that get timed.
    C_in, C_out = cfg[0], cfg[1]
    H = BENCH_SIZES[min(C_in, C_out)]
    check_sf_forward(cfg, 128, H, H, torch.bfloat16, "channels_last", "relu", True, True)
    check_sf_backward(cfg, 128, H, H, torch.bfloat16, "channels_last", "relu", True)


def test_sf_conv_mixed_layouts():
    # grad_y in the other layout than x; the kernel must index each in its own layout.
    check_sf_backward(DEFAULT_CONFIGS[0], 2, 6, 5, torch.bfloat16, "channels_last", "relu6", True, gy_layout="nchw")
    check_sf_backward(DEFAULT_CONFIGS[1], 2, 6, 5, torch.float32, "nchw", "none", False, gy_layout="channels_last")


def test_sf_conv_batch_zero():
    cfg = DEFAULT_CONFIGS[0]
    x, w1, w2, b, r = sf_inputs(cfg, 0, 5, 5, torch.bfloat16, "channels_last")
    y = ops().sf_conv_forward(x, w1, w2, b, r, "relu")
    assert y.shape == (0, cfg[1], 5, 5)
    gy = torch.randn(0, cfg[1], 5, 5, device="cuda", dtype=torch.bfloat16)
    gx, gw1, gw2, gb = ops().sf_conv_backward(gy, x, w1, w2, b, "relu")
    assert gx.shape == x.shape
    for g, w in ((gw1, w1), (gw2, w2)):
        assert g.shape == w.shape and not g.any()
    assert gb.shape == (cfg[1],) and not gb.any()


def test_sf_conv_bad_arguments():
    cfg = DEFAULT_CONFIGS[0]
    x, w1, w2, b, r = sf_inputs(cfg, 1, 4, 4, torch.float32, "nchw")
    with pytest.raises(RuntimeError, match="w1"):
        ops().sf_conv_forward(x, w1.cpu(), w2, b, r, "none")
    with pytest.raises(RuntimeError, match="w2"):
        ops().sf_conv_forward(x, w1, w2.half(), b, r, "none")
    with pytest.raises(RuntimeError, match="bias"):
        ops().sf_conv_forward(x, w1, w2, b[:-1], r, "none")
    with pytest.raises(RuntimeError, match="residual"):
        ops().sf_conv_forward(x, w1, w2, b, r[:, :-1], "none")
    with pytest.raises(RuntimeError, match="x must have C_in"):
        ops().sf_conv_forward(x[:, :-1], w1, w2, b, r, "none")
    with pytest.raises(RuntimeError, match="activation"):
        ops().sf_conv_forward(x, w1, w2, b, r, "gelu")
    with pytest.raises(RuntimeError, match="grad_y"):
        ops().sf_conv_backward(r[:, :-1], x, w1, w2, b, "none")


def test_sf_conv_public_op_autograd(monkeypatch):
    # Through torch.ops.falconnet.sf_conv with the CUDA backend forced: forward and autograd.
    monkeypatch.setenv("FALCONNET_BACKEND", "cuda")
    import falconnet_kernels

    cfg = DEFAULT_CONFIGS[2]
    x, w1, w2, b, r = sf_inputs(cfg, 2, 6, 6, torch.float32, "channels_last")
    leaves = [t.detach().requires_grad_() for t in (x, w1, w2, b, r)]
    y = falconnet_kernels.sf_conv(*leaves, activation="relu")
    gy = torch.randn_like(y)
    y.backward(gy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w1, w2, b, r)]
    y64 = ref.sf_conv_ref(*leaves64, activation="relu")
    y64.backward(gy.double())
    assert rel_err(y, y64) < 1e-5
    for name, a, e in zip(("x", "w1", "w2", "bias", "residual"), leaves, leaves64):
        assert rel_err(a.grad, e.grad) < 1e-5, name


# ---------------------------------------------------------------------------------------------
# Depthwise 3x3


def dw_inputs(N, C, H, W, dtype, layout, with_bias):
    x = to_layout(torch.randn(N, C, H, W, device="cuda", dtype=torch.float64).to(dtype), layout)
    w = (torch.randn(C, 1, 3, 3, device="cuda", dtype=torch.float64) / 3).to(dtype)
    b = torch.randn(C, device="cuda", dtype=torch.float64).to(dtype) if with_bias else None
    return x, w, b


# (N, C, H, W): C = 16/32/64 take the 16-byte-vector path in channels_last, C = 12 (bf16/f16)
# and 6 do not; odd and even spatial sizes (stride-2 edges), a 1-pixel-wide image.
DW_SHAPES = [(2, 16, 9, 10), (2, 32, 8, 7), (1, 64, 5, 5), (3, 12, 7, 6), (2, 6, 4, 9), (1, 8, 3, 1)]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dw_conv3x3(shape, stride, dtype, layout):
    i = DW_SHAPES.index(shape) + stride + DTYPES.index(dtype)
    activation, with_bias, _ = EPILOGUES[i % len(EPILOGUES)]
    N, C, H, W = shape
    x, w, b = dw_inputs(N, C, H, W, dtype, layout, with_bias)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    poison((N, C, Ho, Wo), dtype)
    y = ops().dw_conv3x3_forward(x, w, b, stride, activation)
    assert y.is_contiguous(memory_format=expected_format(x))
    exact = ref.dw_conv3x3_ref(x.double(), w.double(), d64(b), stride, activation)
    low = ref.dw_conv3x3_ref(x, w, b, stride, activation)
    assert_close("y", y, low, exact, dtype)

    gy = to_layout(torch.randn(N, C, Ho, Wo, device="cuda", dtype=dtype), layout)
    poison(x.shape, dtype)
    gx, gw, gb = ops().dw_conv3x3_backward(gy, x, w, b, stride, activation)
    assert gx.is_contiguous(memory_format=expected_format(x))
    exact = ref.dw_conv3x3_backward_ref(gy.double(), x.double(), w.double(), d64(b), stride, activation)
    low = ref.dw_conv3x3_backward_ref(gy, x, w, b, stride, activation)
    for name, out, lo, ex in zip(("grad_x", "grad_weight", "grad_bias"), (gx, gw, gb), low, exact):
        assert out.shape == ex.shape and out.dtype == dtype, name
        assert_close(name, out, lo, ex, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_dw_conv3x3_large_reduction(stride, dtype):
    # 16 x 56 x 56 pixels of 128 channels: many blocks add into grad_weight / grad_bias.
    x, w, b = dw_inputs(16, 128, 56, 56, dtype, "channels_last", True)
    gy = torch.randn(16, 128, 56 // stride, 56 // stride, device="cuda", dtype=dtype)
    gy = to_layout(gy, "channels_last")
    gx, gw, gb = ops().dw_conv3x3_backward(gy, x, w, b, stride, "relu")
    exact = ref.dw_conv3x3_backward_ref(gy.double(), x.double(), w.double(), b.double(), stride, "relu")
    low = ref.dw_conv3x3_backward_ref(gy, x, w, b, stride, "relu")
    for name, out, lo, ex in zip(("grad_x", "grad_weight", "grad_bias"), (gx, gw, gb), low, exact):
        assert_close(name, out, lo, ex, dtype)


@pytest.mark.parametrize("C,H", [(128, 56), (256, 28), (512, 14), (1024, 7)], ids=lambda v: str(v))
def test_dw_conv3x3_benchmark_shapes(C, H):
    # The benchmarked case (bf16, channels_last, batch 128, the hidden widths of the 4 stages), so
    # the launch configuration under test is the one that gets timed.
    x, w, b = dw_inputs(128, C, H, H, torch.bfloat16, "channels_last", True)
    y = ops().dw_conv3x3_forward(x, w, b, 1, "relu6")
    exact = ref.dw_conv3x3_ref(x.double(), w.double(), b.double(), 1, "relu6")
    assert_close("y", y, ref.dw_conv3x3_ref(x, w, b, 1, "relu6"), exact, torch.bfloat16)
    gy = to_layout(torch.randn_like(y), "channels_last")
    out = ops().dw_conv3x3_backward(gy, x, w, b, 1, "relu6")
    exact = ref.dw_conv3x3_backward_ref(gy.double(), x.double(), w.double(), b.double(), 1, "relu6")
    low = ref.dw_conv3x3_backward_ref(gy, x, w, b, 1, "relu6")
    for name, o, lo, ex in zip(("grad_x", "grad_weight", "grad_bias"), out, low, exact):
        assert_close(name, o, lo, ex, torch.bfloat16)


def test_dw_conv3x3_mixed_layouts_and_batch_zero():
    x, w, b = dw_inputs(2, 16, 6, 6, torch.bfloat16, "channels_last", True)
    gy = torch.randn(2, 16, 6, 6, device="cuda", dtype=torch.bfloat16)  # NCHW while x is channels_last
    gx, gw, gb = ops().dw_conv3x3_backward(gy, x, w, b, 1, "relu6")
    exact = ref.dw_conv3x3_backward_ref(gy.double(), x.double(), w.double(), b.double(), 1, "relu6")
    low = ref.dw_conv3x3_backward_ref(gy, x, w, b, 1, "relu6")
    for name, out, lo, ex in zip(("grad_x", "grad_weight", "grad_bias"), (gx, gw, gb), low, exact):
        assert_close(name, out, lo, ex, torch.bfloat16)

    x0 = x[:0]
    y0 = ops().dw_conv3x3_forward(x0, w, b, 2, "none")
    assert y0.shape == (0, 16, 3, 3)
    gx0, gw0, gb0 = ops().dw_conv3x3_backward(y0, x0, w, b, 2, "none")
    assert gx0.shape == x0.shape and gw0.shape == w.shape and not gw0.any() and not gb0.any()


def test_dw_conv3x3_bad_arguments():
    x, w, b = dw_inputs(1, 8, 4, 4, torch.float32, "nchw", True)
    with pytest.raises(RuntimeError, match="weight"):
        ops().dw_conv3x3_forward(x, w[:4], b, 1, "none")
    with pytest.raises(RuntimeError, match="weight"):
        ops().dw_conv3x3_forward(x, w.half(), b, 1, "none")
    with pytest.raises(RuntimeError, match="bias"):
        ops().dw_conv3x3_forward(x, w, b.cpu(), 1, "none")
    with pytest.raises(RuntimeError, match="stride"):
        ops().dw_conv3x3_forward(x, w, b, 3, "none")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ops().dw_conv3x3_forward(x.cpu(), w, b, 1, "none")
