"""The public ops torch.ops.falconnet.{sf_conv, dw_conv3x3} on every backend the machine has.

Each backend runs through the public Python face (falconnet_kernels.sf_conv / dw_conv3x3), so the
dispatch, the autograd registration and the kernel are tested together, forward and backward.

Tolerances (flash-attention's idiom): the inputs are rounded to the test dtype once, and the
reference is the float64 PyTorch computation on those same rounded values. A backend's error
against it must stay within twice the error of PyTorch's own reference computed in the test
dtype, plus a few units of rounding at the result's scale (the kernels sum in another order):

    |out - ref64| <= 2 * |ref_in_dtype - ref64| + ROUNDING_UNITS * finfo(dtype).eps * max|ref64|
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import falconnet_kernels as fk
from falconnet_kernels import _backend
from falconnet_kernels import reference as ref

# Rounding units of slack on top of 2x PyTorch's error: the kernels' reductions (up to a few
# hundred terms here) run in another order than PyTorch's, which costs a few ulps at the result's
# scale; in float64 PyTorch's "own error" is 0, so this term is the whole tolerance there.
ROUNDING_UNITS = 16

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the GPU cases list theirs (float16 too)

# (device, backend): on CPU "cpp" is the default when the extension is built; the others are
# forced with FALCONNET_BACKEND.
BACKENDS = [
    pytest.param(("cpu", "cpp"), id="cpu-cpp"),
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.cuda),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param(("cuda", "torch"), id="cuda-torch", marks=pytest.mark.cuda),
]

CPU_BACKENDS = ("cpp", "torch")
CUDA_BACKENDS = ("cuda", "triton", "torch")

# (C_in, G, c_h, k, C_out), each with an awkward image size.
SF_CONFIGS = [
    pytest.param((32, 4, 8, 8, 128), (7, 5), id="32x128-k8"),
    pytest.param((128, 32, 4, 4, 32), (13, 9), id="128x32-k4"),
    pytest.param((12, 3, 2, 4, 10), (7, 5), id="12x10-odd"),
    pytest.param((64, 4, 16, 16, 256), (13, 9), id="64x256-k16"),
]

# (activation, bias, residual)
EPILOGUES = [
    pytest.param(("none", False, False), id="plain"),
    pytest.param(("relu", True, False), id="bias-relu"),
    pytest.param(("relu6", True, True), id="bias-relu6-res"),
]

LAYOUTS = ("nchw", "channels_last", "sliced")


def _use_backend(monkeypatch, device: str, backend: str, op: str) -> None:
    """Make `backend` the one that runs `op` on `device`, or skip when it is not built here."""
    if backend == "cpp":
        if not _backend.cpp_available(op):
            pytest.skip(f"the C++ CPU kernels are not built ({_backend._ext_error})")
        monkeypatch.delenv("FALCONNET_BACKEND", raising=False)
    else:
        if backend == "cuda" and not _backend.cuda_available(op):
            pytest.skip("the CUDA kernels are not built")
        if backend == "triton":
            if _backend.triton_version() is None:
                pytest.skip("triton cannot be imported")
            # one launch config per shape: autotuning is covered by the Triton kernels' own tests
            # and would multiply the compile time of this matrix
            monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
        monkeypatch.setenv("FALCONNET_BACKEND", backend)
    assert fk.backend_for(op, device) == backend


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t, stored NCHW-contiguous, channels_last, or as a non-contiguous slice."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    N, C, H, W = t.shape
    big = t.new_zeros(N, C, H, W + 3)
    view = big[..., 1 : W + 1]
    view.copy_(t)
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


def _assert_close_to_ref(name, out, ref64, pt, dtype, units=ROUNDING_UNITS):
    """|out - ref64| <= 2 |pt - ref64| + units * eps(dtype) * max|ref64| (see module doc)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    err = (out.double().cpu() - ref64.cpu()).abs().max().item()
    pt_err = (pt.double().cpu() - ref64.cpu()).abs().max().item()
    scale = ref64.abs().max().item()
    tol = 2 * pt_err + units * torch.finfo(dtype).eps * scale
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e} (PyTorch's own {pt_err:.3e}, scale {scale:.3e})"


def _run_with_grads(fn, tensors, grad_out):
    """fn(*tensors) and the gradients of <out, grad_out> w.r.t. every tensor that is not None."""
    leaves = [_leaf(t) for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [None if t is None else t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------
# sf_conv against the float64 reference


def _sf_inputs(config, hw, dtype, device, bias, residual, batch=2, seed=0):
    C_in, G, c_h, k, C_out = config
    H, W = hw
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C_in, H, W, generator=gen, dtype=torch.float64)
    w1 = torch.randn(G, c_h, k, generator=gen, dtype=torch.float64) / k**0.5
    w2 = torch.randn(c_h, C_out // c_h, G, generator=gen, dtype=torch.float64) / G**0.5
    b = torch.randn(C_out, generator=gen, dtype=torch.float64) if bias else None
    r = torch.randn(batch, C_out, H, W, generator=gen, dtype=torch.float64) if residual else None
    gy = torch.randn(batch, C_out, H, W, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (x, w1, w2, b, r)], cast(gy)


def _check_sf_conv(device, config, hw, epilogue, layout, dtype, batch=2, residual_layout=None, units=ROUNDING_UNITS):
    activation, bias, residual = epilogue
    (x, w1, w2, b, r), gy = _sf_inputs(config, hw, dtype, device, bias, residual, batch=batch)
    x = _in_layout(x, layout)
    # by default the residual in the other memory format than x, to cover mixed layouts
    if r is not None:
        r = _in_layout(r, residual_layout or ("nchw" if layout == "channels_last" else "channels_last"))

    def op(x, w1, w2, b, r):
        return fk.sf_conv(x, w1, w2, b, r, activation)

    def reference(x, w1, w2, b, r):
        return ref.sf_conv_ref(x, w1, w2, b, r, activation)

    out, grads = _run_with_grads(op, (x, w1, w2, b, r), gy)
    f64 = [None if t is None else t.double() for t in (x, w1, w2, b, r)]
    out64, grads64 = _run_with_grads(reference, f64, gy.double())
    out_pt, grads_pt = _run_with_grads(reference, (x, w1, w2, b, r), gy)

    expect_cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    _assert_close_to_ref(f"{dtype} y", out, out64, out_pt, dtype, units)
    names = ("grad_x", "grad_w1", "grad_w2", "grad_bias", "grad_residual")
    for name, g, g64, gpt in zip(names, grads, grads64, grads_pt):
        if g64 is not None:
            _assert_close_to_ref(f"{dtype} {name}", g, g64, gpt, dtype, units)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("config,hw", SF_CONFIGS)
def test_sf_conv_cpp_matches_float64_reference(monkeypatch, config, hw, epilogue, layout):
    _use_backend(monkeypatch, "cpu", "cpp", "sf_conv")
    for dtype in CPU_DTYPES:
        _check_sf_conv("cpu", config, hw, epilogue, layout, dtype)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_sf_conv_cpp_chunks_of_many_tiles(monkeypatch, layout):
    """With 16 images of 13x11 pixels each thread's chunks hold several tiles and cross images: NCHW
    super-tiles (several tiles of every channel row, rows of 572 bytes, not line-aligned) span image
    boundaries and chunk ends, and channels_last tiles (and a channels_last residual's) are prefetched
    ahead within a chunk (the first one or two of each chunk not). Small tests run one-tile chunks
    only."""
    _use_backend(monkeypatch, "cpu", "cpp", "sf_conv")
    config = (128, 32, 4, 4, 32)
    for dtype in CPU_DTYPES:
        _check_sf_conv("cpu", config, (13, 11), ("relu6", True, True), layout, dtype, batch=16)
        _check_sf_conv("cpu", config, (13, 11), ("none", False, True), layout, dtype, batch=16, residual_layout=layout)
        _check_sf_conv("cpu", config, (13, 11), ("none", False, False), layout, dtype, batch=16)
    # AVX-512 builds spread the prefetch only when x and y outgrow a quarter of the L3 (8 MB here:
    # 8 images of 45x43 are 9.9 MB in float32); tiles then also cross the images' ends. The weight
    # gradients sum 15,480 pixels, ~50x the few hundred ROUNDING_UNITS is sized for, and a sum's
    # rounding error grows like the square root of its length: 7x the slack.
    for dtype in (torch.float32, torch.float64):
        _check_sf_conv("cpu", config, (45, 43), ("relu", True, True), layout, dtype, batch=8, residual_layout=layout,
                       units=7 * ROUNDING_UNITS)


# The torch backend is the reference itself: one epilogue (the fullest) checks its dispatch and
# its written-out backward (reference.sf_conv_backward_ref) against autograd in float64.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config,hw", SF_CONFIGS)
def test_sf_conv_torch_backend_matches_float64_reference(monkeypatch, config, hw, layout):
    _use_backend(monkeypatch, "cpu", "torch", "sf_conv")
    for dtype in CPU_DTYPES:
        _check_sf_conv("cpu", config, hw, ("relu6", True, True), layout, dtype)


# On the GPU every new shape, flag set and dtype compiles new Triton kernels, so the GPU matrix
# is a short list that still covers each config, epilogue, layout and dtype once.
SF_CUDA_CASES = [
    pytest.param((32, 4, 8, 8, 128), (7, 5), ("relu6", True, True), "channels_last", torch.bfloat16, id="32x128-res-cl-bf16"),
    pytest.param((128, 32, 4, 4, 32), (13, 9), ("relu", True, False), "nchw", torch.float16, id="128x32-relu-nchw-f16"),
    pytest.param((12, 3, 2, 4, 10), (7, 5), ("none", False, False), "sliced", torch.float32, id="12x10-sliced-f32"),
    pytest.param((64, 4, 16, 16, 256), (13, 9), ("relu6", True, True), "nchw", torch.float32, id="64x256-res-nchw-f32"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("config,hw,epilogue,layout,dtype", SF_CUDA_CASES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_sf_conv_matches_float64_reference_cuda(monkeypatch, backend, config, hw, epilogue, layout, dtype):
    _use_backend(monkeypatch, "cuda", backend, "sf_conv")
    _check_sf_conv("cuda", config, hw, epilogue, layout, dtype)


@pytest.mark.parametrize("device_backend", BACKENDS)
def test_sf_conv_batch_zero(monkeypatch, device_backend):
    device, backend = device_backend
    _use_backend(monkeypatch, device, backend, "sf_conv")
    (x, w1, w2, b, r), gy = _sf_inputs((32, 4, 8, 8, 128), (7, 5), torch.float32, device, True, True, batch=0)
    for layout in ("nchw", "channels_last"):
        out, (gx, gw1, gw2, gb, gr) = _run_with_grads(
            lambda *a: fk.sf_conv(*a, "relu"), (_in_layout(x, layout), w1, w2, b, r), gy
        )
        assert out.shape == (0, 128, 7, 5)
        assert gx.shape == x.shape
        for g in (gw1, gw2, gb):
            assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# dw_conv3x3 against the float64 reference

# (N, C, H, W, bias)
DW_SHAPES = [
    pytest.param((2, 24, 13, 9, True), id="24ch-13x9-bias"),
    pytest.param((1, 80, 8, 8, False), id="80ch-8x8"),  # 80 = one full 64-channel block + a tail
    # C a multiple of 16: channels_last stride 1 takes the one-pass backward (csrc/cpu/repso_moments.cpp)
    pytest.param((3, 32, 7, 5, True), id="32ch-7x5-bias"),
    # a map 1 pixel high: both neighbouring input rows lie outside the image
    pytest.param((2, 16, 1, 3, False), id="16ch-1x3"),
    pytest.param((2, 48, 9, 10, True), id="48ch-9x10-bias"),
    # the channels_last row kernel's pixel blocks: rows of 31 = 8 + 8 + 8 + 7 output pixels (stride 1)
    # and 16 = 8 + 8 (stride 2), a first block crossing the left edge and full blocks inside; a last
    # block crossing the right edge at 9x10 (8 + 2), 13x9 (8 + 1) and the small maps; a bottom row of
    # stride 2 inside the image
    pytest.param((2, 16, 6, 31, True), id="16ch-6x31-bias"),
    # a last block of 6 pixels: 14 = 8 + 6 at stride 1, and 14 output pixels = 8 + 6 at stride 2 from
    # 27 columns (27 = 8 + 8 + 8 + 3 at stride 1)
    pytest.param((1, 16, 3, 14, False), id="16ch-3x14"),
    pytest.param((1, 16, 4, 27, True), id="16ch-4x27-bias"),
]


def _check_dw_conv3x3(device, shape, stride, activation, layout, dtype):
    N, C, H, W, bias = shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, 3, 3, generator=gen, dtype=torch.float64) / 3
    b = torch.randn(C, generator=gen, dtype=torch.float64) if bias else None
    gy = torch.randn(N, C, Ho, Wo, generator=gen, dtype=torch.float64)
    x, w, b, gy = (None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, gy))
    x = _in_layout(x, layout)

    out, grads = _run_with_grads(lambda x, w, b: fk.dw_conv3x3(x, w, b, stride, activation), (x, w, b), gy)

    def reference(x, w, b):
        return ref.dw_conv3x3_ref(x, w, b, stride, activation)

    f64 = [None if t is None else t.double() for t in (x, w, b)]
    out64, grads64 = _run_with_grads(reference, f64, gy.double())
    out_pt, grads_pt = _run_with_grads(reference, (x, w, b), gy)

    expect_cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    _assert_close_to_ref(f"{dtype} y", out, out64, out_pt, dtype)
    for name, g, g64, gpt in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads64, grads_pt):
        if g64 is not None:
            _assert_close_to_ref(f"{dtype} {name}", g, g64, gpt, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("shape", DW_SHAPES)
def test_dw_conv3x3_cpp_matches_float64_reference(monkeypatch, shape, stride, activation, layout):
    _use_backend(monkeypatch, "cpu", "cpp", "dw_conv3x3")
    for dtype in CPU_DTYPES:
        _check_dw_conv3x3("cpu", shape, stride, activation, layout, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("shape", DW_SHAPES)
def test_dw_conv3x3_torch_backend_matches_float64_reference(monkeypatch, shape, stride, layout):
    _use_backend(monkeypatch, "cpu", "torch", "dw_conv3x3")
    for dtype in CPU_DTYPES:
        _check_dw_conv3x3("cpu", shape, stride, "relu6", layout, dtype)


DW_CUDA_CASES = [
    pytest.param((2, 24, 13, 9, True), 1, "relu", "channels_last", torch.bfloat16, id="s1-relu-cl-bf16"),
    pytest.param((1, 80, 8, 8, False), 2, "relu6", "nchw", torch.float32, id="s2-relu6-nchw-f32"),
    pytest.param((2, 24, 13, 9, True), 2, "none", "sliced", torch.float16, id="s2-sliced-f16"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("shape,stride,activation,layout,dtype", DW_CUDA_CASES)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_dw_conv3x3_matches_float64_reference_cuda(monkeypatch, backend, shape, stride, activation, layout, dtype):
    _use_backend(monkeypatch, "cuda", backend, "dw_conv3x3")
    _check_dw_conv3x3("cuda", shape, stride, activation, layout, dtype)


@pytest.mark.parametrize("device_backend", BACKENDS)
def test_dw_conv3x3_batch_zero(monkeypatch, device_backend):
    device, backend = device_backend
    _use_backend(monkeypatch, device, backend, "dw_conv3x3")
    x = torch.randn(0, 8, 9, 7, device=device)
    w = torch.randn(8, 1, 3, 3, device=device)
    b = torch.randn(8, device=device)
    for stride in (1, 2):
        for layout in ("nchw", "channels_last"):
            out, (gx, gw, gb) = _run_with_grads(
                lambda x, w, b: fk.dw_conv3x3(x, w, b, stride, "relu"),
                (_in_layout(x, layout), w, b),
                torch.zeros(0, 8, (9 - 1) // stride + 1, (7 - 1) // stride + 1, device=device),
            )
            assert out.shape == (0, 8, (9 - 1) // stride + 1, (7 - 1) // stride + 1)
            assert gx.shape == x.shape
            assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, CPU) and opcheck

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_sf_conv_gradcheck(monkeypatch, backend, layout):
    _use_backend(monkeypatch, "cpu", backend, "sf_conv")
    (x, w1, w2, b, r), _ = _sf_inputs((12, 3, 2, 4, 10), (3, 4), torch.float64, "cpu", True, True, batch=1)
    x = _in_layout(x, layout)
    for activation in ref.ACTIVATIONS:
        inputs = tuple(_leaf(t) for t in (x, w1, w2, b, r))
        # the torch backend is the reference's backward: its random-projection check suffices
        fast = backend == "torch"
        assert torch.autograd.gradcheck(lambda *a: fk.sf_conv(*a, activation), inputs, fast_mode=fast)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("stride", (1, 2))
def test_dw_conv3x3_gradcheck(monkeypatch, backend, layout, stride):
    _use_backend(monkeypatch, "cpu", backend, "dw_conv3x3")
    x = _in_layout(torch.randn(2, 3, 5, 4, dtype=torch.float64), layout)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    for activation in ref.ACTIVATIONS:
        inputs = tuple(_leaf(t) for t in (x, w, b))
        fast = backend == "torch"
        assert torch.autograd.gradcheck(
            lambda x, w, b: fk.dw_conv3x3(x, w, b, stride, activation), inputs, fast_mode=fast
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(monkeypatch, backend):
    _use_backend(monkeypatch, "cpu", backend, "sf_conv")
    (x, w1, w2, b, r), gy = _sf_inputs((12, 3, 2, 4, 10), (3, 4), torch.float32, "cpu", True, True)
    xg, w1g, w2g, bg, rg = (_leaf(t) for t in (x, w1, w2, b, r))
    torch.library.opcheck(torch.ops.falconnet.sf_conv.default, (xg, w1g, w2g, bg, rg, "relu6"))
    torch.library.opcheck(torch.ops.falconnet.sf_conv.default, (x, w1, w2, None, None, "none"))
    torch.library.opcheck(torch.ops.falconnet.sf_conv_backward.default, (gy, x, w1, w2, b, "relu"))

    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 1, 3, 3), torch.randn(5)
    for stride in (1, 2):
        torch.library.opcheck(torch.ops.falconnet.dw_conv3x3.default, (_leaf(x), _leaf(w), _leaf(b), stride, "relu"))
        gy = torch.randn(2, 5, (7 - 1) // stride + 1, (6 - 1) // stride + 1)
        torch.library.opcheck(torch.ops.falconnet.dw_conv3x3_backward.default, (gy, x, w, b, stride, "relu6"))


# ---------------------------------------------------------------------------------------------
# torch.compile, torch.export, FLOP counting


class _TinySFDW(nn.Module):
    """SF-Conv (bias, relu) -> DW3x3 (relu6) -> SF-Conv back with the input as residual."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 4, 2) / 2)  # C_in 8 = G 4 * k 2; c_h 4
        self.w2 = nn.Parameter(torch.randn(4, 4, 4) / 2)  # C_out 16 = c_h 4 * m 4
        self.b1 = nn.Parameter(torch.randn(16))
        self.wd = nn.Parameter(torch.randn(16, 1, 3, 3) / 3)
        self.bd = nn.Parameter(torch.randn(16))
        self.v1 = nn.Parameter(torch.randn(4, 2, 4) / 2)  # 16 -> hidden 8: G 4, c_h 2, k 4
        self.v2 = nn.Parameter(torch.randn(2, 4, 4) / 2)  # C_out 8 = c_h 2 * m 4

    def forward(self, x):
        h = fk.sf_conv(x, self.w1, self.w2, self.b1, None, "relu")
        h = fk.dw_conv3x3(h, self.wd, self.bd, 1, "relu6")
        return fk.sf_conv(h, self.v1, self.v2, None, x, "none")


def _eager_and_grads(module, x):
    module.zero_grad()
    out = module(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = _TinySFDW()
    x = torch.randn(2, 8, 6, 5)
    expected, expected_grads = _eager_and_grads(module, x)
    compiled = torch.compile(module, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    out, grads = _eager_and_grads(compiled, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_export():
    module = _TinySFDW()
    x = torch.randn(2, 8, 6, 5)
    program = torch.export.export(module, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "falconnet.sf_conv.default" in targets and "falconnet.dw_conv3x3.default" in targets
    x2 = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(program.module()(x2), module(x2), rtol=1e-5, atol=1e-5)


def test_flop_counter_counts_the_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    (x, w1, w2, b, _), _ = _sf_inputs((32, 4, 8, 8, 128), (7, 5), torch.float32, "cpu", True, False)
    x, w1, w2 = _leaf(x), _leaf(w1), _leaf(w2)
    macs = 2 * 7 * 5 * (32 * 8 + 128 * 4)  # P * (C_in*c_h + C_out*G)
    assert fk.sf_conv_macs(x.shape, w1.shape, w2.shape) == macs
    with FlopCounterMode(display=False) as counter:
        y = fk.sf_conv(x, w1, w2, b, None, "relu")
    assert counter.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 4 * macs

    xd = _leaf(torch.randn(2, 16, 9, 7))
    wd = _leaf(torch.randn(16, 1, 3, 3))
    dw_macs = 9 * 2 * 16 * 5 * 4  # stride 2: 9x7 -> 5x4
    with FlopCounterMode(display=False) as counter:
        yd = fk.dw_conv3x3(xd, wd, None, 2, "none")
    assert counter.get_total_flops() == 2 * dw_macs
    with FlopCounterMode(display=False) as counter:
        yd.sum().backward()
    assert counter.get_total_flops() == 4 * dw_macs


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, from the public op and from the C++ kernels


def _sf_args():
    (x, w1, w2, b, r), gy = _sf_inputs((12, 3, 2, 4, 10), (3, 4), torch.float32, "cpu", True, True)
    return x, w1, w2, b, r, gy


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "w1": a["w1"].double()}, "w1 must have the same dtype"),
        (lambda a: {**a, "bias": a["bias"].double()}, "bias must have the same dtype"),
        (lambda a: {**a, "x": a["x"][:, :8]}, "x must have C_in"),
        (lambda a: {**a, "w2": a["w2"][..., :2]}, "w2 must have shape"),
        (lambda a: {**a, "bias": a["bias"][:5]}, "bias must have shape"),
        (lambda a: {**a, "residual": a["residual"][:, :, :2]}, "residual must have"),
        (lambda a: {**a, "activation": "gelu"}, "activation must be one of"),
    ],
    ids=["w1-dtype", "bias-dtype", "x-channels", "w2-shape", "bias-shape", "residual-shape", "activation"],
)
def test_sf_conv_bad_input(change, match):
    x, w1, w2, b, r, _ = _sf_args()
    args = change({"x": x, "w1": w1, "w2": w2, "bias": b, "residual": r, "activation": "relu"})
    with pytest.raises(ValueError, match=match):
        fk.sf_conv(args["x"], args["w1"], args["w2"], args["bias"], args["residual"], args["activation"])
    if _backend.cpp_available("sf_conv"):  # the C++ kernel checks the same at its own boundary
        with pytest.raises(RuntimeError, match=match):
            torch.ops.falconnet_C.sf_conv_forward(*args.values())


def test_sf_conv_backward_bad_grad_y():
    if not _backend.cpp_available("sf_conv"):
        pytest.skip("the C++ CPU kernels are not built")
    x, w1, w2, b, _, gy = _sf_args()
    with pytest.raises(RuntimeError, match="grad_y must have the output's shape"):
        torch.ops.falconnet_C.sf_conv_backward(gy[:, :4], x, w1, w2, b, "none")
    with pytest.raises(RuntimeError, match="grad_y must have the same dtype"):
        torch.ops.falconnet_C.sf_conv_backward(gy.double(), x, w1, w2, b, "none")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "weight": a["weight"].double()}, "weight must have the same dtype"),
        (lambda a: {**a, "weight": a["weight"][:4]}, "weight must have shape"),
        (lambda a: {**a, "bias": a["bias"][:4]}, "bias must have shape"),
        (lambda a: {**a, "stride": 3}, "stride must be 1 or 2"),
        (lambda a: {**a, "x": a["x"][0]}, "x must be a 4-D"),
    ],
    ids=["weight-dtype", "weight-shape", "bias-shape", "stride", "x-dims"],
)
def test_dw_conv3x3_bad_input(change, match):
    x = torch.randn(2, 6, 5, 5)
    args = change({"x": x, "weight": torch.randn(6, 1, 3, 3), "bias": torch.randn(6), "stride": 1, "activation": "relu"})
    with pytest.raises(ValueError, match=match):
        fk.dw_conv3x3(args["x"], args["weight"], args["bias"], args["stride"], args["activation"])
    if _backend.cpp_available("dw_conv3x3"):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.falconnet_C.dw_conv3x3_forward(*args.values())


def test_cpp_error_messages_spell_numbers_and_shapes():
    """The C++ checks build their messages without std::ostream's number formatting (csrc/check.h:
    streaming an integer crashed the process on the H100 machine's torch 2.11); the numbers and
    shapes they name must still come out right."""
    if not _backend.cpp_available("sf_conv"):
        pytest.skip("the C++ CPU kernels are not built")
    x, w1, w2, b, r, gy = _sf_args()
    with pytest.raises(RuntimeError, match=r"bias must have shape \(10,\), got \[5\]"):
        torch.ops.falconnet_C.sf_conv_forward(x, w1, w2, b[:5], r, "none")
    with pytest.raises(RuntimeError, match=r"grad_y must have the output's shape \(2, 10, 3, 4\), got \[2, 4, 3, 4\]"):
        torch.ops.falconnet_C.sf_conv_backward(gy[:, :4], x, w1, w2, b, "none")
    x = torch.randn(2, 6, 5, 5)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(6, 1, 3, 3\) for x with 6 channels, got \[4, 1, 3, 3\]"):
        torch.ops.falconnet_C.dw_conv3x3_forward(x, torch.randn(4, 1, 3, 3), None, 1, "none")
    with pytest.raises(RuntimeError, match=r"stride must be 1 or 2, got -3"):
        torch.ops.falconnet_C.dw_conv3x3_forward(x, torch.randn(6, 1, 3, 3), None, -3, "none")
    with pytest.raises(RuntimeError, match=r"weight must have the same dtype as x \(Float\), got Double"):
        torch.ops.falconnet_C.dw_conv3x3_forward(x, torch.randn(6, 1, 3, 3).double(), None, 1, "none")


@pytest.mark.parametrize("op", ["sf_conv", "dw_conv3x3"])
def test_double_backward_matches_reference(op):
    """A backward with create_graph=True recomputes the op's gradients through its PyTorch
    reference, so a second backward (here the gradient of a gradient penalty for every weight)
    equals the reference's, float64; the kernels alone would have no formula for it."""
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 5, 7, dtype=torch.float64) * 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    if op == "sf_conv":
        w1 = torch.randn(4, 8, 4, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(8, 4, 4, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
        res = torch.randn(2, 32, 5, 7, dtype=torch.float64, requires_grad=True)
        params = [w1, w2, bias, res]

        def run(fn):
            return fn(x, w1, w2, bias, res, "relu6")

        ours, theirs = fk.sf_conv, ref.sf_conv_ref
    else:
        w = torch.randn(16, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
        params = [w, bias]

        def run(fn):
            return fn(x, w, bias, 2, "relu")

        ours, theirs = fk.dw_conv3x3, ref.dw_conv3x3_ref

    def second(fn):
        (g,) = torch.autograd.grad(run(fn).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), params, allow_unused=True)

    for a, b in zip(second(ours), second(theirs), strict=True):
        if b is None:  # the residual: no second-order term
            assert a is None or a.abs().max() == 0
            continue
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
