"""RepSO's fold on the GPU in two small Triton kernels: everything between the moments kernels and
the conv, forward and backward (falconnet/layers/repso_train.py, _OneConvTrainTriton).

Between the statistics pass over x and the one depthwise conv, RepSO's exact training forward does
per-channel arithmetic on (C, K*K x K*K) tensors: sum the moments kernel's per-split partial sums,
centre them, form each branch's batch mean and variance, BatchNorm's scale and shift, the folded
kernel and bias. Written as tensor ops that is ~30 launches forward and ~40 backward (the moments
op's host-side epilogue and prologue, the batched fold and its autograd), each a few microseconds
on a GPU, against a whole layer's budget of tens of microseconds at 7x7 maps (issue 5: 8x the
seven-branch path). Here each direction is one launch over blocks of channels:

- fold_forward: partial sums -> (mean, cov) in float64, rounded to float32 (the moments op's
  outputs, saved for the backward) -> per branch b: m_b = k_b . mean, v_b = max(k_b^T cov k_b, 0),
  s_b = gamma_b / sqrt(v_b + eps_b) -> folded = sum_b s_b k_b (in x's dtype, the conv's weight),
  bias = sum_b (beta_b - m_b s_b), and m_b, v_b for the running statistics.
- fold_backward: the gradients of folded and bias (the conv's weight and bias gradients) back to
  the kernels, gamma and beta (repso_fold_backward_ref's formulas), and, for the moments backward
  kernel, its inputs directly: the lag matrix A[d, p] = G[p, p + d] with G = grad_cov + grad_cov^T
  = 2 sum_b g_v,b k_b k_b^T, the constant grad_mean - G (mean - shift), and the shift (the centre
  mean for float32 and float16 x; 0 for bf16 x, whose A is split into high and low bf16 parts).
All per-channel math is float64 (the C++ fold's precision); A is accumulated in float32 (the
moments backward kernel consumes it as float32, or for bf16 x as two bf16 parts, ~2^-16 relative).

The kernels read the branch parameters where they lie (Params: RepSO's one-node path passes them
as one flat tensor, the concatenation of every branch weight and BatchNorm parameter) and the
backward writes their gradients into one buffer of the same layout, so neither direction needs
the launches that would embed, stack, unstack or copy them; the forward also writes the running
statistics' inputs as contiguous (B, C) rows (unbiased variance), which keeps the foreach update
that follows at one launch.

Arithmetic and bytes are negligible (a few KB per channel); the point is one launch instead of
tens. Only Triton 3.6 APIs are used; both kernels run under TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting as _interpreting
from .repso_moments import flat_layout


@triton.jit
def _narrow(v, ptr):
    """A float64 value in ptr's element type, through float32 (the 16-bit types' conversions from
    float64 are not all lowered: the interpreter's gives NaN)."""
    return v.to(tl.float32).to(ptr.dtype.element_ty)


@triton.jit
def _branch_kernel(k_ptr, tap, cs, c, ok):
    """Branch kernel values, float64, at the taps `tap` (Params.taps entries: an offset for channel
    0, -1 for a tap outside the branch's window, -2 for the identity's centre) of the channels c
    (broadcast against tap), channel stride cs; 0 where not ok."""
    v = tl.load(k_ptr + tap + c * cs, mask=ok & (tap >= 0), other=0.0).to(tl.float64)
    return tl.where(ok & (tap == -2), 1.0, v)


@triton.jit
def _fold_fwd_kernel(
    sums_ptr, prods_ptr, shift_ptr, k_ptr, taps_ptr, kcs_ptr, gamma_ptr, beta_ptr, g_bs, g_cs, eps_ptr,
    mean_ptr, cov_ptr, w_ptr, bias_ptr, bmean_ptr, bvar_ptr,
    C, n_split, M, unbias,
    B: tl.constexpr, KK: tl.constexpr, KK_PAD: tl.constexpr, COMPACT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, KK_PAD)
    c_ok = c < C
    p_ok = p < KK
    if COMPACT:
        # K = 3: the row kernel's float64 totals (54, C): 9 sums, then the products p <= q
        lo = tl.minimum(p[:, None], p[None, :])
        hi = tl.maximum(p[:, None], p[None, :])
        tri = 9 + lo * 9 - lo * (lo - 1) // 2 + hi - lo  # (KK_PAD, KK_PAD)
        pair_ok = p_ok[:, None] & p_ok[None, :]
        s1 = tl.load(sums_ptr + p[None, :] * C + c[:, None], mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        s2 = tl.load(sums_ptr + tri[None, :, :] * C + c[:, None, None], mask=c_ok[:, None, None] & pair_ok[None, :, :],
                     other=0.0)
        s1 = s1.to(tl.float64)
        s2 = s2.to(tl.float64)
    else:
        off1 = c[:, None] * KK_PAD + p[None, :]
        off2 = (c[:, None, None] * KK_PAD + p[None, :, None]) * KK_PAD + p[None, None, :]
        # the moments kernel's per-split partial sums (float32), added in float64
        s1 = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float64)
        s2 = tl.zeros((BLOCK_C, KK_PAD, KK_PAD), dtype=tl.float64)
        for _ in range(n_split):
            s1 += tl.load(sums_ptr + off1, mask=c_ok[:, None], other=0.0).to(tl.float64)
            s2 += tl.load(prods_ptr + off2, mask=c_ok[:, None, None], other=0.0).to(tl.float64)
            sums_ptr += C * KK_PAD
            prods_ptr += C * KK_PAD * KK_PAD
    # divided in float64 (a float 1/M would carry 2^-24 into the centring, which cancels)
    ew = s1 / M
    cov = s2 / M - ew[:, :, None] * ew[:, None, :]
    mean = ew + tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(tl.float64)[:, None]
    # the op's float32 outputs; the fold below uses these rounded values, as the backward does
    ok1 = c_ok[:, None] & p_ok[None, :]
    ok2 = c_ok[:, None, None] & p_ok[None, :, None] & p_ok[None, None, :]
    mean32 = _narrow(mean, mean_ptr)
    cov32 = _narrow(cov, cov_ptr)
    tl.store(mean_ptr + c[:, None] * KK + p[None, :], mean32, mask=ok1)
    tl.store(cov_ptr + (c[:, None, None] * KK + p[None, :, None]) * KK + p[None, None, :], cov32, mask=ok2)
    mean = tl.where(ok1, mean32.to(tl.float64), 0.0)
    cov = tl.where(ok2, cov32.to(tl.float64), 0.0)
    folded = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float64)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for b in tl.static_range(B):
        tap = tl.load(taps_ptr + b * KK + p, mask=p_ok, other=-1)
        k = _branch_kernel(k_ptr, tap[None, :], tl.load(kcs_ptr + b), c[:, None], ok1)
        m_b = tl.sum(k * mean, axis=1)
        v_b = tl.maximum(tl.sum(tl.sum(cov * k[:, None, :], axis=2) * k, axis=1), 0.0)
        gamma = tl.load(gamma_ptr + b * g_bs + c * g_cs, mask=c_ok, other=0.0).to(tl.float64)
        beta = tl.load(beta_ptr + b * g_bs + c * g_cs, mask=c_ok, other=0.0).to(tl.float64)
        s_b = gamma / tl.sqrt(v_b + tl.load(eps_ptr + b))
        folded += s_b[:, None] * k
        bias += beta - m_b * s_b
        # the running statistics' inputs, rows of (B, C): the mean and the unbiased variance
        tl.store(bmean_ptr + b * C + c, _narrow(m_b, bmean_ptr), mask=c_ok)
        tl.store(bvar_ptr + b * C + c, _narrow(v_b * unbias, bvar_ptr), mask=c_ok)
    tl.store(w_ptr + c[:, None] * KK + p[None, :], _narrow(folded, w_ptr), mask=ok1)
    tl.store(bias_ptr + c, _narrow(bias, bias_ptr), mask=c_ok)


@triton.jit
def _class_tables_store(lag, cst, a, c, c_ok, p, d, C, inv_M, tab_ptr, tcst_ptr, bd_ptr, bc_ptr):
    """K = 3. lag (BC, LAG_PAD, KK_PAD) = A[c, d, p], cst (BC, KK_PAD), a (BC,) the shift. For the
    4 row classes rc = (has a row before) * 2 + (has one after): tab (4, 25, C) = sum over the
    valid shifts p of A / M with both column neighbours, tcst (4, C) the same of cst; for the
    left, right and 1-wide column classes, bd (4, 3, 5, C) the change of the lag-(e - 2, 0)
    weights and bc (4, 3, C) the constant's change minus a times the change of the weights whose
    column lies off the map."""
    pi = p // 3
    pj = p % 3
    p_ok = p < 9
    d_ok = d < 25
    for rc in tl.static_range(4):
        row_v = p_ok & (pi >= 1 - rc % 2) & (pi <= 1 + rc // 2)
        tab = tl.sum(tl.where(row_v[None, None, :], lag, 0.0), axis=2) * inv_M  # (BC, LAG_PAD)
        tl.store(tab_ptr + (rc * 25 + d[None, :]) * C + c[:, None], tab, mask=c_ok[:, None] & d_ok[None, :])
        tl.store(tcst_ptr + rc * C + c, tl.sum(tl.where(row_v[None, :], cst, 0.0), axis=1) * inv_M, mask=c_ok)
        for b in tl.static_range(3):  # left (before 0, after 1), right (1, 0), single (0, 0)
            before = 1 if b == 1 else 0
            after = 1 if b == 0 else 0
            gone = row_v & ((pj < 1 - after) | (pj > 1 + before))  # the shifts this border removes
            delta = -tl.sum(tl.where(gone[None, None, :], lag, 0.0), axis=2) * inv_M  # (BC, LAG_PAD)
            centre = tl.zeros_like(a)
            for e in tl.static_range(5):
                bd = tl.sum(tl.where(d[None, :] == e * 5 + 2, delta, 0.0), axis=1)
                tl.store(bd_ptr + ((rc * 3 + b) * 5 + e) * C + c, bd, mask=c_ok)
                centre += bd
            off_map = tl.sum(tl.where(d_ok[None, :], delta, 0.0), axis=1) - centre
            d_cst = -tl.sum(tl.where(gone[None, :], cst, 0.0), axis=1) * inv_M
            tl.store(bc_ptr + (rc * 3 + b) * C + c, d_cst - a * off_map, mask=c_ok)


@triton.jit
def _fold_bwd_kernel(
    gw_ptr, gw_cs, gw_ps, gb_ptr, gb_cs, mean_ptr, cov_ptr, k_ptr, taps_ptr, kcs_ptr, gamma_ptr, g_bs, g_cs, eps_ptr,
    gk_ptr, ggamma_ptr, gbeta_ptr, a_hi_ptr, a_lo_ptr, cst_ptr, shift_ptr,
    tab_ptr, tcst_ptr, bd_ptr, bc_ptr,
    C, inv_M,
    B: tl.constexpr, K: tl.constexpr, KK_PAD: tl.constexpr, LAG_PAD: tl.constexpr, SPLIT: tl.constexpr,
    TABLES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    KK: tl.constexpr = K * K
    L: tl.constexpr = 2 * K - 1
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, KK_PAD)
    c_ok = c < C
    p_ok = p < KK
    ok1 = c_ok[:, None] & p_ok[None, :]
    ok2 = c_ok[:, None, None] & p_ok[None, :, None] & p_ok[None, None, :]
    mean = tl.load(mean_ptr + c[:, None] * KK + p[None, :], mask=ok1, other=0.0).to(tl.float64)
    cov_base = cov_ptr + c[:, None, None] * (KK * KK)
    sym = (tl.load(cov_base + p[None, :, None] * KK + p[None, None, :], mask=ok2, other=0.0).to(tl.float64)
           + tl.load(cov_base + p[None, None, :] * KK + p[None, :, None], mask=ok2, other=0.0).to(tl.float64))
    g_f = tl.load(gw_ptr + c[:, None] * gw_cs + p[None, :] * gw_ps, mask=ok1, other=0.0).to(tl.float64)
    g_bias = tl.load(gb_ptr + c * gb_cs, mask=c_ok, other=0.0).to(tl.float64)
    # the moments backward centres its stencil on the centre mean for float32/float16 x (bf16: none)
    if SPLIT:
        shift = tl.zeros((BLOCK_C,), dtype=tl.float64)
    else:
        shift = tl.sum(tl.where(p[None, :] == KK // 2, mean, 0.0), axis=1)
    centred = tl.where(ok1, mean - shift[:, None], 0.0)
    # lag d = (di, dj) in [-(K-1), K-1]^2 from tap p to tap q = p + d, where q is in the window
    d = tl.arange(0, LAG_PAD)
    qi = (p // K)[None, :] + (d // L - (K - 1))[:, None]
    qj = (p % K)[None, :] + (d % L - (K - 1))[:, None]
    q_ok = (d < L * L)[:, None] & p_ok[None, :] & (qi >= 0) & (qi < K) & (qj >= 0) & (qj < K)
    q = qi * K + qj  # (LAG_PAD, KK_PAD)
    g_mean = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float64)
    g_centred = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float64)  # G (mean - shift)
    lag = tl.zeros((BLOCK_C, LAG_PAD, KK_PAD), dtype=tl.float32)
    for b in tl.static_range(B):
        cs = tl.load(kcs_ptr + b)
        tap = tl.load(taps_ptr + b * KK + p, mask=p_ok, other=-1)
        k = _branch_kernel(k_ptr, tap[None, :], cs, c[:, None], ok1)
        tap_q = tl.load(taps_ptr + b * KK + q, mask=q_ok, other=-1)
        k_q = _branch_kernel(k_ptr, tap_q[None, :, :], cs, c[:, None, None], c_ok[:, None, None] & q_ok[None, :, :])
        sk = tl.sum(sym * k[:, None, :], axis=2)  # (cov + cov^T) k
        m_b = tl.sum(k * mean, axis=1)
        v_raw = 0.5 * tl.sum(k * sk, axis=1)
        clamped = v_raw < 0.0  # clamp_min's gradient is 0 below the bound
        gamma = tl.load(gamma_ptr + b * g_bs + c * g_cs, mask=c_ok, other=0.0).to(tl.float64)
        r = 1.0 / tl.sqrt(tl.maximum(v_raw, 0.0) + tl.load(eps_ptr + b))
        s_b = gamma * r
        g_s = tl.sum(k * g_f, axis=1) - g_bias * m_b
        g_m = -g_bias * s_b
        g_v = tl.where(clamped, 0.0, -0.5 * g_s * gamma * r * r * r)
        tl.store(ggamma_ptr + b * g_bs + c * g_cs, _narrow(g_s * r, ggamma_ptr), mask=c_ok)
        tl.store(gbeta_ptr + b * g_bs + c * g_cs, _narrow(g_bias, gbeta_ptr), mask=c_ok)
        g_k = s_b[:, None] * g_f + g_m[:, None] * mean + g_v[:, None] * sk
        # only the branch's own taps: the zeros around it and the identity's 1 are constants
        tl.store(gk_ptr + tap[None, :] + c[:, None] * cs, _narrow(g_k, gk_ptr), mask=ok1 & (tap[None, :] >= 0))
        g_mean += g_m[:, None] * k
        two_gv = 2.0 * g_v
        g_centred += (two_gv * tl.sum(k * centred, axis=1))[:, None] * k
        lag += (two_gv[:, None, None] * k[:, None, :] * k_q).to(tl.float32)
    cst = (g_mean - g_centred).to(tl.float32)
    tl.store(cst_ptr + c[:, None] * KK_PAD + p[None, :], cst, mask=c_ok[:, None])
    tl.store(shift_ptr + c, shift.to(tl.float32), mask=c_ok)
    if TABLES:
        # K = 3: the grad_x row kernel's class tables (triton_repso_moments._class_tables, the
        # same sums) straight from the lag matrix in registers, instead of ~15 small launches
        _class_tables_store(lag, cst, shift.to(tl.float32), c, c_ok, p, d, C, inv_M, tab_ptr, tcst_ptr, bd_ptr, bc_ptr)
        return
    a_off = (c[:, None, None] * LAG_PAD + d[None, :, None]) * KK_PAD + p[None, None, :]
    if SPLIT:
        hi = lag.to(a_hi_ptr.dtype.element_ty)
        tl.store(a_hi_ptr + a_off, hi, mask=c_ok[:, None, None])
        tl.store(a_lo_ptr + a_off, (lag - hi.to(tl.float32)).to(a_lo_ptr.dtype.element_ty), mask=c_ok[:, None, None])
    else:
        tl.store(a_hi_ptr + a_off, lag, mask=c_ok[:, None, None])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Under TRITON_INTERPRET=1 (the tests on a CPU) each program is a pass of numpy calls whose cost is
# their count, not their size: one channel a program made a 256-channel fold backward take a minute
# there (2026-11-27). The interpreter takes this many channels a program instead; None gives it
# the GPU's launch shapes (tests that check those set it so).
INTERPRETER_BLOCK_C: int | None = 64
# K = 3 fold backward: from this many channels, 4 channels a program (see fold_backward)
WIDE_C = 512


def _launch_shape(KK_PAD: int, per_channel: int, wide: bool = False) -> tuple[int, int]:
    """(BLOCK_C, num_warps): about 4096 values of per-channel state per program (32-64 registers a
    thread at 4 warps); one channel on 8 warps when one channel's state is larger (K = 5, 7);
    `wide`: 4 channels on 8 warps. Compiled for sm_90 with triton 3.6 (no GPU here): no spills at
    K <= 3; the backward at K = 5 and 7 spills a little (0.5 KB a thread; 4, 16 or 32 warps
    spilled more)."""
    if INTERPRETER_BLOCK_C and _interpreting():
        return INTERPRETER_BLOCK_C, 4
    if wide:
        return 4, 8
    if per_channel <= 1024:
        return 4096 // per_channel, 4
    return 1, 8


@dataclass(frozen=True)
class Params:
    """Where the fold kernels read each branch's kernel, gamma and beta, and write their gradients.

    taps (B, K*K) int32 on the device: the offset in `data` of branch b's tap p for channel 0, -1
    where the tap lies outside the branch's window (a 0), -2 at the identity branch's centre (a 1);
    chan_stride (B,) int32, the offset between channels. gamma and beta hold the (b, c) value at
    b * g_strides[0] + c * g_strides[1]. Two forms: Params.flat (every value in one 1-D tensor,
    as RepSO's one-node path passes its parameters, so that each parameter's gradient is a
    contiguous slice of one buffer the backward kernel fills: no gather, pad, stack or copy
    launches either way) and Params.dense ((C, B, K*K) embedded kernels, (C, B) gamma and beta)."""

    data: torch.Tensor
    taps: torch.Tensor
    chan_stride: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    g_strides: tuple
    at: tuple | None  # (gamma, beta) offsets in data (flat), or None (separate tensors)

    @property
    def n_branches(self) -> int:
        return self.taps.shape[0]

    @staticmethod
    def dense(kernels: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> "Params":
        C, B, KK = kernels.shape
        if gamma.shape != (C, B) or beta.shape != (C, B):
            raise ValueError(f"gamma and beta must be ({C}, {B}) for kernels {tuple(kernels.shape)}, got "
                             f"{tuple(gamma.shape)} and {tuple(beta.shape)}")
        taps, cs = _dense_tables(B, KK, kernels.device)
        return Params(kernels.contiguous(), taps, cs, gamma.contiguous(), beta.contiguous(), (1, B), None)

    @staticmethod
    def flat(flat: torch.Tensor, shapes: tuple, with_identity: bool, K: int, C: int) -> "Params":
        """flat = cat(each branch weight (C, 1, kh, kw) flattened, in `shapes`' order; then the B
        BatchNorms' weights; then their biases), B = len(shapes) + with_identity (the identity's
        BatchNorm last)."""
        taps, cs, g_at, b_at = _flat_tables(tuple(shapes), with_identity, K, C, flat.device)
        B = taps.shape[0]
        if flat.dim() != 1 or flat.numel() != b_at + B * C:
            raise ValueError(f"flat must be a 1-D tensor of {b_at + B * C} values for these branches, got "
                             f"{tuple(flat.shape)}")
        return Params(flat, taps, cs, flat[g_at:b_at], flat[b_at:], (C, 1), (g_at, b_at))

    def grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Empty gradient tensors in this layout: (of data, of gamma, of beta); for the flat form
        the last two are views into the first (the backward kernel writes every element)."""
        if self.at is None:
            return torch.empty_like(self.data), torch.empty_like(self.gamma), torch.empty_like(self.beta)
        g = torch.empty_like(self.data)
        return g, g[self.at[0]:self.at[1]], g[self.at[1]:]


@functools.lru_cache(maxsize=64)
def _dense_tables(B: int, KK: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    taps = torch.arange(B * KK, dtype=torch.int32).view(B, KK)
    return taps.to(device), torch.full((B,), B * KK, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=64)
def _flat_tables(shapes: tuple, with_identity: bool, K: int, C: int, device: torch.device) -> tuple:
    taps, cs, gamma_at, beta_at = flat_layout(shapes, with_identity, K, C)
    return (torch.tensor(taps, dtype=torch.int32).to(device), torch.tensor(cs, dtype=torch.int32).to(device),
            gamma_at, beta_at)


def fold_forward(sums, prods, shift, n_pos: int, params: Params, eps, K: int, out_dtype: torch.dtype):
    """From the moments kernel's partials (triton_repso_moments.forward_partials), or at K = 3 its
    compact float64 totals (54, C) (forward_totals3; prods None), to (mean, cov, folded weight
    (C, K*K) in out_dtype, bias (C,) in out_dtype, and for the running statistics each branch's
    batch mean and unbiased variance, (B, C) each). params: the branches' kernels, gamma and beta
    (Params); eps (B,) float64 on the device."""
    compact = prods is None
    if compact:
        if K != 3 or sums.shape[0] != 54:
            raise ValueError(f"compact totals are (54, C) at K = 3, got {tuple(sums.shape)} at K = {K}")
        n_split, C, KK_PAD = 1, sums.shape[1], 16
        prods = sums
    else:
        n_split, C, KK_PAD = sums.shape
    B, KK = params.n_branches, K * K
    if params.taps.shape[1] != KK:
        raise ValueError(f"params are for {params.taps.shape[1]} taps, the moments for K = {K}")
    stats = torch.float32
    dev = sums.device
    mean = torch.empty((C, KK), device=dev, dtype=stats)
    cov = torch.empty((C, KK, KK), device=dev, dtype=stats)
    weight = torch.empty((C, KK), device=dev, dtype=out_dtype)
    bias = torch.empty((C,), device=dev, dtype=out_dtype)
    bmean = torch.empty((B, C), device=dev, dtype=stats)
    bvar = torch.empty((B, C), device=dev, dtype=stats)
    block_c, warps = _launch_shape(KK_PAD, 2 * KK_PAD * KK_PAD)
    _fold_fwd_kernel[(triton.cdiv(C, block_c),)](
        sums, prods, shift, params.data, params.taps, params.chan_stride, params.gamma, params.beta,
        *params.g_strides, eps, mean, cov, weight, bias, bmean, bvar,
        C, n_split, n_pos, n_pos / (n_pos - 1) if n_pos > 1 else float("nan"),
        B=B, KK=KK, KK_PAD=KK_PAD, COMPACT=compact, BLOCK_C=block_c, num_warps=warps,
    )
    return mean, cov, weight, bias, bmean, bvar


def fold_backward(grad_weight, grad_bias, mean, cov, params: Params, eps, K: int, x_dtype: torch.dtype,
                  n_pos: int | None = None):
    """The conv's weight and bias gradients ((C, K*K) and (C,), any strides and float dtype) back
    through the fold: (the gradients of params' data, gamma and beta, in its layout: Params.grads)
    and the moments backward kernel's inputs (a_hi, a_lo,
    cst, shift) for x of x_dtype (triton_repso_moments.backward_launch). With n_pos (the position
    count M, K = 3 only) the last four are instead the K = 3 grad_x kernel's class tables
    (tab, cst, bd, bc) and the shift (triton_repso_moments.backward3_launch)."""
    C, KK = mean.shape
    tables = n_pos is not None
    if tables and K != 3:
        raise ValueError(f"the class tables are for K = 3, got K = {K}")
    B = params.n_branches
    if grad_weight.shape != (C, KK) or grad_bias.shape != (C,):
        raise ValueError(f"grad_weight and grad_bias must be ({C}, {KK}) and ({C},), got "
                         f"{tuple(grad_weight.shape)} and {tuple(grad_bias.shape)}")
    KK_PAD, LAG_PAD = _pow2(KK), _pow2((2 * K - 1) ** 2)
    split = x_dtype == torch.bfloat16  # triton_repso_moments._split_lag: float16 takes float32
    dev = mean.device
    g_k, g_gamma, g_beta = params.grads()
    if tables:
        split = False  # the row kernel multiplies in float32: the lag matrix is never split
    a_dtype = x_dtype if split else torch.float32
    cst = torch.empty((C, KK_PAD), device=dev, dtype=torch.float32)
    shift = torch.empty((C,), device=dev, dtype=torch.float32)
    if tables:
        a_hi = a_lo = cst  # not written
        tab = torch.empty((4, 25, C), device=dev, dtype=torch.float32)
        tcst = torch.empty((4, C), device=dev, dtype=torch.float32)
        bd = torch.empty((4, 3, 5, C), device=dev, dtype=torch.float32)
        bc = torch.empty((4, 3, C), device=dev, dtype=torch.float32)
    else:
        a_hi = torch.empty((C, LAG_PAD, KK_PAD), device=dev, dtype=a_dtype)
        a_lo = torch.empty_like(a_hi) if split else a_hi
        tab = tcst = bd = bc = cst  # not written
    # per channel: (cov + cov^T) and a product temporary in float64, the lag matrix and its gather
    # wide: one channel a program made C programs: 64 us at C = 1024 on an H100 (2026-11-26), about
    # 4 waves of a few microseconds' dependent float64 steps. 4 channels on 8 warps: 218
    # registers, no spills (sm_90, triton 3.6); a quarter of the programs (unmeasured)
    block_c, warps = _launch_shape(KK_PAD, 2 * KK_PAD * KK_PAD + 2 * LAG_PAD * KK_PAD, K == 3 and C >= WIDE_C)
    _fold_bwd_kernel[(triton.cdiv(C, block_c),)](
        grad_weight, *grad_weight.stride(), grad_bias, grad_bias.stride(0), mean, cov,
        params.data, params.taps, params.chan_stride, params.gamma, *params.g_strides, eps,
        g_k, g_gamma, g_beta, a_hi, a_lo, cst, shift, tab, tcst, bd, bc,
        C, 1.0 / n_pos if tables else 1.0,
        B=B, K=K, KK_PAD=KK_PAD, LAG_PAD=LAG_PAD, SPLIT=split, TABLES=tables, BLOCK_C=block_c, num_warps=warps,
    )
    if tables:
        return g_k, g_gamma, g_beta, tab, tcst, bd, bc, shift
    return g_k, g_gamma, g_beta, a_hi, a_lo, cst, shift
