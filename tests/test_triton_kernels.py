"""Triton kernels (falconnet_kernels/triton_sf_conv.py, triton_dw_conv3x3.py) against the float64
reference (falconnet_kernels/reference.py).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (small shapes; the
interpreter executes each program in NumPy). On a GPU they run for real on CUDA tensors, in
float32, bfloat16 and float16, and also at the 8 point-wise and 4 depthwise benchmark shapes of
SPEC section 6 at batch 2.

Tolerances, on ||out - ref64|| / ||ref64||:
  * float32: the kernels use IEEE fp32 products (input_precision="ieee") and fp32 accumulation,
    so the error is a few fp32 ulps times sqrt(reduction length): far under 1e-5.
  * bfloat16 / float16: at most 3x the error of PyTorch's own reference computed in the same
    dtype on the same device (the flash-attention idiom), with a floor of 2**-8 (bf16) / 2**-11
    (fp16) for the cases where PyTorch happens to be nearly exact.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest  # noqa: E402

from falconnet_kernels import reference as ref  # noqa: E402
from falconnet_kernels import triton_dw_conv3x3 as tdw  # noqa: E402
from falconnet_kernels import triton_sf_conv as tsf  # noqa: E402

pytestmark = pytest.mark.triton

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# On a GPU every case runs in bf16 (the benchmarked dtype) and the first also in fp32 and fp16:
# each (case, dtype) compiles its own kernels, and the GPU check has minutes. Under the
# interpreter every case runs in fp32 and the first two in fp16 (the interpreter's tl.dot gives
# garbage for bf16 operands, seen with triton 3.8, so bf16 is checked on GPUs only).
DTYPES = [torch.bfloat16, torch.float32, torch.float16] if ON_GPU else [torch.float32, torch.float16]
CASES_IN_EVERY_DTYPE = 1 if ON_GPU else 2


def with_dtypes(cases, name):
    return [pytest.param(case, dtype, id=f"{name(case)}-{str(dtype)[6:]}")
            for i, case in enumerate(cases) for dtype in DTYPES
            if i < CASES_IN_EVERY_DTYPE or dtype == DTYPES[0]]


FP32_TOL = 1e-5
LOWP_FLOOR = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Autotuning compiles every config for every shape: tests use the launchers' default config
    (test_autotuned_configs covers the autotuned path)."""
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """||out - ref64|| / ||ref64||, on the CPU in float64 (ref64 lives there)."""
    out = out.detach().to("cpu", torch.float64)
    assert not torch.isnan(out).any(), "NaN in output (an element left unwritten?)"
    return ((out - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_matches(name, outs, refs64, refs_lowp, dtype):
    """outs: kernel results; refs64: float64 reference; refs_lowp: PyTorch reference in `dtype`."""
    for i, (out, r64, rlow) in enumerate(zip(outs, refs64, refs_lowp)):
        assert out.shape == r64.shape, f"{name}[{i}]: shape {tuple(out.shape)} != {tuple(r64.shape)}"
        assert out.dtype == dtype, f"{name}[{i}]: dtype {out.dtype} != {dtype}"
        err = rel_err(out, r64)
        tol = FP32_TOL if dtype == torch.float32 else max(LOWP_FLOOR[dtype], 3 * rel_err(rlow, r64))
        assert err <= tol, f"{name}[{i}]: relative error {err:.3g} > {tol:.3g}"


def poison_allocator():
    """On CUDA, hand the next allocations memory full of NaN, so an unwritten element shows:
    fill and free blocks of the caching allocator's large pool and of its small (< 1 MB) one."""
    if ON_GPU:
        junk = [torch.full((1 << 24,), float("nan"), device=DEVICE)]
        junk += [torch.full((1 << 15,), float("nan"), device=DEVICE) for _ in range(64)]
        del junk


def _to(t, dtype, fmt):
    return None if t is None else t.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


# ---------------------------------------------------------------------------------------------
# SF-Conv


def _sf_inputs(N, C_in, k, c_h, C_out, H, W, bias, residual, dtype, fmt):
    G, m = C_in // k, C_out // c_h
    x = torch.randn(N, C_in, H, W)
    w1 = torch.randn(G, c_h, k) / k**0.5
    w2 = torch.randn(c_h, m, G) / G**0.5
    b = torch.randn(C_out) if bias else None
    res = torch.randn(N, C_out, H, W) if residual else None
    gy = torch.randn(N, C_out, H, W)
    return [_to(t, dtype, fmt) if t is not None and t.dim() == 4 else (None if t is None else t.to(DEVICE, dtype))
            for t in (x, w1, w2, b, res, gy)]


def check_sf_conv(N, C_in, k, c_h, C_out, H, W, bias, residual, activation, dtype, fmt, impl=tsf):
    """impl's sf_conv_forward and sf_conv_backward (the two-stage kernels, or the composed-weight
    GEMM candidate triton_sf_gemm) against the float64 reference."""
    x, w1, w2, b, res, gy = _sf_inputs(N, C_in, k, c_h, C_out, H, W, bias, residual, dtype, fmt)
    poison_allocator()
    y = impl.sf_conv_forward(x, w1, w2, b, res, activation)
    grads = impl.sf_conv_backward(gy, x, w1, w2, b, activation)
    y64 = ref.sf_conv_ref(_f64(x), _f64(w1), _f64(w2), _f64(b), _f64(res), activation)
    g64 = ref.sf_conv_backward_ref(_f64(gy), _f64(x), _f64(w1), _f64(w2), _f64(b), activation)
    if dtype == torch.float32:
        y_low, g_low = y64, g64
    else:
        y_low = ref.sf_conv_ref(x, w1, w2, b, res, activation)
        g_low = ref.sf_conv_backward_ref(gy, x, w1, w2, b, activation)
    case = f"{impl.__name__} {C_in}->{C_out} k={k} c_h={c_h} {activation} {dtype} {fmt}"
    assert_matches(case + " forward", [y], [y64], [y_low], dtype)
    assert_matches(case + " backward", grads, g64, g_low, dtype)
    # output layout follows x: channels_last in, channels_last out
    expect_cl = fmt == torch.channels_last and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert grads[0].is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    return w1, w2


# (C_in, k, c_h, C_out): the default configs of three FalconNet shapes, r = 2, and a
# non-power-of-two one (k=3, c_h=2, m=5, G=4) that exercises every padding mask
SF_CASES = [
    # C_in, k, c_h, C_out, bias, residual, activation, layout
    (32, 8, 8, 128, True, True, "relu", torch.channels_last),
    (128, 4, 4, 32, False, False, "none", torch.contiguous_format),
    (64, 16, 16, 256, True, False, "relu6", torch.channels_last),
    (256, 8, 8, 64, False, True, "none", torch.channels_last),
    (64, 8, 4, 32, True, False, "relu", torch.contiguous_format),
    (12, 3, 2, 10, True, True, "relu6", torch.contiguous_format),
    (12, 4, 2, 10, False, False, "relu", torch.channels_last),
]


@pytest.mark.parametrize("case, dtype", with_dtypes(SF_CASES, lambda c: f"{c[0]}-{c[3]}-k{c[1]}-ch{c[2]}-{c[6]}"))
def test_sf_conv(case, dtype):
    C_in, k, c_h, C_out, bias, residual, activation, fmt = case
    check_sf_conv(2, C_in, k, c_h, C_out, 5, 7, bias, residual, activation, dtype, fmt)


@pytest.mark.parametrize("case", [(256, 8, 8, 64, "relu"), (60, 3, 2, 10, "relu6")], ids=str)
def test_sf_conv_several_group_chunks(case, monkeypatch):
    """Wide inputs are processed in chunks of groups (weights reloaded per chunk, weight gradients
    added per chunk): shrink the chunk so that small shapes take that path too."""
    monkeypatch.setitem(tsf._CHUNK_CHANNELS, False, 64)
    monkeypatch.setitem(tsf._CHUNK_CHANNELS, True, 64)
    C_in, k, c_h, C_out, activation = case
    for backward in (False, True):
        assert not tsf._plan(C_in // k, c_h, k, C_out // c_h, backward)["ONE_CHUNK"]
    check_sf_conv(2, C_in, k, c_h, C_out, 3, 5, True, True, activation, torch.float32, torch.channels_last)


def test_sf_conv_mixed_layouts():
    """x channels_last with an NCHW residual and grad_y (ops.py passes each as it comes)."""
    x, w1, w2, b, res, gy = _sf_inputs(2, 32, 8, 8, 128, 3, 4, True, True, torch.float32, torch.channels_last)
    res, gy = res.contiguous(), gy.contiguous()
    y = tsf.sf_conv_forward(x, w1, w2, b, res, "relu")
    gx, *_ = tsf.sf_conv_backward(gy, x, w1, w2, b, "relu")
    assert rel_err(y, ref.sf_conv_ref(_f64(x), _f64(w1), _f64(w2), _f64(b), _f64(res), "relu")) < FP32_TOL
    g64 = ref.sf_conv_backward_ref(_f64(gy), _f64(x), _f64(w1), _f64(w2), _f64(b), "relu")
    assert rel_err(gx, g64[0]) < FP32_TOL


class _Refusing:
    """Stands in for a Triton kernel: launches the real one unless refuse(launch kwargs) says the
    device would not take it (OutOfResources, as Triton raises at launch); records each launch."""

    def __init__(self, real, refuse, tried):
        self.real, self.refuse, self.tried = real, refuse, tried

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            self.tried.append((kwargs["BLOCK_P"], kwargs["NB1"]))
            if self.refuse(kwargs):
                raise OutOfResources(237568, 232448, "shared memory")
            return self.real[grid](*args, **kwargs)
        return launch


def _sf_run(backward):
    """The Triton op and its float64 reference on one small case (C_in 32 in 4 groups of k = 8)."""
    x, w1, w2, b, res, gy = _sf_inputs(2, 32, 8, 8, 128, 3, 4, True, False, torch.float32, torch.channels_last)
    if backward:
        out = tsf.sf_conv_backward(gy, x, w1, w2, b, "relu")[0]
        exact = ref.sf_conv_backward_ref(_f64(gy), _f64(x), _f64(w1), _f64(w2), _f64(b), "relu")[0]
    else:
        out = tsf.sf_conv_forward(x, w1, w2, b, None, "relu")
        exact = ref.sf_conv_ref(_f64(x), _f64(w1), _f64(w2), _f64(b), None, "relu")
    return out, exact


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_sf_conv_launch_falls_back_on_out_of_resources(monkeypatch, backward):
    """A launch the device refuses (Triton's OutOfResources: the float32 backward of a RefCO
    512->128 layer on the H100, 2026-11-27) gives way to a smaller one and the result is still
    right: without autotuning first the next pixel tile, then half the groups a chunk; a refusal
    of everything is raised."""
    from triton.runtime.errors import OutOfResources

    name = "_sf_conv_bwd_kernel" if backward else "_sf_conv_fwd_kernel"
    real, tried = getattr(tsf, name), []
    monkeypatch.setattr(tsf, "_LAUNCHED_CHUNK", {})
    monkeypatch.setattr(tsf, "_default_configs", lambda *a, **k: [(32, 4), (16, 4)])
    # every tile refused at the first plan (4 groups, NB1 = 2 packed products of 2 groups): the
    # chunk halves to 2 groups (NB1 = 1), whose big tile is refused too
    monkeypatch.setattr(tsf, name, _Refusing(real, lambda kw: kw["NB1"] > 1 or kw["BLOCK_P"] == 32, tried))
    out, exact = _sf_run(backward)
    assert tried == [(32, 2), (16, 2), (32, 1), (16, 1)]
    assert rel_err(out, exact) < FP32_TOL
    tried.clear()  # a second call starts from the chunk that launched
    _sf_run(backward)
    assert tried == [(32, 1), (16, 1)]
    monkeypatch.setattr(tsf, name, _Refusing(real, lambda kw: True, tried))
    with pytest.raises(OutOfResources):
        _sf_run(backward)


def test_sf_conv_autotuned_launch_falls_back_on_out_of_resources(monkeypatch):
    """With autotuning, a refused launch of the tuned kernel re-plans with half the groups a chunk."""
    tried = []
    real = tsf._sf_conv_bwd_kernel

    class Tuned(_Refusing):  # the autotuner picks the tile itself
        def __getitem__(self, grid):
            launch = super().__getitem__(grid)
            return lambda *args, **kwargs: launch(*args, BLOCK_P=16, num_warps=4, **kwargs)

    monkeypatch.setattr(tsf, "_LAUNCHED_CHUNK", {})
    monkeypatch.setattr(tsf, "_autotune_enabled", lambda: True)
    monkeypatch.setattr(tsf, "_sf_conv_bwd_tuned", Tuned(real, lambda kw: kw["NB1"] > 1, tried))
    out, exact = _sf_run(True)
    assert tried == [(16, 2), (16, 1)]
    assert rel_err(out, exact) < FP32_TOL


def check_sf_conv_batch_zero(impl=tsf):
    x, w1, w2, b, _, _ = _sf_inputs(0, 32, 8, 8, 128, 5, 7, True, False, torch.float32, torch.channels_last)
    y = impl.sf_conv_forward(x, w1, w2, b, None, "relu")
    assert y.shape == (0, 128, 5, 7)
    gx, gw1, gw2, gb = impl.sf_conv_backward(y, x, w1, w2, b, "relu")
    assert gx.shape == x.shape and gb.shape == (128,)
    assert gw1.abs().sum() == 0 and gw2.abs().sum() == 0 and gb.abs().sum() == 0


def test_sf_conv_batch_zero():
    check_sf_conv_batch_zero()


# ---------------------------------------------------------------------------------------------
# Depthwise 3x3


def check_dw_conv3x3(N, C, H, W, stride, bias, activation, dtype, fmt):
    x = _to(torch.randn(N, C, H, W), dtype, fmt)
    w = torch.randn(C, 1, 3, 3).to(DEVICE, dtype)
    b = torch.randn(C).to(DEVICE, dtype) if bias else None
    poison_allocator()
    y = tdw.dw_conv3x3_forward(x, w, b, stride, activation)
    gy = _to(torch.randn(y.shape), dtype, fmt)
    grads = tdw.dw_conv3x3_backward(gy, x, w, b, stride, activation)
    y64 = ref.dw_conv3x3_ref(_f64(x), _f64(w), _f64(b), stride, activation)
    g64 = ref.dw_conv3x3_backward_ref(_f64(gy), _f64(x), _f64(w), _f64(b), stride, activation)
    if dtype == torch.float32:
        y_low, g_low = y64, g64
    else:
        y_low = ref.dw_conv3x3_ref(x, w, b, stride, activation)
        g_low = ref.dw_conv3x3_backward_ref(gy, x, w, b, stride, activation)
    case = f"dw_conv3x3 C={C} {H}x{W} stride {stride} {activation} {dtype} {fmt}"
    assert_matches(case + " forward", [y], [y64], [y_low], dtype)
    assert_matches(case + " backward", grads, g64, g_low, dtype)
    expect_cl = fmt == torch.channels_last and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)


DW_CASES = [
    # C, H, W, stride, bias, activation, layout
    (12, 5, 7, 1, True, "relu", torch.channels_last),
    (12, 5, 7, 2, True, "relu6", torch.contiguous_format),
    (70, 6, 6, 2, False, "none", torch.channels_last),
    (8, 9, 4, 1, False, "none", torch.contiguous_format),
    (16, 1, 1, 1, True, "relu6", torch.channels_last),
]


@pytest.mark.parametrize("case, dtype", with_dtypes(DW_CASES, lambda c: f"C{c[0]}-{c[1]}x{c[2]}-s{c[3]}-{c[5]}"))
def test_dw_conv3x3(case, dtype):
    C, H, W, stride, bias, activation, fmt = case
    check_dw_conv3x3(2, C, H, W, stride, bias, activation, dtype, fmt)


def test_dw_conv3x3_batch_zero():
    x = torch.randn(0, 8, 5, 5, device=DEVICE)
    w = torch.randn(8, 1, 3, 3, device=DEVICE)
    y = tdw.dw_conv3x3_forward(x, w, None, 2, "relu")
    assert y.shape == (0, 8, 3, 3)
    gx, gw, gb = tdw.dw_conv3x3_backward(y, x, w, None, 2, "relu")
    assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.shape == (8,)


# ---------------------------------------------------------------------------------------------
# GPU only: the benchmark shapes (SPEC section 6) at batch 2, bf16 channels_last


def check_sf_gemm(N, C_in, k, c_h, C_out, H, W, bias, residual, activation, dtype, fmt):
    """The composed-weight GEMM candidate (triton_sf_gemm.py), as check_sf_conv, and its composed weight."""
    from falconnet_kernels import triton_sf_gemm

    w1, w2 = check_sf_conv(N, C_in, k, c_h, C_out, H, W, bias, residual, activation, dtype, fmt, impl=triton_sf_gemm)
    w = triton_sf_gemm.compose_weight(w1, w2, torch.float32)
    assert rel_err(w, ref.sf_conv_dense_weight(_f64(w1), _f64(w2))) <= (FP32_TOL if dtype == torch.float32 else 2**-7)


@pytest.mark.parametrize("case, dtype", with_dtypes(SF_CASES, lambda c: f"{c[0]}-{c[3]}-k{c[1]}-ch{c[2]}-{c[6]}"))
def test_sf_gemm(case, dtype):
    C_in, k, c_h, C_out, bias, residual, activation, fmt = case
    check_sf_gemm(2, C_in, k, c_h, C_out, 5, 7, bias, residual, activation, dtype, fmt)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_sf_gemm_backward_mask_is_exact(activation):
    """The GEMM backward's activation mask is a float64 z's wherever |z| is not within 1e-5 of a
    kink: the composed weight enters in two 16-bit parts. One 16-bit part (the forward's) errs by
    ~2^-9 relatively (bfloat16) per weight and flips ~1 mask entry in 2000 (5 of 8960 at
    test_sf_gemm's first case, emulated in PyTorch), which failed that test's backward tolerance at
    two shapes on the H100 (2026-11-26). In float16 (the interpreter) one part flips 5-6 here."""
    from falconnet_kernels import triton_sf_gemm

    dtype = DTYPES[0] if ON_GPU else torch.float16
    x, w1, w2, b, _, gy = _sf_inputs(8, 64, 8, 8, 128, 14, 14, True, False, dtype, torch.channels_last)
    b = b * 4  # spread z over [0, 6]'s kinks for relu6
    grad_z, _ = triton_sf_gemm.masked_grad(gy, x, w1, w2, b, activation)
    z64 = ref.sf_conv_ref(_f64(x), _f64(w1), _f64(w2), _f64(b), None, "none")
    keep = (z64 > 0) if activation == "relu" else (z64 > 0) & (z64 < 6)
    far = ((z64.abs() > 1e-5) & ((z64 - 6).abs() > 1e-5))
    got, want = _f64(grad_z), _f64(gy) * keep
    assert far.float().mean() > 0.99
    assert torch.equal(got[far], want[far]), f"{int((got != want)[far].sum())} mask entries differ"


def test_sf_gemm_k_loop_and_batch_zero():
    """C_in over one K step (the loop with a ragged last step: 200 = 3 x 64 + 8) and C_out over one
    channel tile (200 > 128); batch 0 returns an empty output."""
    check_sf_gemm(1, 200, 8, 8, 200, 3, 5, True, True, "relu6", torch.float32, torch.channels_last)
    from falconnet_kernels import triton_sf_gemm

    check_sf_conv_batch_zero(triton_sf_gemm)


@pytest.mark.parametrize("routes", [{("*", "*", "forward"), ("*", "*", "backward")}, {(32, 128, "forward")}],
                         ids=["every-shape-both-passes", "32-128-forward"])  # fixed ids: xdist needs them stable
def test_sf_conv_op_routes_to_the_gemm_form(monkeypatch, routes):
    """falconnet::sf_conv's Triton backend takes the composed GEMM form for the (C_in, C_out, pass)
    listed in triton_sf_gemm.COMPOSED, and the two-stage kernel otherwise; both match the
    reference through the op (forward and autograd backward)."""
    import falconnet_kernels
    from falconnet_kernels import _backend, triton_sf_gemm

    # float32 stays on the two-stage kernel by default (COMPOSED_DTYPES); float32 is what the
    # interpreter checks to FP32_TOL, so it is routed here
    assert not triton_sf_gemm.routed(32, 128, "forward", torch.float32)
    assert triton_sf_gemm.routed(32, 128, "forward", torch.bfloat16)
    monkeypatch.setattr(triton_sf_gemm, "COMPOSED_DTYPES", (torch.float32,))
    monkeypatch.setattr(triton_sf_gemm, "COMPOSED", routes)
    monkeypatch.setattr(_backend, "select", lambda op, device, pass_="forward": "triton")
    calls = []
    for name in ("sf_conv_forward", "sf_conv_backward"):
        original = getattr(triton_sf_gemm, name)
        monkeypatch.setattr(triton_sf_gemm, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, w1, w2, b, res, gy = _sf_inputs(2, 32, 8, 8, 128, 3, 5, True, True, torch.float32, torch.channels_last)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, b)]
    y = falconnet_kernels.sf_conv(*leaves, residual=res, activation="relu")
    grads = torch.autograd.grad(y, leaves, gy)
    expected = ["sf_conv_forward", "sf_conv_backward"] if len(routes) == 2 else ["sf_conv_forward"]
    assert calls == expected
    assert rel_err(y, ref.sf_conv_ref(_f64(x), _f64(w1), _f64(w2), _f64(b), _f64(res), "relu")) < FP32_TOL
    g64 = ref.sf_conv_backward_ref(_f64(gy), _f64(x), _f64(w1), _f64(w2), _f64(b), "relu")
    for got, want in zip(grads, g64):
        assert rel_err(got, want) < FP32_TOL
    assert not triton_sf_gemm.routed(128, 32, "forward", torch.float32) or len(routes) == 2
    # the outputs' metadata match the fake kernels (what torch.compile relies on)
    torch.library.opcheck(torch.ops.falconnet.sf_conv, (x, w1, w2, b, res, "relu"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.falconnet.sf_conv_backward, (gy, x, w1, w2, b, "relu"),
                          test_utils=("test_schema", "test_faketensor"))


def test_sf_gemm_picks_the_fastest_candidate_once(monkeypatch):
    """_pick times every candidate once per key (do_bench on a GPU; faked here) and keeps the
    fastest; without autotuning (tests, the interpreter) it takes the first guess untimed."""
    from falconnet_kernels import triton_sf_gemm

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []
    monkeypatch.setattr(triton_sf_gemm, "_TUNED", {})
    monkeypatch.setattr(triton_sf_gemm.triton.testing, "do_bench", lambda fn, **kw: fn())
    monkeypatch.setattr(triton_sf_gemm.torch.cuda, "is_current_stream_capturing", lambda: False)

    def launch(config):
        timed.append(config)
        return times[config]

    monkeypatch.setattr(triton_sf_gemm, "_autotune_enabled", lambda: False)
    assert triton_sf_gemm._pick("k", launch, ["a", "b", "c"]) == "a" and timed == []
    monkeypatch.setattr(triton_sf_gemm, "_autotune_enabled", lambda: True)
    assert triton_sf_gemm._pick("k", launch, ["a", "b", "c"]) == "b" and timed == ["a", "b", "c"]
    assert triton_sf_gemm._pick("k", launch, ["a", "b", "c"]) == "b" and len(timed) == 3  # cached


PW_SHAPES = [  # (C_in, C_out, H, k, c_h): default config r = 1, k the valid k nearest sqrt(C_out)
    (32, 128, 56, 8, 8), (128, 32, 56, 4, 4), (64, 256, 28, 16, 16), (256, 64, 28, 8, 8),
    (128, 512, 14, 16, 16), (512, 128, 14, 8, 8), (256, 1024, 7, 32, 32), (1024, 256, 7, 16, 16),
]
DW_SHAPES = [(128, 56), (256, 28), (512, 14), (1024, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", PW_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}@{s[2]}")
def test_sf_conv_benchmark_shapes(shape):
    """As benchmarked (no bias, residual or activation, so the benchmarks reuse these compiled
    kernels; the small cases above cover the epilogue options)."""
    C_in, C_out, H, k, c_h = shape
    check_sf_conv(2, C_in, k, c_h, C_out, H, H, False, False, "none", torch.bfloat16, torch.channels_last)
    check_sf_gemm(2, C_in, k, c_h, C_out, H, H, False, False, "none", torch.bfloat16, torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: f"{s[0]}@{s[1]}")
def test_dw_conv3x3_benchmark_shapes(shape):
    C, H = shape
    check_dw_conv3x3(2, C, H, H, 1, True, "relu", torch.bfloat16, torch.channels_last)


@pytest.mark.cuda
def test_autotuned_configs(monkeypatch):
    """The autotuned launch path (every config of the short lists runs once here)."""
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "1")
    check_sf_conv(2, 512, 8, 8, 128, 14, 14, False, False, "none", torch.bfloat16, torch.channels_last)
    check_dw_conv3x3(2, 256, 28, 28, 1, True, "relu", torch.bfloat16, torch.channels_last)
