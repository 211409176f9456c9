"""Fused SF-Conv pair in Triton: y = act(W2' . shuffle . W1' x + bias) + residual, one kernel.

The two numbers, per pixel (k, c_h, G, m as in ../shared/SPEC.md section 4; C_in = G*k,
C_out = c_h*m, r = k/c_h):
  * multiply-accumulates: C_in*c_h (stage 1) + C_out*G (stage 2), 4-16x fewer than the dense
    1x1 conv's C_in*C_out at FalconNet's shapes;
  * fewest bytes: (C_in + C_out) * itemsize (x read once, y written once; + C_out for a
    residual). At bf16 that is at most 25 FLOP/byte, far under the ~300 FLOP/byte where an
    H100's tensor cores and HBM balance: every shape is memory-bound, and the kernel's job is
    to stream x and y once at copy speed while the arithmetic hides under the loads.
At the benchmark shapes (bf16, channels_last, batch 128; "executed" counts the padding below;
floor = bytes / copy bandwidth, 3.02 TB/s H100, 4.27 TB/s H200, SPEC section 6):
    shape        MAC/px exact  executed  dense    MB    floor H100 / H200
    32->128 @56       768      2560      4096   128.5   42.5 / 30.1 us
    128->32 @56      1536      4096      4096   128.5   42.5 / 30.1 us
    64->256 @28      2048      5120     16384    64.2   21.3 / 15.0 us
    256->64 @28      4096      8192     16384    64.2   21.3 / 15.0 us
    128->512 @14     6144     10240     65536    32.1   10.6 /  7.5 us
    512->128 @14    12288     16384     65536    32.1   10.6 /  7.5 us
    256->1024 @7    16384     24576    262144    16.1    5.3 /  3.8 us
    1024->256 @7    32768     32768    262144    16.1    5.3 /  3.8 us
The executed products take 0.8-6.6 us at 500 TFLOP/s, at most 16% of the memory floor.

Design. Both stages are block-diagonal: stage 1 is G blocks of (k -> c_h), stage 2, after the
(G, c_h) -> (c_h, G) transpose of the hidden tensor, is c_h blocks of (G -> m). Each program takes
BLOCK_P pixels and runs both stages as *batched* tensor-core products (3-D tl.dot):
  stage 1: x (NB1, BLOCK_P, GPK*k) @ W1 (NB1, GPK*k, GPK*c_h) -> H, batch = group(s)
  shuffle: H (NB1, P, GPK, c_h) -> (c_h, P, NB1*GPK)   (tl.reshape/tl.permute: a register /
           shared-memory relayout; H never touches global memory)
  stage 2: H (c_h, BLOCK_P, GC) @ W2 (c_h, GC, m) -> y accumulated over chunks of GC groups.
Why batched products and not 2-D ones: a 2-D product must cover either all of a chunk's hidden
columns (then stage 2 multiplies by a matrix that is (c_h-1)/c_h zeros, as dear as the dense conv)
or all outputs of a few j (then stage 1 is as dear). Batching over the block index keeps the
arithmetic at the exact count times the padding below (1.0-3.3x at FalconNet's shapes, see
the table), so the tensor cores stay far under the memory time.
Tensor-core products need every dimension >= 16: k and c_h below 16 are packed GPK groups per
batch element as a small block-diagonal (GPK*k x GPK*c_h, zeros off the blocks), m is padded to
16, and when a chunk has fewer than 16 groups stage 2's reduction dimension is spread to 16
(group g at row g*GS, zero rows between), so x and stage 1 never carry zero groups.
Non-power-of-two k, c_h, m, G are padded to powers of two through masks: padded weights load
as zeros and padded channels are neither read nor written. (G, c_h, k, m) are compile-time
constants, so at power-of-two shapes the channel masks fold away and the loads and stores of a
pixel's channels stay 16-byte vectors. Pixels are addressed as
p = n*H*W + hw with strides (sN, sC, sHW), so NCHW and channels_last share one kernel; for
channels_last (the benchmarked layout) the offset is p*C + c, contiguous over the channels.

Persistent programs: the grid is a few programs per SM, each looping over pixel tiles. When
all G groups fit one chunk (up to 1024 input channels: every FalconNet shape) the weights are
loaded once per program into shared memory and Triton's software pipeline prefetches the next
tile's x (cp.async) during this tile's math.

Backward (one kernel; fewest bytes (2*C_in + C_out) * itemsize per pixel: x and grad_y read,
grad_x written): recompute H (and, for relu/relu6, z for the activation mask), then
grad_H = grad_z @ W2^T (batched over j), grad_x = grad_H @ W1^T (batched over groups, each
element written once), and the weight gradients grad_z^T H and x^T grad_H as tensor-core
products reduced over the pixel tile. The chunk loop is outside the tile loop, so each
chunk's weight gradients accumulate in registers over all of a program's tiles and reach
memory as one fp32 atomic add per program and chunk (cast to the weight dtype at the end);
backward chunks hold at most 512 input channels (the accumulators need the registers), so
1024->256 has two. grad_bias is the column sum of grad_z, added the same way.
The atomics make weight gradients reproducible only to fp32 rounding, not bit for bit.

Precision: bf16/fp16 operands with fp32 accumulation; the hidden tile is rounded to the input
dtype before stage 2 (as a two-matmul PyTorch version would do). float32 inputs use
input_precision="ieee" (true fp32 products, not tf32) so that fp32 results match a float64
reference to ~1e-6; fp32 is not the benchmarked path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._backend import triton_autotune_enabled as _autotune_enabled
from ._backend import triton_interpreting as _interpreting
from .reference import out_format as _out_format

_ACTIVATION_CODE = {"none": 0, "relu": 1, "relu6": 2}


# ---------------------------------------------------------------------------------------------
# @triton.jit helpers and kernels


@triton.jit
def _pixel_offset(p, HW, s_n, s_hw, PIX_LINEAR: tl.constexpr):
    """Element offset of pixel p = n*HW + hw; channels_last has s_n == HW*s_hw, so p*s_hw."""
    if PIX_LINEAR:
        return p * s_hw
    n = p // HW
    return n * s_n + (p - n * HW) * s_hw


@triton.jit
def _x_chunk_channels(g0, G, K, NB1: tl.constexpr, GPK: tl.constexpr, KP: tl.constexpr):
    """Input channels g*k + i of groups [g0, g0 + NB1*GPK) as (NB1, 1, GPK*KP), column (g_local, i)."""
    b = tl.arange(0, NB1)[:, None, None]
    r = tl.arange(0, GPK * KP)[None, None, :]
    g = g0 + b * GPK + r // KP
    i = r % KP
    return (g * K + i).to(tl.int64), (i < K) & (g < G)


@triton.jit
def _w1_blockdiag(w1_ptr, g0, G, C_H, K,
                  NB1: tl.constexpr, GPK: tl.constexpr, KP: tl.constexpr, CHP: tl.constexpr):
    """W1 for the chunk as (NB1, GPK*KP, GPK*CHP), block-diagonal over the GPK packed groups."""
    b = tl.arange(0, NB1)[:, None, None]
    r = tl.arange(0, GPK * KP)[None, :, None]
    c = tl.arange(0, GPK * CHP)[None, None, :]
    g = g0 + b * GPK + r // KP
    i = r % KP
    j = c % CHP
    ok = (r // KP == c // CHP) & (i < K) & (j < C_H) & (g < G)
    offs = (g * C_H + j) * K + i
    return tl.load(w1_ptr + offs, mask=ok, other=0.0), offs, ok


@triton.jit
def _w2_chunk(w2_ptr, g0, G, C_H, M, CHP: tl.constexpr, GC: tl.constexpr, MP: tl.constexpr, GS: tl.constexpr):
    """W2 for the chunk as (CHP, GC*GS, MP): batch j, row (g - g0)*GS (rows between are zero,
    see _to_stage2), column t."""
    j = tl.arange(0, CHP)[:, None, None]
    r = tl.arange(0, GC * GS)[None, :, None]
    g = g0 + r // GS
    t = tl.arange(0, MP)[None, None, :]
    ok = (j < C_H) & (g < G) & (t < M) & (r % GS == 0)
    offs = (j * M + t) * G + g
    return tl.load(w2_ptr + offs, mask=ok, other=0.0), offs, ok


@triton.jit
def _to_stage2(h1, NB1: tl.constexpr, BLOCK_P: tl.constexpr, GPK: tl.constexpr, CHP: tl.constexpr,
               GS: tl.constexpr):
    """(NB1, P, GPK*CHP) with columns (g_local, j) -> (CHP, P, NB1*GPK*GS): the SF-Conv shuffle.

    With fewer than 16 groups (GS > 1) stage 2's reduction dimension is spread to 16: group g
    goes to row g*GS and the rows between are zero, so no zero groups go through stage 1."""
    h = tl.reshape(h1, (NB1, BLOCK_P, GPK, CHP))
    h = tl.permute(h, (3, 1, 0, 2))
    h = tl.reshape(h, (CHP, BLOCK_P, NB1 * GPK))
    if GS > 1:
        h = tl.broadcast_to(tl.reshape(h, (CHP, BLOCK_P, NB1 * GPK, 1)), (CHP, BLOCK_P, NB1 * GPK, GS))
        h = tl.where(tl.arange(0, GS)[None, None, None, :] == 0, h, 0.0)
        h = tl.reshape(h, (CHP, BLOCK_P, NB1 * GPK * GS))
    return h


@triton.jit
def _from_stage2(h2, NB1: tl.constexpr, BLOCK_P: tl.constexpr, GPK: tl.constexpr, CHP: tl.constexpr,
                 GS: tl.constexpr):
    """Inverse of _to_stage2 (the spread rows hold zeros: summing them in is exact)."""
    if GS > 1:
        h2 = tl.sum(tl.reshape(h2, (CHP, BLOCK_P, NB1 * GPK, GS)), axis=3)
    h = tl.reshape(h2, (CHP, BLOCK_P, NB1, GPK))
    h = tl.permute(h, (2, 1, 3, 0))
    return tl.reshape(h, (NB1, BLOCK_P, GPK * CHP))


@triton.jit
def _hidden_chunk(x_ptr, w1, pix_x, p_ok, g0, G, K, s_xc,
                  BLOCK_P: tl.constexpr, KP: tl.constexpr, CHP: tl.constexpr, GPK: tl.constexpr,
                  NB1: tl.constexpr, GS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 1 for groups [g0, g0 + GC): (x tile, its channels, its mask, H as (CHP, P, GC*GS))."""
    chan, chan_ok = _x_chunk_channels(g0, G, K, NB1, GPK, KP)
    x_ok = chan_ok & p_ok[None, :, None]
    x1 = tl.load(x_ptr + pix_x[None, :, None] + chan * s_xc, mask=x_ok, other=0.0)
    h1 = tl.dot(x1, w1, input_precision=DOT_PRECISION).to(x1.dtype)  # cast first: the shuffle moves 16-bit values
    return x1, chan, x_ok, _to_stage2(h1, NB1, BLOCK_P, GPK, CHP, GS)


@triton.jit
def _sf_conv_z_chunked(x_ptr, w1_ptr, w2_ptr, pix_x, p_ok, G, C_H, K, M, s_xc,
                       BLOCK_P: tl.constexpr, KP: tl.constexpr, CHP: tl.constexpr, MP: tl.constexpr,
                       GPK: tl.constexpr, NB1: tl.constexpr, GS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z = SF(x) for one pixel tile when G spans several chunks: (CHP, BLOCK_P, MP) in fp32."""
    GC: tl.constexpr = NB1 * GPK
    acc = tl.zeros((CHP, BLOCK_P, MP), dtype=tl.float32)
    for g0 in range(0, G, GC):
        w1, w1_offs, w1_ok = _w1_blockdiag(w1_ptr, g0, G, C_H, K, NB1, GPK, KP, CHP)
        x1, chan, x_ok, h2 = _hidden_chunk(x_ptr, w1, pix_x, p_ok, g0, G, K, s_xc,
                                            BLOCK_P, KP, CHP, GPK, NB1, GS, DOT_PRECISION)
        w2, w2_offs, w2_ok = _w2_chunk(w2_ptr, g0, G, C_H, M, CHP, GC, MP, GS)
        acc = tl.dot(h2, w2, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _out_channels(C_H, M, CHP: tl.constexpr, MP: tl.constexpr):
    """Output channel index j*m + t as (1, CHP, MP) and its validity mask."""
    j = tl.arange(0, CHP)[None, :, None]
    t = tl.arange(0, MP)[None, None, :]
    return j * M + t, (j < C_H) & (t < M)


@triton.jit
def _sf_conv_fwd_kernel(
    x_ptr, w1_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr,
    P, HW, G: tl.constexpr, C_H: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    s_xn, s_xc, s_xhw, s_yn, s_yc, s_yhw, s_rn, s_rc, s_rhw,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    X_LINEAR: tl.constexpr, Y_LINEAR: tl.constexpr, R_LINEAR: tl.constexpr,
    KP: tl.constexpr, CHP: tl.constexpr, MP: tl.constexpr, GPK: tl.constexpr, NB1: tl.constexpr,
    GS: tl.constexpr, ONE_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Persistent: program i takes pixel tiles i, i + grid, ...; with one group chunk the weights
    are loaded once per program and the next tile's x load overlaps this tile's math."""
    GC: tl.constexpr = NB1 * GPK
    # the epilogue works in the accumulator's (CHP, BLOCK_P, MP) shape (no permute; the store's
    # relayout to coalesced channel runs is left to the compiler, after the cast to 16 bits)
    j = tl.arange(0, CHP)[:, None, None]
    t = tl.arange(0, MP)[None, None, :]
    ch = (j * M + t).to(tl.int64)  # output channel j*m + t as (CHP, 1, MP)
    ch_ok = (j < C_H) & (t < M)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    if ONE_CHUNK:
        w1, w1_offs, w1_ok = _w1_blockdiag(w1_ptr, 0, G, C_H, K, NB1, GPK, KP, CHP)
        w2, w2_offs, w2_ok = _w2_chunk(w2_ptr, 0, G, C_H, M, CHP, GC, MP, GS)
    for tile in range(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.num_programs(0)):
        p = tl.arange(0, BLOCK_P).to(tl.int64) + tile * BLOCK_P
        p_ok = p < P
        pix_x = _pixel_offset(p, HW, s_xn, s_xhw, X_LINEAR)
        if ONE_CHUNK:
            x1, chan, x_ok, h2 = _hidden_chunk(x_ptr, w1, pix_x, p_ok, 0, G, K, s_xc,
                                               BLOCK_P, KP, CHP, GPK, NB1, GS, DOT_PRECISION)
            acc = tl.dot(h2, w2, input_precision=DOT_PRECISION)
        else:
            acc = _sf_conv_z_chunked(x_ptr, w1_ptr, w2_ptr, pix_x, p_ok, G, C_H, K, M, s_xc,
                                     BLOCK_P, KP, CHP, MP, GPK, NB1, GS, DOT_PRECISION)
        z = acc
        ok = ch_ok & p_ok[None, :, None]
        if HAS_BIAS:
            z += bias
        if ACT == 1:
            z = tl.maximum(z, 0.0)
        elif ACT == 2:
            z = tl.minimum(tl.maximum(z, 0.0), 6.0)
        if HAS_RES:
            pix_r = _pixel_offset(p, HW, s_rn, s_rhw, R_LINEAR)[None, :, None]
            z += tl.load(res_ptr + pix_r + ch * s_rc, mask=ok, other=0.0).to(tl.float32)
        pix_y = _pixel_offset(p, HW, s_yn, s_yhw, Y_LINEAR)[None, :, None]
        tl.store(y_ptr + pix_y + ch * s_yc, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _activation_mask(z, ACT: tl.constexpr):
    if ACT == 1:
        return z > 0.0
    return (z > 0.0) & (z < 6.0)


@triton.jit
def _sf_conv_bwd_kernel(
    gy_ptr, x_ptr, w1_ptr, w2_ptr, bias_ptr, gx_ptr, gw1_ptr, gw2_ptr, gb_ptr,
    P, HW, G: tl.constexpr, C_H: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
    s_gyn, s_gyc, s_gyhw, s_xn, s_xc, s_xhw, s_gxn, s_gxc, s_gxhw,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    GY_LINEAR: tl.constexpr, X_LINEAR: tl.constexpr, GX_LINEAR: tl.constexpr,
    KP: tl.constexpr, CHP: tl.constexpr, MP: tl.constexpr, GPK: tl.constexpr, NB1: tl.constexpr,
    GS: tl.constexpr, ONE_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Persistent like the forward, with the group chunks as the outer loop: for each chunk a
    program walks all its pixel tiles, so that chunk's weight gradients accumulate in registers
    and reach memory as one atomic add per program and chunk. With several chunks grad_y is
    re-read per chunk (from L2: a program's share of it is small), and relu/relu6 recompute
    all of z per chunk for the mask."""
    GC: tl.constexpr = NB1 * GPK
    ch, ch_ok = _out_channels(C_H, M, CHP, MP)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    gb = tl.zeros((CHP, MP), dtype=tl.float32)
    for g0 in range(0, G, GC):
        w1, w1_offs, w1_ok = _w1_blockdiag(w1_ptr, g0, G, C_H, K, NB1, GPK, KP, CHP)
        w2, w2_offs, w2_ok = _w2_chunk(w2_ptr, g0, G, C_H, M, CHP, GC, MP, GS)
        gw1 = tl.zeros((NB1, GPK * KP, GPK * CHP), dtype=tl.float32)
        gw2 = tl.zeros((CHP, MP, GC * GS), dtype=tl.float32)
        for tile in range(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.num_programs(0)):
            p = tl.arange(0, BLOCK_P).to(tl.int64) + tile * BLOCK_P
            p_ok = p < P
            pix_x = _pixel_offset(p, HW, s_xn, s_xhw, X_LINEAR)
            pix_gx = _pixel_offset(p, HW, s_gxn, s_gxhw, GX_LINEAR)
            pix_gy = _pixel_offset(p, HW, s_gyn, s_gyhw, GY_LINEAR)[:, None, None]
            gz = tl.load(gy_ptr + pix_gy + ch.to(tl.int64) * s_gyc, mask=ch_ok & p_ok[:, None, None],
                         other=0.0)  # (BLOCK_P, CHP, MP)
            x1, chan, x_ok, h2 = _hidden_chunk(x_ptr, w1, pix_x, p_ok, g0, G, K, s_xc,
                                               BLOCK_P, KP, CHP, GPK, NB1, GS, DOT_PRECISION)
            if ACT != 0:
                # the activation's 0/1 derivative needs the pre-activation z
                if ONE_CHUNK:
                    z = tl.dot(h2, w2, input_precision=DOT_PRECISION)
                else:
                    z = _sf_conv_z_chunked(x_ptr, w1_ptr, w2_ptr, pix_x, p_ok, G, C_H, K, M, s_xc,
                                           BLOCK_P, KP, CHP, MP, GPK, NB1, GS, DOT_PRECISION)
                z = tl.permute(z, (1, 0, 2))
                if HAS_BIAS:
                    z += bias
                gz = tl.where(_activation_mask(z, ACT), gz, 0.0).to(gy_ptr.dtype.element_ty)
            if g0 == 0:
                gb += tl.sum(gz.to(tl.float32), axis=0)
            # grad_w2[j, t, g] = sum_p grad_z[p, j, t] * H[p, g, j]
            gw2 = tl.dot(tl.permute(gz, (1, 2, 0)), h2, gw2, input_precision=DOT_PRECISION)
            # grad_H[g, j] = sum_t grad_z[j, t] * w2[j, t, g], back in stage-1 layout
            gh2 = tl.dot(tl.permute(gz, (1, 0, 2)), tl.permute(w2, (0, 2, 1)), input_precision=DOT_PRECISION)
            gh1 = _from_stage2(gh2, NB1, BLOCK_P, GPK, CHP, GS).to(x1.dtype)  # (NB1, BLOCK_P, GPK*CHP)
            gx = tl.dot(gh1, tl.permute(w1, (0, 2, 1)), input_precision=DOT_PRECISION)
            tl.store(gx_ptr + pix_gx[None, :, None] + chan * s_gxc, gx.to(gx_ptr.dtype.element_ty), mask=x_ok)
            # grad_w1[g, j, i] = sum_p grad_H[p, g, j] * x[p, g*k + i]   (block-diagonal part used)
            gw1 = tl.dot(tl.permute(x1, (0, 2, 1)), gh1, gw1, input_precision=DOT_PRECISION)
        tl.atomic_add(gw1_ptr + w1_offs, gw1, mask=w1_ok)
        tl.atomic_add(gw2_ptr + tl.permute(w2_offs, (0, 2, 1)), gw2, mask=tl.permute(w2_ok, (0, 2, 1)))
    tl.atomic_add(gb_ptr + tl.reshape(ch, (CHP, MP)), gb, mask=tl.reshape(ch_ok, (CHP, MP)))


# ---------------------------------------------------------------------------------------------
# Tiling plan and autotuning


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# Input channels per group chunk, forward / backward (module constants so tests can shrink them).
# The backward also holds the chunk's weight-gradient accumulators, hence the smaller chunk.
_CHUNK_CHANNELS = {False: 1024, True: 512}


def _plan(G: int, c_h: int, k: int, m: int, backward: bool, chunk_channels: int | None = None) -> dict:
    """Padded block sizes for (G, c_h, k, m); every tl.dot dimension comes out >= 16.
    chunk_channels: input channels per group chunk (default _CHUNK_CHANNELS; _launch lowers it
    when the device refuses a chunk's tiles)."""
    KP, CHP, MP = _pow2(k), _pow2(c_h), max(16, _pow2(m))
    GPK = max(1, 16 // min(KP, CHP))  # groups packed per stage-1 product: GPK*k, GPK*c_h >= 16
    # groups per chunk: at most _CHUNK_CHANNELS input channels so that the tiles fit registers
    # and shared memory; one chunk keeps the weights resident (every FalconNet shape in the
    # forward, all but 1024->256 in the backward)
    GC = max(GPK, min(_pow2(G), (chunk_channels or _CHUNK_CHANNELS[backward]) // KP))
    GS = max(1, 16 // GC)  # stage 2's reduction dimension GC*GS >= 16 (see _to_stage2)
    return dict(KP=KP, CHP=CHP, MP=MP, GPK=GPK, NB1=GC // GPK, GS=GS, ONE_CHUNK=GC >= G)


def _tile_floats_per_thread(meta: dict, block_p: int, num_warps: int, backward: bool) -> float:
    """Rough count of live values per thread: x chunk, hidden chunk and output tile per pixel,
    plus, in the backward, the weight-gradient accumulators. Calibrated on sm_90 builds (ptxas
    register reports): the forward stays spill-free up to ~384, the backward up to ~200."""
    GC = meta["NB1"] * meta["GPK"]
    per_pixel = GC * meta["KP"] + GC * meta["GS"] * meta["CHP"] + meta["CHP"] * meta["MP"] * (2 if backward else 1)
    fixed = 0
    if backward:
        fixed = meta["NB1"] * meta["GPK"] ** 2 * meta["KP"] * meta["CHP"] + meta["CHP"] * meta["MP"] * GC * meta["GS"]
    return (block_p * per_pixel + fixed) / (32 * num_warps)


_REG_BUDGET = {False: 384, True: 200}  # forward, backward


_SMEM_BUDGET = 200 * 1024  # bytes; an H100/H200 block may use up to 227 KB


def _forward_smem_bytes(meta: dict, block_p: int, itemsize: int) -> int:
    """Shared memory of the forward: the resident weights plus two pipeline stages of the x tile
    (matches the sm_90 builds of the FalconNet shapes within a few %)."""
    GC = meta["NB1"] * meta["GPK"]
    weights = meta["NB1"] * meta["GPK"] ** 2 * meta["KP"] * meta["CHP"] + meta["CHP"] * GC * meta["GS"] * meta["MP"]
    return itemsize * (weights + 2 * block_p * GC * meta["KP"])


def _fits(meta: dict, block_p: int, num_warps: int, backward: bool, itemsize: int = 2) -> bool:
    if _tile_floats_per_thread(meta, block_p, num_warps, backward) > _REG_BUDGET[backward]:
        return False
    return backward or _forward_smem_bytes(meta, block_p, itemsize) <= _SMEM_BUDGET


def _default_configs(meta: dict, backward: bool, itemsize: int) -> list[tuple[int, int]]:
    """(BLOCK_P, num_warps) candidates without autotuning, largest pixel tile first: those that fit
    the budget, then the smallest. Under the interpreter: the smallest tile only, so that the
    tests' small shapes still give each persistent program several tiles (the loop and the
    cross-tile accumulation get exercised)."""
    if _interpreting():
        return [(16, 4)]
    fitting = [(bp, w) for bp, w in ((64, 8), (32, 8), (16, 8)) if _fits(meta, bp, w, backward, itemsize)]
    return fitting if (16, 8) in fitting else fitting + [(16, 8)]


# (device, backward, shape, itemsize, autotuned) -> the smaller group chunk _launch fell back to
_LAUNCHED_CHUNK: dict = {}


def _launch(backward: bool, shape: tuple, P: int, device, itemsize: int, args, flags) -> None:
    """Launch the forward or backward kernel for shape = (G, c_h, k, m), autotuned or not.
    The shared-memory estimate is only checked for the forward's tiles, and a compiled kernel can
    need more than any estimate: on the H100 (2026-11-27) the float32 backward of a RefCO layer
    512->128 (G = 64, k = 8, m = 48 or 16) asked for 237,568 bytes even at the smallest pixel tile,
    over the 232,448 a block may use. The chunk's weights and accumulators set it, not the pixel
    tile: compiled for sm_90 without a GPU (triton 3.6), m = 48 at BLOCK_P = 16 needs 327,680 /
    196,608 / 131,072 bytes at 64 / 32 / 16 groups a chunk. Triton raises OutOfResources at
    launch, before the kernel runs (the zeroed accumulators are untouched), so the plan is made
    again with half the groups a chunk, down to one packed product, and launched again. (With
    autotuning, the retry reuses the tile the autotuner cached for the shape.) The chunk that
    launched is remembered per device, pass, shape and item size, so later calls start there
    instead of repeating the refused launches."""
    key = (device, backward, tuple(shape), itemsize, _autotune_enabled())
    chunk = _LAUNCHED_CHUNK.get(key, _CHUNK_CHANNELS[backward])
    while True:
        meta = _plan(*shape, backward, chunk)
        try:
            if _autotune_enabled():
                tuned = _sf_conv_bwd_tuned if backward else _sf_conv_fwd_tuned
                tuned[_grid(P, device, meta, backward)](*args, **flags, **meta)
            else:
                kernel = _sf_conv_bwd_kernel if backward else _sf_conv_fwd_kernel
                _launch_default(kernel, P, device, meta, backward, itemsize, args, {**flags, **meta})
            if chunk != _CHUNK_CHANNELS[backward]:
                _LAUNCHED_CHUNK[key] = chunk
            return
        except OutOfResources:
            GC = meta["NB1"] * meta["GPK"]
            if GC <= meta["GPK"]:
                raise
            chunk = GC // 2 * meta["KP"]


def _launch_default(kernel, P: int, device, meta: dict, backward: bool, itemsize: int, args, flags) -> None:
    """Launch without autotuning: the first candidate of _default_configs that the device takes
    (OutOfResources at launch moves on to the next, smaller tile, as the autotuner skips a config
    that does not fit). num_stages=2 as in _FWD_CONFIGS / _BWD_CONFIGS (the tested kernel is one
    autotuning could pick): Triton's default of 3 needs 262,144 bytes at 1024->256 forward
    (BLOCK_P = 32)."""
    candidates = _default_configs(meta, backward, itemsize)
    for i, (block_p, num_warps) in enumerate(candidates):
        grid = _grid(P, device, meta, backward)({"BLOCK_P": block_p})
        try:
            kernel[grid](*args, **flags, BLOCK_P=block_p, num_warps=num_warps, num_stages=2)
            return
        except OutOfResources:
            if i == len(candidates) - 1:
                raise


def _prune(backward: bool):
    def prune(configs, named_args, **kwargs):
        meta = {name: named_args[name] if name in named_args else kwargs[name] for name in ("KP", "CHP", "MP", "GPK", "NB1", "GS")}
        itemsize = named_args["x_ptr"].element_size()
        kept = [c for c in configs if _fits(meta, c.kwargs["BLOCK_P"], c.num_warps, backward, itemsize)]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] / c.num_warps)]
    return prune


# Short lists: each config compiles once per shape, and the GPU check has minutes, not hours.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_P": bp}, num_warps=w, num_stages=2)
    for bp, w in ((16, 4), (32, 4), (32, 8), (64, 8), (128, 8))
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_P": bp}, num_warps=w, num_stages=2)
    for bp, w in ((16, 8), (32, 8), (64, 8))
]
_KEY = ["P", "G", "C_H", "K", "M", "HAS_RES", "ACT"]
_sf_conv_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune(False)})(
    _sf_conv_fwd_kernel
)
_sf_conv_bwd_tuned = triton.autotune(
    _BWD_CONFIGS, key=["P", "G", "C_H", "K", "M", "ACT"], reset_to_zero=["gw1_ptr", "gw2_ptr", "gb_ptr"],
    prune_configs_by={"early_config_prune": _prune(True)},
)(_sf_conv_bwd_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, bool]:
    """(t, s_n, s_c, s_hw, pixel_linear) for an NCHW-contiguous or channels_last tensor.

    Pixel hw = h*W + w sits at hw*s_hw; pixel_linear means n*HW + hw sits at (n*HW + hw)*s_hw.
    Strides of size-1 dimensions are arbitrary in PyTorch, so they are ignored here.
    """
    N, C, H, W = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    s_hw = s_w if W > 1 else s_h
    if H > 1 and W > 1 and s_h != W * s_w:
        t = t.contiguous()
        return _pixel_strides(t)
    linear = N == 1 or s_n == H * W * s_hw
    return t, s_n, s_c, s_hw, linear


# Persistent launch: a few programs per SM, each looping over pixel tiles. The forward wants
# several resident programs per SM for loads in flight. A backward program holds its weight-
# gradient accumulators and ends with one atomic add of them: one per SM, or two where they fit
# (an estimate <= 96 compiled to <= 128 registers on sm_90 at 8 warps, two programs per SM).
_FWD_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 1 for the interpreter's CPU tensors (more tiles per program)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _grid(P: int, device: torch.device, meta: dict, backward: bool):
    sms = _num_sms(device)

    def grid(cfg):
        per_sm = _FWD_PROGRAMS_PER_SM
        if backward:
            per_sm = 2 if _tile_floats_per_thread(meta, cfg["BLOCK_P"], 8, True) <= 96 else 1
        return (min(triton.cdiv(P, cfg["BLOCK_P"]), per_sm * sms),)

    return grid


def _forward_strides(x: torch.Tensor, y: torch.Tensor, residual):
    """(x, residual, the 9 pixel strides (x, y, residual: s_n, s_c, s_hw each), and whether each
    of x, y, residual is pixel-linear) for a forward launch; residual may be None."""
    x, s_xn, s_xc, s_xhw, x_lin = _pixel_strides(x)
    _, s_yn, s_yc, s_yhw, y_lin = _pixel_strides(y)
    if residual is not None:
        residual, s_rn, s_rc, s_rhw, r_lin = _pixel_strides(residual)
    else:
        s_rn = s_rc = s_rhw = 0
        r_lin = True
    return x, residual, (s_xn, s_xc, s_xhw, s_yn, s_yc, s_yhw, s_rn, s_rc, s_rhw), x_lin, y_lin, r_lin


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32/fp64: true IEEE products (tf32 would cost ~3e-4 relative error); 16-bit: ignored
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def sf_conv_forward(x, w1, w2, bias, residual, activation):
    """y = act(sf(x; w1, w2) + bias) + residual; x NCHW-contiguous or channels_last."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    N, C_in, H, W = x.shape
    C_out = c_h * m
    w1, w2 = w1.contiguous(), w2.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((N, C_out, H, W), device=x.device, dtype=x.dtype, memory_format=_out_format(x))
    P = N * H * W
    if P == 0:
        return y
    x, residual, strides, x_lin, y_lin, r_lin = _forward_strides(x, y, residual)
    s_xn, s_xc, s_xhw, s_yn, s_yc, s_yhw, s_rn, s_rc, s_rhw = strides
    args = (x, w1, w2, bias if bias is not None else x, residual if residual is not None else x, y,
            P, H * W, G, c_h, k, m, s_xn, s_xc, s_xhw, s_yn, s_yc, s_yhw, s_rn, s_rc, s_rhw)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=_ACTIVATION_CODE[activation],
                 X_LINEAR=x_lin, Y_LINEAR=y_lin, R_LINEAR=r_lin, DOT_PRECISION=_dot_precision(x.dtype))
    _launch(False, (G, c_h, k, m), P, x.device, x.element_size(), args, flags)
    return y


def sf_conv_backward(grad_y, x, w1, w2, bias, activation):
    """(grad_x, grad_w1, grad_w2, grad_bias) of sf_conv_forward; grad_bias has shape (C_out,)."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    N, C_in, H, W = x.shape
    C_out = c_h * m
    w1, w2 = w1.contiguous(), w2.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_out_format(x))
    # fp32 accumulators that the programs add into with atomics, zeroed by one fill and cast to
    # the weight dtype at the end (copy=True: the three results never share memory)
    acc = torch.zeros(w1.numel() + w2.numel() + C_out, device=x.device, dtype=torch.float32)
    gw1, gw2, gb = acc[: w1.numel()].view(w1.shape), acc[w1.numel(): -C_out].view(w2.shape), acc[-C_out:]
    P = N * H * W
    if P > 0:
        grad_y, s_gyn, s_gyc, s_gyhw, gy_lin = _pixel_strides(grad_y)
        x, s_xn, s_xc, s_xhw, x_lin = _pixel_strides(x)
        _, s_gxn, s_gxc, s_gxhw, gx_lin = _pixel_strides(grad_x)
        args = (grad_y, x, w1, w2, bias if bias is not None else x, grad_x, gw1, gw2, gb,
                P, H * W, G, c_h, k, m, s_gyn, s_gyc, s_gyhw, s_xn, s_xc, s_xhw, s_gxn, s_gxc, s_gxhw)
        flags = dict(HAS_BIAS=bias is not None, ACT=_ACTIVATION_CODE[activation],
                     GY_LINEAR=gy_lin, X_LINEAR=x_lin, GX_LINEAR=gx_lin, DOT_PRECISION=_dot_precision(x.dtype))
        _launch(True, (G, c_h, k, m), P, x.device, x.element_size(), args, flags)
    return grad_x, *(g.to(w1.dtype, copy=True) for g in (gw1, gw2, gb))
