"""SF-Conv as one tensor-core GEMM with the composed weight: the Triton backend's form on a GPU.

Why. On a GPU every SF-Conv shape of FalconNet is memory-bound: the fewest bytes are x read once
and y written once, (C_in + C_out) * itemsize per pixel, and at bf16 the dense product of the
composed (C_out x C_in) weight is at most ~1.2x that memory time on an H100 (C_in*C_out MACs per
pixel at ~600 TFLOP/s against (C_in + C_out) * 2 bytes at ~3.3 TB/s: 0.14x at 32->128 and
128->32, 0.29x at 64<->256, 0.57x at 128<->512, 1.14x at 256<->1024). So the exact-FLOP two-stage
kernel (triton_sf_conv.py: batched 3-D products, the shuffle as a register/shared-memory
relayout) buys nothing at those shapes, and its relayouts cost.
This kernel computes the same function as one GEMM per tile, y[P, C_out] = x[P, C_in] @ W^T with
W = W2 . shuffle . W1 composed once per call by a tiny kernel (W[j*m + t, g*k + i] =
w2[j, t, g] * w1[g, j, i], product rounded once to x's dtype), so the hot loop is the plain
2-D tl.dot stream Triton pipelines best (cp.async / wgmma on sm_90), with the epilogue (bias,
activation, residual) fused before the single store. The hidden tensor does not exist at all.

Numerics: the two-stage form rounds the hidden tensor to x's dtype between the stages (as two
PyTorch matmuls would); this form rounds each composed weight instead: both are one 16-bit
rounding per term, within the same tolerance of a float64 reference. float32 uses
input_precision="ieee". The backward's activation mask is the exception: there a 16-bit weight's
error flips mask entries where z is near a kink, so the mask's z uses the weight in two 16-bit
parts (compose_weight(split=True)), float32-accurate.

The backward is the same composed form: grad_z = grad_y * act'(z) in one GEMM pass (the mask in
its epilogue), grad_x = grad_z @ W by the same kernel (W read transposed), grad_W = grad_z^T x by
one cuBLAS product, and the chain rule through the composition on the small weights.

Measured (H100, bf16, channels_last, batch 128, CUDA graphs; benchmarks/results/2026-11-26-h100):
forward 1.13-1.63x the two-stage kernel at all 8 FalconNet shapes (0.79x cuDNN's dense 1x1
geomean: 1.06x at 32->128@56, 0.98x at 128->32@56, 0.68-0.74x at the 7x7 and 14x14 maps),
backward 1.30-2.67x (fwd+bwd 0.66x cuDNN geomean). So falconnet::sf_conv's Triton backend takes
this form for both passes (COMPOSED) for 16-bit x up to C_in*C_out = 1024*256 MACs a pixel, the
largest measured; wider pairs approach the H100's compute ridge, and float32 x (IEEE products on
CUDA cores) stays on the two-stage kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_sf_conv import (
    _ACTIVATION_CODE,
    _autotune_enabled,
    _dot_precision,
    _forward_strides,
    _out_format,
    _pixel_offset,
)

# (C_in, C_out, pass) that falconnet::sf_conv's Triton backend runs in this composed form instead
# of the two-stage kernel (ops._run); "*" matches any channel count. Every shape, both passes:
# faster at all 8 FalconNet shapes on the H100 (module docstring; benchmarks/test_bench_sf_conv.py
# times falconnet-triton-gemm against falconnet-triton-two-stage).
COMPOSED: set = {("*", "*", "forward"), ("*", "*", "backward")}
# the largest C_in*C_out measured (1024->256): beyond it the composed product's MACs a pixel
# near the compute ridge, where the exact-FLOP two-stage kernel may win again (unmeasured)
COMPOSED_MAX_MACS = 1024 * 256
# the dtypes measured (bf16; fp16 takes the same tensor-core path). float32 stays on the two-stage
# kernel: there the composed product's C_in*C_out MACs a pixel run as IEEE float32 on CUDA cores
# (16x the two-stage kernel's at 1024->256), unmeasured
COMPOSED_DTYPES = (torch.bfloat16, torch.float16)


def routed(C_in: int, C_out: int, pass_: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the Triton backend's sf_conv `pass_` ('forward' or 'backward') runs here for x of dtype."""
    return dtype in COMPOSED_DTYPES and C_in * C_out <= COMPOSED_MAX_MACS and any(
        (a in ("*", C_in)) and (b in ("*", C_out)) and p == pass_ for a, b, p in COMPOSED)


@triton.jit
def _compose_kernel(w1_ptr, w2_ptr, w_ptr, lo_ptr, G, C_H, K, M, C_IN, C_OUT, HAS_LO: tl.constexpr,
                    BLOCK: tl.constexpr):
    """W[o, c] = w2[j, t, g] * w1[g, j, i] for o = j*M + t, c = g*K + i, in float32, stored once
    in w's dtype; with HAS_LO also the rounding's remainder, lo = W - float(hi), in lo's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C_OUT * C_IN
    o = offs // C_IN
    c = offs % C_IN
    j, t = o // M, o % M
    g, i = c // K, c % K
    a = tl.load(w2_ptr + (j * M + t) * G + g, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(w1_ptr + (g * C_H + j) * K + i, mask=ok, other=0.0).to(tl.float32)
    hi = (a * b).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, hi, mask=ok)
    if HAS_LO:
        tl.store(lo_ptr + offs, (a * b - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sf_gemm_fwd_kernel(
    x_ptr, w_ptr, lo_ptr, bias_ptr, res_ptr, y_ptr,
    P, HW, C_IN, C_OUT, s_wk, s_wn,
    s_xn, s_xc, s_xhw, s_yn, s_yc, s_yhw, s_rn, s_rc, s_rhw,
    HAS_LO: tl.constexpr, MASK_GRAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    X_LINEAR: tl.constexpr, Y_LINEAR: tl.constexpr, R_LINEAR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # HAS_LO: W = w + lo (w rounded to 16 bits, lo the remainder), so z carries ~16 more bits of
    # the composed weight (the activation's mask then agrees with a float64 one).
    # MASK_GRAD (the backward): res_ptr is grad_y, y_ptr receives grad_z = grad_y * act'(z).
    # 1-D grid, output-channel tiles fastest: the programs of one pixel tile run together, so
    # its x tile comes from DRAM once and from L2 for the other channel tiles
    n_tiles = tl.cdiv(C_OUT, BLOCK_N)
    pid = tl.program_id(0)
    pid_p, pid_n = pid // n_tiles, pid % n_tiles
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < C_OUT
    pix_x = _pixel_offset(p, HW, s_xn, s_xhw, X_LINEAR)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C_IN
        xt = tl.load(x_ptr + pix_x[:, None] + k[None, :] * s_xc, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + k[:, None] * s_wk + n[None, :] * s_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_LO:
            lt = tl.load(lo_ptr + k[:, None] * s_wk + n[None, :] * s_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(xt, lt, acc, input_precision=DOT_PRECISION)
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ok = p_ok[:, None] & n_ok[None, :]
    if MASK_GRAD:
        pix_r = _pixel_offset(p, HW, s_rn, s_rhw, R_LINEAR)
        gy = tl.load(res_ptr + pix_r[:, None] + n[None, :] * s_rc, mask=ok, other=0.0).to(tl.float32)
        keep = z > 0.0
        if ACT == 2:
            keep = keep & (z < 6.0)
        z = tl.where(keep, gy, 0.0)
    else:
        if ACT == 1:
            z = tl.maximum(z, 0.0)
        elif ACT == 2:
            z = tl.minimum(tl.maximum(z, 0.0), 6.0)
        if HAS_RES:
            pix_r = _pixel_offset(p, HW, s_rn, s_rhw, R_LINEAR)
            z += tl.load(res_ptr + pix_r[:, None] + n[None, :] * s_rc, mask=ok, other=0.0).to(tl.float32)
    pix_y = _pixel_offset(p, HW, s_yn, s_yhw, Y_LINEAR)
    tl.store(y_ptr + pix_y[:, None] + n[None, :] * s_yc, z.to(y_ptr.dtype.element_ty), mask=ok)


def compose_weight(w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype, split: bool = False):
    """The (C_out, C_in) matrix of the pair (reference.sf_conv_dense_weight), one launch, in
    dtype; with split, (hi, lo): hi that matrix, lo the remainder of its rounding, also in dtype."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    C_in, C_out = G * k, c_h * m
    w = torch.empty((C_out, C_in), device=w1.device, dtype=dtype)
    lo = torch.empty_like(w) if split else None
    block = 1024
    _compose_kernel[(triton.cdiv(C_out * C_in, block),)](w1.contiguous(), w2.contiguous(), w, w if lo is None else lo,
                                                          G, c_h, k, m, C_in, C_out, HAS_LO=split, BLOCK=block)
    return (w, lo) if split else w


def _config(C_in: int, C_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages), the first guess: all of C_out in one
    tile up to 128 (x is then read by one program), K in steps of up to 64, 128 pixels; shared
    memory 2-3 stages of (128 x BLOCK_K + BLOCK_K x BLOCK_N) 16-bit values <= 96 KB. Compiled for
    sm_90 at the 8 FalconNet shapes: wgmma, cp.async, 72-126 registers, no spills."""
    block_n = min(128, max(16, triton.next_power_of_2(C_out)))
    block_k = min(64, max(16, triton.next_power_of_2(C_in)))
    warps = 8 if block_n >= 128 else 4
    stages = 3 if C_in > block_k else 2
    return 128, block_n, block_k, warps, stages


def _candidates(C_in: int, C_out: int) -> list[tuple[int, int, int, int, int]]:
    """The first guess, then a few neighbours (fewer or more pixels a tile, narrower output
    tiles): timed once per shape on a GPU (_pick), each costs one compile."""
    first = _config(C_in, C_out)
    _, bn, bk, _, stages = first
    # the last: 4x the programs of the first guess, for the small maps (at 1024->256@7, 6272
    # pixels, the first guess gives 98 programs for the H100's 132 SMs; there the GEMM ran at 23%
    # of copy against cuDNN's 32%)
    out = [first, (64, bn, bk, 4, stages), (256, min(bn, 64), bk, 8, stages), (128, min(bn, 64), bk, 4, stages),
           (64, min(bn, 64), bk, 4, stages)]
    return list(dict.fromkeys(out))


_TUNED: dict = {}


def _pick(key, launch, candidates):
    """The fastest of candidates for key, timed once on the GPU (triton.testing.do_bench); the
    first candidate where timing is not possible or wanted: the interpreter,
    FALCONNET_TRITON_AUTOTUNE=0, or during CUDA-graph capture."""
    if key in _TUNED:
        return _TUNED[key]
    if not _autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    times = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25) for c in candidates]
    _TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _TUNED[key]


def _gemm(x, w, s_wk: int, s_wn: int, n_out: int, bias, residual, activation: str, lo=None, mask_grad=False):
    """y (N, n_out, H, W) in x's layout = act(x[P, C] @ B + bias) + residual, B[k, n] at
    k*s_wk + n*s_wn of w (plus lo's, same strides, if given). With mask_grad, residual is grad_y
    and y = grad_y * act'(x @ B + bias)."""
    N, C, H, W = x.shape
    y = torch.empty((N, n_out, H, W), device=x.device, dtype=x.dtype, memory_format=_out_format(x))
    P = N * H * W
    if P == 0:
        return y
    x, residual, strides, x_lin, y_lin, r_lin = _forward_strides(x, y, residual)
    bias = bias.contiguous() if bias is not None else None
    flags = dict(HAS_LO=lo is not None, MASK_GRAD=mask_grad,
                 HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=_ACTIVATION_CODE[activation],
                 X_LINEAR=x_lin, Y_LINEAR=y_lin, R_LINEAR=r_lin, DOT_PRECISION=_dot_precision(x.dtype))

    def launch(config):
        block_p, block_n, block_k, warps, stages = config
        grid = (triton.cdiv(P, block_p) * triton.cdiv(n_out, block_n),)
        _sf_gemm_fwd_kernel[grid](
            x, w, lo if lo is not None else w, bias if bias is not None else x, residual if residual is not None else x, y,
            P, H * W, C, n_out, s_wk, s_wn, *strides, **flags,
            BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )

    key = (C, n_out, s_wk == 1, x.dtype, x.device, tuple(flags.values()))
    launch(_pick(key, launch, _candidates(C, n_out)))
    return y


def sf_conv_forward(x, w1, w2, bias, residual, activation):
    """y = act(sf(x; w1, w2) + bias) + residual (triton_sf_conv.sf_conv_forward's contract)."""
    C_in, C_out = x.shape[1], w2.shape[0] * w2.shape[1]
    w = compose_weight(w1, w2, x.dtype)  # (C_out, C_in): B[c, o] = w[o, c]
    return _gemm(x, w, 1, C_in, C_out, bias, residual, activation)


def _pixels_by_channels(t: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) view of a channels_last tensor (a copy for other layouts)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def sf_conv_backward(grad_y, x, w1, w2, bias, activation, need_bias: bool = True):
    """(grad_x, grad_w1, grad_w2, grad_bias) of sf_conv_forward, in the same composed form:
    grad_z = grad_y * act'(z) (z recomputed by the forward GEMM when there is an activation, the
    mask applied in its epilogue: one pass reading x and grad_y, writing grad_z; for 16-bit x the
    composed weight in two 16-bit parts, so the mask is a float32-accurate z's, not one with the
    16-bit weight's error, which flipped ~1 in 2000 of a bfloat16 ReLU's mask entries),
    grad_x = grad_z @ W (the GEMM kernel with W read transposed), grad_W = grad_z^T x (one
    cuBLAS product over the pixels, float32 result), then the chain rule through
    W[j*m + t, g*k + i] = w2[j, t, g] w1[g, j, i] on the small weights. grad_bias (C_out,) is
    None when need_bias is False (it costs a pass over grad_z)."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    C_in = G * k
    grad_y = grad_y.contiguous(memory_format=_out_format(x))
    if activation != "none":
        grad_z, w = masked_grad(grad_y, x, w1, w2, bias, activation)
    else:
        w = compose_weight(w1, w2, x.dtype)
        grad_z = grad_y
    grad_x = _gemm(grad_z, w, C_in, 1, C_in, None, None, "none")  # B[o, c] = w[o, c]
    gz2 = _pixels_by_channels(grad_z)
    grad_w = _mm_float32(gz2.t(), _pixels_by_channels(x)).view(c_h, m, G, k)  # [j, t, g, i]
    # contiguous, as the op's fake kernel promises (einsum's result layout is its own choice)
    grad_w1 = torch.einsum("jtgi,jtg->gji", grad_w, w2.float()).to(w1.dtype).contiguous()
    grad_w2 = torch.einsum("jtgi,gji->jtg", grad_w, w1.float()).to(w2.dtype).contiguous()
    # one reduction in float32 (no float32 copy of grad_z); skipped when no bias gradient is wanted
    grad_b = gz2.sum(0, dtype=torch.float32).to(bias.dtype if bias is not None else x.dtype) if need_bias else None
    return grad_x, grad_w1, grad_w2, grad_b


def masked_grad(grad_y, x, w1, w2, bias, activation):
    """(grad_y * act'(z), W): z = x @ W^T + bias recomputed in one GEMM pass whose epilogue
    applies the mask; for 16-bit x, W in two 16-bit parts (compose_weight's split). grad_y in
    x's layout; W, rounded to x's dtype, for the grad_x product."""
    C_out = w2.shape[0] * w2.shape[1]
    if x.dtype == torch.float32:
        w, lo = compose_weight(w1, w2, x.dtype), None
    else:
        w, lo = compose_weight(w1, w2, x.dtype, split=True)
    return _gemm(x, w, 1, x.shape[1], C_out, bias, grad_y, activation, lo=lo, mask_grad=True), w


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: for 16-bit CUDA inputs cuBLAS's float32 output (no rounding of
    grad_W to 16 bits before the chain rule sums it), elsewhere in float32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    return a.float() @ b.float()
