"""Triton kernels for the shifted-window moments (falconnet_kernels/repso_moments.py), forward and backward.

Both work on tiles of BLOCK_C channels x BLOCK_P positions (positions flattened over N, H, W) and
read x through its strides, so NCHW and channels_last inputs run without a copy. Each turns the
per-channel work into batched matrix products (one per channel of the tile):

- forward: with V[c, p, pos] = the K*K shifts at the tile's positions, sum_pos V V^T gives the
  K*K x K*K second moments and sum_pos V the first. Per-program partial sums (float32) are added
  in float64 on the host side, then centred.
- backward: with T[c, pos, d] = w(v + d) at the (2K-1)^2 lags d and A[c, d, p] = G[p, p + d]
  (G = grad_cov + grad_cov^T), grad_x(v) = 1/M sum_{valid p} (c_p + (T A)[v, p]).

Precision. bf16/fp16 input: values are exact in the 16-bit type and products exact in float32,
so the forward runs on tensor cores unshifted; for bf16 the backward's float32 matrix A is split
into a high and a low bf16 part (two tensor-core products, ~2^-16 relative error, far below bf16
rounding). float32 input: the values are shifted by a per-channel sample (see the C++ kernel's
note on cancellation) and the products run in full float32 (input_precision="ieee"); the
backward does the same for float16 x, whose range cannot hold A (_split_lag).
Only Triton 3.6 APIs are used.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile sizes are autotuned on a GPU among the configurations that fit (the 3-D index and pointer
# tensors of a tile live in registers, and the batched products' operands in shared memory); the
# interpreter (TRITON_INTERPRET=1), or FALCONNET_TRITON_AUTOTUNE=0, runs the first fitting one, untimed.
_FWD_TILES = [(16, 32, 4), (16, 32, 8), (8, 32, 4), (8, 64, 8), (4, 32, 4), (4, 64, 4), (2, 32, 4), (1, 32, 4), (1, 64, 4)]
# (16, 32, 8) first: with autotuning off (tests) the first fitting tile runs, and (16, 32, 4)
# spills ~7 KB a thread for float32 x on sm_90 (triton 3.6)
_BWD_TILES = [(16, 32, 8), (16, 32, 4), (8, 32, 4), (8, 64, 8), (4, 32, 4), (4, 64, 4), (2, 32, 4), (2, 64, 4),
              (1, 32, 4), (1, 64, 4)]


def _configs(tiles) -> list:
    return [triton.Config({"BLOCK_C": c, "BLOCK_P": p}, num_warps=w) for c, p, w in tiles]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled() -> bool:
    # FALCONNET_TRITON_AUTOTUNE=0, as for the other Triton kernels: the GPU tests set it, since
    # every fitting config compiles anew for every shape (2-5 s each, ~3 minutes over the tests)
    return not _interpreting() and os.environ.get("FALCONNET_TRITON_AUTOTUNE", "1") != "0"


def _fitting(configs, fits) -> list:
    kept = [cfg for cfg in configs if fits(cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_P"])]
    return kept if _autotune_enabled() else kept[:1]


def _prune_forward(configs, named_args, **kwargs):
    # accumulator BLOCK_C * KK_PAD^2 floats <= 4096 (32 registers a thread at 4 warps); the shift
    # tile BLOCK_C * KK_PAD * BLOCK_P <= 8192: 16 channels at K = 3, 4 at K = 5, 1 at K = 7
    kk = kwargs["KK_PAD"]
    return _fitting(configs, lambda c, p: c * kk * kk <= 4096 and c * kk * p <= 8192)


def _prune_backward(configs, named_args, **kwargs):
    # lag tile (BLOCK_P x LAG_PAD) and lag matrix (LAG_PAD x KK_PAD) per channel, under 24k
    # elements (96 KB of float32 operands): 16 channels at K = 3, 2 at K = 5, 1 at K = 7
    kk, lag = kwargs["KK_PAD"], kwargs["LAG_PAD"]
    return _fitting(configs, lambda c, p: c * (p * lag + lag * kk) <= 24576)


# K is in the keys: triton caches the chosen config per key (constexprs are not part of it), so
# without K a second window size at the same shape reused the first one's tiles, unpruned (16
# channels at K = 5: 262 KB of shared memory, refused at launch)
@triton.autotune(configs=_configs(_FWD_TILES), key=["C", "H", "W", "n_pos", "K"],
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _moments_fwd_kernel(
    x_ptr, shift_ptr, sum_ptr, prod_ptr,
    C, H, W, n_pos, chunk,
    sN, sC, sH, sW,
    K: tl.constexpr, KK_PAD: tl.constexpr, SHIFT: tl.constexpr, DOT16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    P: tl.constexpr = K // 2
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, KK_PAD)
    c_ok = offs_c < C
    k_ok = offs_k < K * K
    di = offs_k // K - P
    dj = offs_k % K - P
    if SHIFT:
        a = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    acc = tl.zeros((BLOCK_C, KK_PAD, KK_PAD), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float32)
    HW = H * W
    start = pid_s * chunk
    for p0 in range(start, tl.minimum(start + chunk, n_pos), BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        n = offs_p // HW
        rem = offs_p % HW
        i = rem // W
        j = rem % W
        # [BLOCK_C, KK_PAD, BLOCK_P]: channel, shift, position
        ii = i[None, None, :] + di[None, :, None]
        jj = j[None, None, :] + dj[None, :, None]
        live = c_ok[:, None, None] & k_ok[None, :, None] & (offs_p < n_pos)[None, None, :]
        inside = live & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        ptrs = x_ptr + offs_c[:, None, None] * sC + n[None, None, :] * sN + ii * sH + jj * sW
        v = tl.load(ptrs, mask=inside, other=0.0)
        if SHIFT:
            # w = xp - a everywhere in the padded window (padding included), 0 off the tile
            v = tl.where(live, v.to(tl.float32) - a[:, None, None], 0.0)
            acc = tl.dot(v, tl.permute(v, (0, 2, 1)), acc, input_precision="ieee")
        elif DOT16:
            acc = tl.dot(v, tl.permute(v, (0, 2, 1)), acc)
        else:
            v = v.to(tl.float32)
            acc = tl.dot(v, tl.permute(v, (0, 2, 1)), acc, input_precision="ieee")
        acc_s += tl.sum(v.to(tl.float32), axis=2)
    base = pid_s * C + offs_c
    tl.store(sum_ptr + base[:, None] * KK_PAD + offs_k[None, :], acc_s, mask=c_ok[:, None])
    out = prod_ptr + (base[:, None, None] * KK_PAD + offs_k[None, :, None]) * KK_PAD + offs_k[None, None, :]
    tl.store(out, acc, mask=c_ok[:, None, None])


@triton.autotune(configs=_configs(_BWD_TILES), key=["C", "H", "W", "n_pos", "K", "HAS_CONV"],
                 prune_configs_by={"early_config_prune": _prune_backward})
@triton.jit
def _moments_bwd_kernel(
    x_ptr, gx_ptr, a_hi_ptr, a_lo_ptr, cst_ptr, shift_ptr, gy_ptr, w_ptr,
    C, H, W, n_pos, inv_M,
    sN, sC, sH, sW, gN, gC, gH, gW, yN, yC, yH, yW,
    K: tl.constexpr, KK_PAD: tl.constexpr, LAG_PAD: tl.constexpr, SPLIT: tl.constexpr, DOT16: tl.constexpr,
    HAS_CONV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # positions on grid axis 0 (up to 2^31 - 1 programs): axis 1 allows only 65535, which
    # cdiv(N*H*W, BLOCK_P) passes from N*H*W > 2.1M (batch 256 at 112x112)
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    P: tl.constexpr = K // 2
    L: tl.constexpr = 2 * K - 1
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, LAG_PAD)
    offs_k = tl.arange(0, KK_PAD)
    c_ok = offs_c < C
    p_ok = offs_p < n_pos
    HW = H * W
    n = offs_p // HW
    rem = offs_p % HW
    i = rem // W
    j = rem % W
    # T[c, pos, d] = w(v + d), lags d = (di, dj) in [-(K-1), K-1]^2
    ii = i[None, :, None] + (offs_d // L - (K - 1))[None, None, :]
    jj = j[None, :, None] + (offs_d % L - (K - 1))[None, None, :]
    live = c_ok[:, None, None] & p_ok[None, :, None] & (offs_d < L * L)[None, None, :]
    inside = live & (ii >= -P) & (ii < H + P) & (jj >= -P) & (jj < W + P)
    in_x = inside & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    ptrs = x_ptr + offs_c[:, None, None] * sC + n[None, :, None] * sN + ii * sH + jj * sW
    t = tl.load(ptrs, mask=in_x, other=0.0)
    a_off = (offs_c[:, None, None] * LAG_PAD + offs_d[None, :, None]) * KK_PAD + offs_k[None, None, :]
    a_mask = c_ok[:, None, None]
    if SPLIT:
        # 16-bit x is exact in its type: two tensor-core products with A = A_hi + A_lo
        a_hi = tl.load(a_hi_ptr + a_off, mask=a_mask, other=0.0)
        a_lo = tl.load(a_lo_ptr + a_off, mask=a_mask, other=0.0)
        if DOT16:
            r = tl.dot(t, a_hi)
            r = tl.dot(t, a_lo, r)
        else:
            t = t.to(tl.float32)
            r = tl.dot(t, a_hi.to(tl.float32), input_precision="ieee")
            r = tl.dot(t, a_lo.to(tl.float32), r, input_precision="ieee")
    else:
        a = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
        t = tl.where(inside, t.to(tl.float32) - a[:, None, None], 0.0)
        a_full = tl.load(a_hi_ptr + a_off, mask=a_mask, other=0.0)
        r = tl.dot(t, a_full, input_precision="ieee")
    cst = tl.load(cst_ptr + offs_c[:, None] * KK_PAD + offs_k[None, :], mask=c_ok[:, None], other=0.0)
    # shift p contributes where its output position v - p + P is in the image
    oi = i[:, None] - (offs_k // K)[None, :] + P
    oj = j[:, None] - (offs_k % K)[None, :] + P
    valid = (offs_k < K * K)[None, :] & (oi >= 0) & (oi < H) & (oj >= 0) & (oj < W)  # [BLOCK_P, KK_PAD]
    g = tl.sum(tl.where(valid[None, :, :], r + cst[:, None, :], 0.0), axis=2) * inv_M
    out_ok = c_ok[:, None] & p_ok[None, :]
    if HAS_CONV:
        # + the input gradient of RepSO's KxK depthwise conv (padding P) with weight w (C, K*K):
        # sum over taps (a, b) of w[a, b] grad_y(i + P - a, j + P - b)
        for t in tl.static_range(K * K):
            yi = i + (P - t // K)
            yj = j + (P - t % K)
            y_ok = out_ok & ((yi >= 0) & (yi < H) & (yj >= 0) & (yj < W))[None, :]
            gy = tl.load(gy_ptr + offs_c[:, None] * yC + (n * yN + yi * yH + yj * yW)[None, :], mask=y_ok, other=0.0)
            wt = tl.load(w_ptr + offs_c * (K * K) + t, mask=c_ok, other=0.0).to(tl.float32)
            g += gy.to(tl.float32) * wt[:, None]
    out = gx_ptr + offs_c[:, None] * gC + n[None, :] * gN + i[None, :] * gH + j[None, :] * gW
    tl.store(out, g.to(gx_ptr.dtype.element_ty), mask=out_ok)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Per-channel shift: the centre sample of the first image (float32)."""
    N, C, H, W = x.shape
    return x[0, :, H // 2, W // 2].float().contiguous()


def _dot16() -> bool:
    # The interpreter (TRITON_INTERPRET=1, numpy) has no bf16 matmul: there the 16-bit products
    # run in float32, which gives the same values (16-bit products are exact in float32).
    return not _interpreting()


def _check(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton repso_moments kernels take float32, bfloat16 or float16 x, got {x.dtype}")


def forward_partials(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel's raw output: per position split, float32 sums (n_split, C, KK_PAD) and
    products (n_split, C, KK_PAD, KK_PAD) of the shifted values, and the per-channel shift (C,)
    they were taken about (0 for 16-bit x). repso_moments_forward centres them; RepSO's fused
    fold (triton_repso_fold.fold_forward) takes them as they are."""
    N, C, H, W = x.shape
    KK_PAD = _pow2(K * K)
    n_pos = N * H * W
    _check(x)
    shift_values = x.dtype == torch.float32
    n_cblocks = triton.cdiv(C, 16)
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4
    n_split = max(1, min(triton.cdiv(n_pos, 64), triton.cdiv(target, n_cblocks)))
    chunk = triton.cdiv(triton.cdiv(n_pos, n_split), 64) * 64  # a multiple of every BLOCK_P
    n_split = triton.cdiv(n_pos, chunk)
    shift = _shift(x) if shift_values else torch.zeros(C, device=x.device, dtype=torch.float32)
    sums = torch.empty((n_split, C, KK_PAD), device=x.device, dtype=torch.float32)
    prods = torch.empty((n_split, C, KK_PAD, KK_PAD), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), n_split)  # noqa: E731
    _moments_fwd_kernel[grid](
        x, shift, sums, prods, C, H, W, n_pos, chunk, *x.stride(),
        K=K, KK_PAD=KK_PAD, SHIFT=shift_values, DOT16=_dot16(),
    )
    return sums, prods, shift


def repso_moments_forward(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = x.shape
    KK, n_pos = K * K, N * H * W
    sums, prods, shift = forward_partials(x, K)
    ew = sums.sum(0, dtype=torch.float64)[:, :KK] / n_pos
    second = prods.sum(0, dtype=torch.float64)[:, :KK, :KK] / n_pos
    cov = second - ew.unsqueeze(-1) * ew.unsqueeze(-2)
    mean = ew + shift.double().unsqueeze(-1)
    return mean.float(), cov.float()


def _split_lag(dtype: torch.dtype) -> bool:
    """Whether the backward's lag matrix goes to the tensor cores as two parts of x's 16-bit type
    (bf16: float32's exponent range). float16 takes the float32 route instead: the matrix grows
    with the position count and with 1/std^3 of the branches and overflowed float16's 65504 (a
    review measured 2.8e7 for a channel of std 0.01), and its low part underflowed."""
    return dtype == torch.bfloat16


def _lag_matrix(g_sym: torch.Tensor, K: int, lag_pad: int, kk_pad: int) -> torch.Tensor:
    """A[c, d, p] = G[c, p, p + d] where p + d is in the window, else 0: (C, lag_pad, kk_pad)."""
    C = g_sym.shape[0]
    L = 2 * K - 1
    p = torch.arange(K * K, device=g_sym.device)
    q = torch.arange(K * K, device=g_sym.device)
    d = ((q // K)[None, :] - (p // K)[:, None] + K - 1) * L + ((q % K)[None, :] - (p % K)[:, None] + K - 1)  # (p, q)
    A = g_sym.new_zeros((C, lag_pad, kk_pad))
    A[:, d, p[:, None].expand_as(d)] = g_sym  # every (p, q) has its own (d, p)
    return A


def repso_moments_backward(
    grad_mean: torch.Tensor, grad_cov: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, K: int
) -> torch.Tensor:
    N, C, H, W = x.shape
    KK, KK_PAD, LAG_PAD = K * K, _pow2(K * K), _pow2((2 * K - 1) ** 2)
    _check(x)
    split = _split_lag(x.dtype)
    g_sym = (grad_cov + grad_cov.transpose(1, 2)).double()
    mean64 = mean.double()
    # the shift: the centre mean for float32 (centres the stencil's terms), none for 16-bit x
    shift = mean64[:, KK // 2] if not split else torch.zeros(C, device=x.device, dtype=torch.float64)
    cst = grad_mean.double() - (g_sym @ (mean64 - shift[:, None]).unsqueeze(-1)).squeeze(-1)
    cst_pad = torch.zeros((C, KK_PAD), device=x.device, dtype=torch.float32)
    cst_pad[:, :KK] = cst.float()
    A = _lag_matrix(g_sym, K, LAG_PAD, KK_PAD)
    if split:
        a_hi = A.to(x.dtype)
        a_lo = (A - a_hi.double()).to(x.dtype)
    else:
        a_hi = a_lo = A.float()
    return backward_launch(x, a_hi, a_lo, cst_pad, shift.float(), K)


def backward_launch(x: torch.Tensor, a_hi: torch.Tensor, a_lo: torch.Tensor, cst: torch.Tensor,
                    shift: torch.Tensor, K: int, conv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """grad_x from the backward kernel's prepared inputs: the lag matrix A (C, LAG_PAD, KK_PAD) as
    x's 16-bit type in a high and a low part, or as float32 (a_lo unused), the constant (C,
    KK_PAD) and the shift (C,), float32. conv = (grad_y, weight (C, 1, K, K)): the kernel also adds
    the input gradient of the KxK depthwise conv (padding K//2) of x with that weight, from 9
    (K*K) taps of grad_y: RepSO's conv then needs no input-gradient pass of its own."""
    N, C, H, W = x.shape
    KK_PAD, LAG_PAD = _pow2(K * K), _pow2((2 * K - 1) ** 2)
    n_pos = N * H * W
    split = _split_lag(x.dtype)
    gx = torch.empty_like(x)
    if conv is not None:
        grad_y, weight = conv
        if grad_y.shape != x.shape or weight.numel() != C * K * K:
            raise ValueError(f"conv must be (grad_y of x's shape {tuple(x.shape)}, a ({C}, 1, {K}, {K}) weight), got "
                             f"{tuple(grad_y.shape)} and {tuple(weight.shape)}")
        weight = weight.reshape(C, K * K).contiguous()
    else:
        grad_y, weight = gx, gx
    grid = lambda meta: (triton.cdiv(n_pos, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _moments_bwd_kernel[grid](
        x, gx, a_hi.contiguous(), a_lo.contiguous(), cst.contiguous(), shift.contiguous(), grad_y, weight,
        C, H, W, n_pos, 1.0 / n_pos, *x.stride(), *gx.stride(), *grad_y.stride(),
        K=K, KK_PAD=KK_PAD, LAG_PAD=LAG_PAD, SPLIT=split, DOT16=_dot16(), HAS_CONV=conv is not None,
    )
    return gx
