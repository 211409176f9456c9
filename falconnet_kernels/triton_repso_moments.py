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
K = 3 (RepSO's default, every 3x3 row of Table 3) has its own pair of row-wise kernels on CUDA
cores (_moments3_fwd_kernel, _moments3_bwd_kernel; the generic ones measured 3% of copy on an
H100): the forward keeps the 9 sums and 45 pair products per lane in registers, the backward is a
5x5 stencil of x with per-position-class float32 weights (whatever x's dtype: no hi/lo split).
Only Triton 3.6 APIs are used.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._backend import triton_autotune_enabled as _autotune_enabled
from ._backend import triton_interpreting as _interpreting

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


# ---------------------------------------------------------------------------------------------
# K = 3 (every 3x3 row of Table 3, RepSO's default): row-wise kernels on CUDA cores. The generic
# kernels above gather a (channels x taps x positions) tile through 3-D index tensors and
# contract it on tensor cores; on an H100 (2026-11-26, bf16, batch 128) the forward ran at
# ~90 GB/s and the backward at ~100 GB/s, 3% of copy, most of RepSO's one-conv training step.
# These walk image rows instead, BLOCK_W output columns a step kept as separate (BLOCK_C,) channel
# vectors in a tuple, so each column loaded for a row serves every tap beside it (_load_columns).

_FWD3_TILES = [(8, 128, 4), (7, 128, 4), (4, 128, 4), (8, 64, 2), (4, 256, 8)]  # (output columns, channels, warps)
_BWD3_TILES = [(8, 128, 4), (7, 128, 4), (4, 128, 4), (8, 256, 4), (7, 256, 4)]  # (output columns, channels, warps)


def _configs_wc(tiles) -> list:
    return [triton.Config({"BLOCK_W": w, "BLOCK_C": c}, num_warps=nw) for w, c, nw in tiles]


def _first_unless_tuning(configs, named_args, **kwargs):
    return configs if _autotune_enabled() else configs[:1]


@triton.jit
def _load_columns(row_ptr, row_ok, j_first, W, sW, shift, N: tl.constexpr, SUB: tl.constexpr):
    """N columns j_first .. j_first + N - 1 of one image row as float32 (BLOCK_C,) vectors (a
    tuple), 0 outside the map; minus shift (BLOCK_C,) if SUB (so -shift outside the map)."""
    cols = ()
    for k in tl.static_range(N):
        jj = j_first + k
        v = tl.load(row_ptr + jj * sW, mask=row_ok & (jj >= 0) & (jj < W), other=0.0).to(tl.float32)
        if SUB:
            v = v - shift
        cols = cols + (v,)
    return cols


@triton.jit
def _zeros_tuple(N: tl.constexpr, BLOCK_C: tl.constexpr):
    out = ()
    for _ in tl.static_range(N):
        out = out + (tl.zeros((BLOCK_C,), dtype=tl.float32),)
    return out


@triton.jit
def _add_tuples(a, b, N: tl.constexpr):
    out = ()
    for t in tl.static_range(N):
        out = out + (a[t] + b[t],)
    return out


@triton.jit
def _store_tuple(ptr, vals, C, mask, N: tl.constexpr):
    """vals[t] to ptr + t * C: a (N, C) block of per-channel rows."""
    for t in tl.static_range(N):
        tl.store(ptr + t * C, vals[t], mask=mask)


@triton.autotune(configs=_configs_wc(_FWD3_TILES), key=["C", "H", "W", "n_rows"],
                 prune_configs_by={"early_config_prune": _first_unless_tuning})
@triton.jit
def _moments3_fwd_kernel(
    x_ptr, shift_ptr, part_ptr,
    C, H, W, n_rows, chunk,
    sN, sC, sH, sW,
    SHIFT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per program: the 9 tap sums and the 45 tap-pair products (p <= q) over its rows (n, i) of
    the flattened N*H, for BLOCK_C channels, into part (n_split, 54, C), float32: 54 accumulators
    a channel (tuples of (BLOCK_C,) vectors: registers), summed per row first and then over the
    rows (float32 error grows with W + rows, not W * rows). BLOCK_W output columns a step: the
    3 x (BLOCK_W + 2) values they read are loaded once as separate vectors, each serving the up
    to 3 taps that touch it."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    a = 0.0  # 16-bit x: no shift, and no subtraction (SUB=SHIFT below)
    if SHIFT:
        a = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    acc = _zeros_tuple(54, BLOCK_C)  # 9 sums, then the 45 products p <= q
    r0 = pid_s * chunk
    for r in range(r0, tl.minimum(r0 + chunk, n_rows)):
        n = r // H
        i = r % H
        x_c = x_ptr + n * sN + offs_c * sC
        row = _zeros_tuple(54, BLOCK_C)
        for j0 in range(0, W, BLOCK_W):
            # u = x - a in the padded window (padding: -a), as 3 rows of BLOCK_W + 2 columns
            cols = ()
            for ri in tl.static_range(3):
                row_ok = c_ok & (i + ri - 1 >= 0) & (i + ri - 1 < H)
                cols = cols + _load_columns(x_c + (i + ri - 1) * sH, row_ok, j0 - 1, W, sW, a, BLOCK_W + 2, SHIFT)
            for jo in tl.static_range(BLOCK_W):
                live = c_ok & (j0 + jo < W)  # 0 off the tile
                u = ()
                for q in tl.static_range(9):
                    u = u + (tl.where(live, cols[(q // 3) * (BLOCK_W + 2) + jo + q % 3], 0.0),)
                new_row = ()
                for q in tl.static_range(9):
                    new_row = new_row + (row[q] + u[q],)
                for p in tl.static_range(9):
                    for q in tl.static_range(p, 9):
                        new_row = new_row + (row[9 + p * 9 - p * (p - 1) // 2 + q - p] + u[p] * u[q],)
                row = new_row
        acc = _add_tuples(acc, row, 54)
    _store_tuple(part_ptr + pid_s * 54 * C + offs_c, acc, C, c_ok, 54)


@triton.autotune(configs=_configs_wc(_BWD3_TILES), key=["C", "H", "W", "n_rows", "HAS_CONV"],
                 prune_configs_by={"early_config_prune": _first_unless_tuning})
@triton.jit
def _moments3_bwd_kernel(
    x_ptr, gx_ptr, tab_ptr, cst_ptr, bd_ptr, bc_ptr, shift_ptr, gy_ptr, w_ptr,
    C, H, W, n_rows, chunk,
    sN, sC, sH, sW, gN, gC, gH, gW, yN, yC, yH, yW,
    HAS_CONV: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x of the moments (and of the conv, HAS_CONV) over a chunk of rows (n, i): a 5x5
    stencil of u = x - a whose float32 weights depend on which of the 9 shifts p have their output
    position v - p in the map, i.e. on the position's class (_class_tables): tab (4, 25, C) and
    cst (4, C) for each row class (has a row above, has one below) with both column neighbours,
    and the change at the border columns: for column 0 (left), W - 1 (right) and a 1-wide map
    (single), bd (4, 3, 5, C) weights for u at the border column itself in the 5 lag rows, and bc
    (4, 3, C) constants (the other columns the change touches lie off the map, where u = -a).

    BLOCK_W output columns are separate (BLOCK_C,) vectors (a tuple), so each column loaded for a
    lag row serves the 5 column lags of the outputs beside it: BLOCK_W + 4 loads for 5 * BLOCK_W
    products (a 2-D tile loaded once per lag took ~370 instructions an output on sm_90)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    a = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    r0 = pid_r * chunk
    for r in range(r0, tl.minimum(r0 + chunk, n_rows)):
        n = r // H
        i = r % H
        rc = tl.minimum(i, 1) * 2 + tl.minimum(H - 1 - i, 1)  # (has a row above, has one below)
        x_c = x_ptr + n * sN + offs_c * sC
        gy_c = gy_ptr + n * yN + offs_c * yC
        out_c = gx_ptr + n * gN + i * gH + offs_c * gC
        tab_c = tab_ptr + rc * 25 * C + offs_c
        cst_c = tl.load(cst_ptr + rc * C + offs_c, mask=c_ok, other=0.0)
        # the border columns' corrections for this row: left, right, single
        bc_c = bc_ptr + rc * 3 * C + offs_c
        bd_c = bd_ptr + rc * 15 * C + offs_c
        corr_l = tl.load(bc_c, mask=c_ok, other=0.0)
        corr_r = tl.load(bc_c + C, mask=c_ok, other=0.0)
        corr_s = tl.load(bc_c + 2 * C, mask=c_ok, other=0.0)
        for e in tl.static_range(5):  # lag row e - 2
            row_ok = c_ok & (i + e - 2 >= 0) & (i + e - 2 < H)
            u0 = tl.load(x_c + (i + e - 2) * sH, mask=row_ok, other=0.0).to(tl.float32) - a
            u1 = tl.load(x_c + (i + e - 2) * sH + (W - 1) * sW, mask=row_ok, other=0.0).to(tl.float32) - a
            corr_l += tl.load(bd_c + e * C, mask=c_ok, other=0.0) * u0
            corr_r += tl.load(bd_c + (5 + e) * C, mask=c_ok, other=0.0) * u1
            corr_s += tl.load(bd_c + (10 + e) * C, mask=c_ok, other=0.0) * u0
        corr_first = tl.where(W == 1, corr_s, corr_l)
        corr_last = tl.where(W == 1, 0.0, corr_r)
        for j0 in range(0, W, BLOCK_W):
            g = ()
            for _ in tl.static_range(BLOCK_W):
                g = g + (cst_c,)
            for di in range(-2, 3):
                row_ok = c_ok & (i + di >= 0) & (i + di < H)
                cols = _load_columns(x_c + (i + di) * sH, row_ok, j0 - 2, W, sW, a, BLOCK_W + 4, True)
                w5 = ()
                for dj in tl.static_range(5):
                    w5 = w5 + (tl.load(tab_c + ((di + 2) * 5 + dj) * C, mask=c_ok, other=0.0),)
                new_g = ()
                for jo in tl.static_range(BLOCK_W):
                    acc = g[jo]
                    for dj in tl.static_range(5):
                        acc += w5[dj] * cols[jo + dj]
                    new_g = new_g + (acc,)
                g = new_g
            if HAS_CONV:
                # + sum over taps (ta, tb) of w[ta, tb] grad_y(i + 1 - ta, j + 1 - tb), 0 off the map
                for ta in range(0, 3):
                    row_ok = c_ok & (i + 1 - ta >= 0) & (i + 1 - ta < H)
                    cols = _load_columns(gy_c + (i + 1 - ta) * yH, row_ok, j0 - 1, W, yW, 0.0, BLOCK_W + 2, False)
                    w3 = ()
                    for tb in tl.static_range(3):
                        w3 = w3 + (tl.load(w_ptr + offs_c * 9 + ta * 3 + tb, mask=c_ok, other=0.0).to(tl.float32),)
                    new_g = ()
                    for jo in tl.static_range(BLOCK_W):
                        new_g = new_g + (g[jo] + w3[0] * cols[jo + 2] + w3[1] * cols[jo + 1] + w3[2] * cols[jo],)
                    g = new_g
            for jo in tl.static_range(BLOCK_W):
                j = j0 + jo
                out = g[jo] + tl.where(j == 0, corr_first, 0.0) + tl.where(j == W - 1, corr_last, 0.0)
                tl.store(out_c + j * gW, out.to(gx_ptr.dtype.element_ty), mask=c_ok & (j < W))


_WG3_TILES = [(8, 128, 4), (7, 128, 4), (16, 128, 4), (8, 256, 4)]  # (output columns, channels, warps)


@triton.autotune(configs=_configs_wc(_WG3_TILES), key=["C", "H", "W", "n_rows"],
                 prune_configs_by={"early_config_prune": _first_unless_tuning})
@triton.jit
def _conv3_wgrad_kernel(
    gy_ptr, x_ptr, part_ptr,
    C, H, W, n_rows, chunk,
    sN, sC, sH, sW, yN, yC, yH, yW,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The stride-1, padding-1 depthwise 3x3 conv's weight and bias gradients over a chunk of rows
    (n, i), into part (n_split, 10, C) float32: sum_o grad_y(o) x(o + (ta - 1, tb - 1)) for the 9
    taps, and sum_o grad_y(o). The row kernels' layout: BLOCK_W output columns as separate
    (BLOCK_C,) vectors, each x column loaded once for the 3 taps beside it; sums per row, then
    over the rows."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = _zeros_tuple(10, BLOCK_C)
    r0 = pid_s * chunk
    for r in range(r0, tl.minimum(r0 + chunk, n_rows)):
        n = r // H
        i = r % H
        x_c = x_ptr + n * sN + offs_c * sC
        gy_c = gy_ptr + n * yN + i * yH + offs_c * yC
        row = _zeros_tuple(10, BLOCK_C)
        for j0 in range(0, W, BLOCK_W):
            gy = _load_columns(gy_c, c_ok, j0, W, yW, 0.0, BLOCK_W, False)
            new_row = ()
            for ta in tl.static_range(3):
                row_ok = c_ok & (i + ta - 1 >= 0) & (i + ta - 1 < H)
                cols = _load_columns(x_c + (i + ta - 1) * sH, row_ok, j0 - 1, W, sW, 0.0, BLOCK_W + 2, False)
                for tb in tl.static_range(3):
                    t = row[ta * 3 + tb]
                    for jo in tl.static_range(BLOCK_W):
                        t += gy[jo] * cols[jo + tb]
                    new_row = new_row + (t,)
            t = row[9]
            for jo in tl.static_range(BLOCK_W):
                t += gy[jo]
            row = new_row + (t,)
        acc = _add_tuples(acc, row, 10)
    _store_tuple(part_ptr + pid_s * 10 * C + offs_c, acc, C, c_ok, 10)


_CONV3_TILES = [(8, 128, 4), (7, 128, 4), (16, 128, 4), (8, 256, 4)]  # (output columns, channels, warps)


@triton.autotune(configs=_configs_wc(_CONV3_TILES), key=["C", "H", "W", "n_rows", "ACT"],
                 prune_configs_by={"early_config_prune": _first_unless_tuning})
@triton.jit
def _conv3_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, n_rows, chunk,
    sN, sC, sH, sW, oN, oC, oH, oW,
    ACT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act(bias + sum over taps (ta, tb) of w[ta, tb] x(i + ta - 1, j + tb - 1)), the stride-1,
    padding-1 depthwise 3x3 conv, over a chunk of rows (n, i); float32 accumulation. ACT: 0 none,
    1 relu, 2 relu6. The row kernels' layout: BLOCK_W output columns as (BLOCK_C,) vectors, each x
    column loaded once for the 3 taps beside it."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    bias = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    w = ()
    for t in tl.static_range(9):
        w = w + (tl.load(w_ptr + offs_c * 9 + t, mask=c_ok, other=0.0).to(tl.float32),)
    r0 = pid_s * chunk
    for r in range(r0, tl.minimum(r0 + chunk, n_rows)):
        n = r // H
        i = r % H
        x_c = x_ptr + n * sN + offs_c * sC
        y_c = y_ptr + n * oN + i * oH + offs_c * oC
        for j0 in range(0, W, BLOCK_W):
            acc = ()
            for _ in tl.static_range(BLOCK_W):
                acc = acc + (bias,)
            for ta in tl.static_range(3):
                row_ok = c_ok & (i + ta - 1 >= 0) & (i + ta - 1 < H)
                cols = _load_columns(x_c + (i + ta - 1) * sH, row_ok, j0 - 1, W, sW, 0.0, BLOCK_W + 2, False)
                new_acc = ()
                for jo in tl.static_range(BLOCK_W):
                    new_acc = new_acc + (acc[jo] + w[ta * 3] * cols[jo] + w[ta * 3 + 1] * cols[jo + 1]
                                         + w[ta * 3 + 2] * cols[jo + 2],)
                acc = new_acc
            for jo in tl.static_range(BLOCK_W):
                out = acc[jo]
                if ACT == 1:
                    out = tl.maximum(out, 0.0)
                elif ACT == 2:
                    out = tl.minimum(tl.maximum(out, 0.0), 6.0)
                tl.store(y_c + (j0 + jo) * oW, out.to(y_ptr.dtype.element_ty), mask=c_ok & (j0 + jo < W))


_ACT_CODE = {"none": 0, "relu": 1, "relu6": 2}


def conv3_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """act(conv2d(x, weight (C, 1, 3, 3), bias (C,), padding=1, groups=C)) in x's dtype and layout
    (activation "none", "relu" or "relu6"): RepSO's one-node GPU path (repso_train.CONV = "rows")."""
    _check(x)
    N, C, H, W = x.shape
    if weight.numel() != 9 * C or bias.shape != (C,):
        raise ValueError(f"weight must be ({C}, 1, 3, 3) and bias ({C},) for x with {C} channels, got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {tuple(_ACT_CODE)}, got {activation!r}")
    y = torch.empty_like(x)
    n_rows = N * H
    if x.numel() == 0:
        return y
    chunk = triton.cdiv(n_rows, _row_programs(x, n_rows, 16))
    grid = lambda meta: (triton.cdiv(n_rows, chunk), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _conv3_fwd_kernel[grid](x, weight.reshape(C, 9).contiguous(), bias.contiguous(), y, C, H, W, n_rows, chunk,
                            *x.stride(), *y.stride(), ACT=_ACT_CODE[activation])
    return y


def conv3_weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (C, 1, 3, 3), grad_bias (C,)), float32, of the stride-1 depthwise 3x3 conv of x
    (padding 1, no activation) for grad_y of x's shape (conv3_weight_grad_totals, formatted)."""
    total = conv3_weight_grad_totals(grad_y, x).float()
    C = x.shape[1]
    return total[:9].t().reshape(C, 1, 3, 3), total[9]


def conv3_weight_grad_totals(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same gradients as one (10, C) float64 tensor: rows 0-8 the 9 taps' weight gradients, row
    9 the bias gradient (per-split float32 partials added in float64). RepSO's one-node GPU path
    (repso_train.WEIGHT_GRAD = "rows") hands rows 0-8 transposed and row 9 to the fold backward as
    they are: two launches, the kernel and the sum."""
    _check(x)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    N, C, H, W = x.shape
    n_rows = N * H
    if x.numel() == 0:
        return torch.zeros((10, C), device=x.device, dtype=torch.float64)
    chunk = triton.cdiv(n_rows, _row_programs(x, n_rows, 4))
    n_split = triton.cdiv(n_rows, chunk)
    part = torch.empty((n_split, 10, C), device=x.device, dtype=torch.float32)
    grid = lambda meta: (n_split, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _conv3_wgrad_kernel[grid](grad_y, x, part, C, H, W, n_rows, chunk, *x.stride(), *grad_y.stride())
    return part.sum(0, dtype=torch.float64)


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
    they were taken about (0 for 16-bit x). K = 3: the splits already added, float64, n_split = 1.
    repso_moments_forward centres them; RepSO's fused fold (triton_repso_fold.fold_forward) takes
    them as they are."""
    N, C, H, W = x.shape
    KK_PAD = _pow2(K * K)
    n_pos = N * H * W
    _check(x)
    shift_values = x.dtype == torch.float32
    if K == 3 and n_pos > 0:
        total, shift = forward_totals3(x)
        # laid out as the generic kernel's padded sums and products (one split)
        total = torch.cat([total, total.new_zeros((1, C))])
        expanded = total[_padded_index(x.device)].t()  # (C, 16 + 256)
        sums = expanded[:, :KK_PAD].contiguous().unsqueeze(0)
        return sums, expanded[:, KK_PAD:].contiguous().view(1, C, KK_PAD, KK_PAD), shift
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


def forward_totals3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K = 3: (totals (54, C) float64 - the 9 tap sums, then the 45 pair products p <= q of the
    shifted values over all positions - and the shift (C,) float32 they were taken about; 0 for
    16-bit x). The row kernel's per-split float32 partials added by one parallel reduction (the
    fold kernel's loop over splits is serial); fold_forward takes the totals as they are."""
    _check(x)
    N, C, H, W = x.shape
    n_rows = N * H
    chunk = triton.cdiv(n_rows, _row_programs(x, n_rows, 4))
    n_split = triton.cdiv(n_rows, chunk)
    shift_values = x.dtype == torch.float32
    shift = _shift(x) if shift_values else torch.zeros(C, device=x.device, dtype=torch.float32)
    part = torch.empty((n_split, 54, C), device=x.device, dtype=torch.float32)
    grid = lambda meta: (n_split, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _moments3_fwd_kernel[grid](x, shift, part, C, H, W, n_rows, chunk, *x.stride(), SHIFT=shift_values)
    return part.sum(0, dtype=torch.float64), shift


def repso_moments_forward(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = x.shape
    KK, n_pos = K * K, N * H * W
    sums, prods, shift = forward_partials(x, K)
    ew = sums.sum(0, dtype=torch.float64)[:, :KK] / n_pos
    second = prods.sum(0, dtype=torch.float64)[:, :KK, :KK] / n_pos
    cov = second - ew.unsqueeze(-1) * ew.unsqueeze(-2)
    mean = ew + shift.double().unsqueeze(-1)
    return mean.float(), cov.float()


def _split_lag(dtype: torch.dtype, K: int) -> bool:
    """Whether the backward's lag matrix goes to the tensor cores as two parts of x's 16-bit type
    (bf16: float32's exponent range). float16 takes the float32 route instead: the matrix grows
    with the position count and with 1/std^3 of the branches and overflowed float16's 65504 (a
    review measured 2.8e7 for a channel of std 0.01), and its low part underflowed. K = 3 never
    splits: its kernel (_moments3_bwd_kernel) multiplies in float32 on CUDA cores."""
    return dtype == torch.bfloat16 and K != 3


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


def backward3_launch(x: torch.Tensor, tab: torch.Tensor, cst: torch.Tensor, bd: torch.Tensor, bc: torch.Tensor,
                     shift: torch.Tensor, conv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     gx: torch.Tensor | None = None) -> torch.Tensor:
    """K = 3 grad_x from the class tables (_class_tables, or triton_repso_fold.fold_backward with
    n_pos), the shift (C,) float32 and optionally conv = (grad_y, weight) as in backward_launch."""
    N, C, H, W = x.shape
    if gx is None:
        gx = torch.empty_like(x)
    if conv is not None:
        grad_y, weight = conv[0], conv[1].reshape(C, 9).contiguous()
    else:
        grad_y, weight = gx, gx
    n_rows = N * H
    if x.numel() == 0:
        return gx
    chunk = triton.cdiv(n_rows, _row_programs(x, n_rows, 16))
    grid = lambda meta: (triton.cdiv(n_rows, chunk), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _moments3_bwd_kernel[grid](
        x, gx, tab, cst, bd, bc, shift, grad_y, weight,
        C, H, W, n_rows, chunk, *x.stride(), *gx.stride(), *grad_y.stride(), HAS_CONV=conv is not None,
    )
    return gx


def _row_programs(x: torch.Tensor, n_rows: int, per_sm: int) -> int:
    """How many row chunks the K = 3 kernels split N*H rows into: about per_sm programs an SM
    over channel blocks of 128 (their tiles' width; 4 programs on the CPU, where the interpreter
    runs them)."""
    target = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n_rows, triton.cdiv(target, triton.cdiv(x.shape[1], 128))))


_PADDED_INDEX: dict = {}


def _padded_index(device) -> torch.Tensor:
    """(16 + 256,) rows of the K = 3 kernel's 54 totals (plus a zero row, 54) that make the padded
    sums (16,) and symmetric products (16, 16) the fold kernel reads."""
    key = str(device)
    if key not in _PADDED_INDEX:
        tri = {}
        for p in range(9):
            for q in range(p, 9):
                tri[p, q] = tri[q, p] = 9 + p * 9 - p * (p - 1) // 2 + q - p
        sums = [q if q < 9 else 54 for q in range(16)]
        prods = [tri.get((p, q), 54) for p in range(16) for q in range(16)]
        _PADDED_INDEX[key] = torch.tensor(sums + prods, device=device)
    return _PADDED_INDEX[key]


_CLASS_VALID: dict = {}


def _class_validity(device) -> torch.Tensor:
    """(16, 9) float32: V[class, p] = 1 where shift p = (pi, pj) of the 3x3 window has its output
    position v - p + 1 in the map, for a position v of that class. class = row * 4 + column, each
    (has a neighbour before) * 2 + (has one after): pi is valid from 1 - after to 1 + before."""
    key = str(device)
    if key not in _CLASS_VALID:
        cls = torch.arange(16)
        rb, ra, cb, ca = cls // 8, cls // 4 % 2, cls // 2 % 2, cls % 2
        p = torch.arange(9)
        pi, pj = p // 3, p % 3
        row = (pi[None, :] >= 1 - ra[:, None]) & (pi[None, :] <= 1 + rb[:, None])
        col = (pj[None, :] >= 1 - ca[:, None]) & (pj[None, :] <= 1 + cb[:, None])
        _CLASS_VALID[key] = (row & col).float().to(device)
    return _CLASS_VALID[key]


def _class_tables(A: torch.Tensor, cst: torch.Tensor, shift: torch.Tensor, inv_M: float) -> tuple[torch.Tensor, ...]:
    """The K = 3 backward kernel's float32 weights from the lag matrix A (C, >= 25, >= 9), the
    constant cst (C, >= 9) and the shift a (C,): for a position of class k, the sum over its valid
    shifts p of A[c, d, p] / M (per lag d) and of cst[c, p] / M. Returned for the kernel:
    tab (4, 25, C) and cst (4, C) of the 4 row classes with both column neighbours; bd (4, 3, 5, C),
    the change of the lag-(di, 0) weights at a left border, right border and 1-wide column; bc
    (4, 3, C), the constant's change there plus -a times the change of the weights whose column
    lies off the map."""
    V = _class_validity(A.device)
    C = A.shape[0]
    tab = torch.einsum("kp,cdp->kdc", V, A[:, :25, :9].float()).mul_(inv_M).view(4, 4, 5, 5, C)
    cst16 = (V @ cst[:, :9].float().t()).mul_(inv_M).view(4, 4, C)
    border = [1, 2, 0]  # column classes (before, after) = (0, 1) left, (1, 0) right, (0, 0) single
    delta = tab[:, border] - tab[:, 3:4]  # (4, 3, 5, 5, C)
    bd = delta[:, :, :, 2].contiguous()  # dj = 0: the border column itself
    off_map = delta.sum((2, 3)) - bd.sum(2)
    bc = (cst16[:, border] - cst16[:, 3:4]) - shift.float() * off_map
    return tab[:, 3].reshape(4, 25, C).contiguous(), cst16[:, 3].contiguous(), bd, bc.contiguous()


def repso_moments_backward(
    grad_mean: torch.Tensor, grad_cov: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, K: int
) -> torch.Tensor:
    N, C, H, W = x.shape
    KK, KK_PAD, LAG_PAD = K * K, _pow2(K * K), _pow2((2 * K - 1) ** 2)
    _check(x)
    split = _split_lag(x.dtype, K)
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
    gx = torch.empty_like(x)
    if conv is not None:
        grad_y, weight = conv
        if grad_y.shape != x.shape or weight.numel() != C * K * K:
            raise ValueError(f"conv must be (grad_y of x's shape {tuple(x.shape)}, a ({C}, 1, {K}, {K}) weight), got "
                             f"{tuple(grad_y.shape)} and {tuple(weight.shape)}")
        weight = weight.reshape(C, K * K).contiguous()
    else:
        grad_y, weight = gx, gx
    if n_pos == 0:
        return gx
    if K == 3:
        # the lag matrix in float32: as given, or its two 16-bit parts added
        A = a_hi.float() if a_hi.dtype == torch.float32 else a_hi.float() + a_lo.float()
        shift = shift.float().contiguous()
        return backward3_launch(x, *_class_tables(A, cst, shift, 1.0 / n_pos), shift, conv, gx)
    split = _split_lag(x.dtype, K)
    grid = lambda meta: (triton.cdiv(n_pos, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _moments_bwd_kernel[grid](
        x, gx, a_hi.contiguous(), a_lo.contiguous(), cst.contiguous(), shift.contiguous(), grad_y, weight,
        C, H, W, n_pos, 1.0 / n_pos, *x.stride(), *gx.stride(), *grad_y.stride(),
        K=K, KK_PAD=KK_PAD, LAG_PAD=LAG_PAD, SPLIT=split, DOT16=_dot16(), HAS_CONV=conv is not None,
    )
    return gx
