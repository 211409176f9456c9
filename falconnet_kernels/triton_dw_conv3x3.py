"""Fused depthwise 3x3 conv (the folded RepSO) in Triton: y = act(dwconv3x3(x, w, stride) + bias).

The two numbers, per output element (N*C*Ho*Wo of them):
  * 9 multiply-accumulates (forward; the backward does 9 for grad_x and 9 for grad_w);
  * fewest bytes: x read once and y written once, (H*W/(Ho*Wo) + 1) * itemsize per output
    element. At 9 MACs per ~4 bytes (bf16, stride 1) the op is purely memory-bound: the goal is
    copy bandwidth. cuDNN's depthwise kernels reach about 20% of it (SPEC section 6).
At the benchmark shapes (bf16, channels_last, batch 128, stride 1; floor = bytes / copy
bandwidth, 3.02 TB/s H100, 4.27 TB/s H200):
    C @ H      forward MB   floor H100 / H200    fwd+bwd MB (x, y; grad_y, x, grad_x)
    128 @ 56     205.5        68 / 48 us          514
    256 @ 28     102.8        34 / 24 us          257
    512 @ 14      51.4        17 / 12 us          128
    1024 @ 7      25.7       8.5 / 6.0 us          64
With relu/relu6 the backward also writes and re-reads grad_z (below): 7 passes instead of 5.

Design. A program owns BLOCK_Q output pixels (consecutive in n*Ho*Wo + oh*Wo + ow, i.e. a few
image rows) times BLOCK_C channels. It loads the 9 shifted input tiles straight from global
memory: the first touch of each input row comes from HBM, the other 8 hit L1 (rows shared with
the tile above or below hit L2), so HBM traffic stays near one read of x. For channels_last (the
benchmarked layout) the BLOCK_C channels of a pixel are contiguous, so every load is a run of
BLOCK_C*itemsize bytes; NCHW runs through the same kernel with its own strides.

Backward, two kernels:
  1. weight/bias gradients in output-pixel form: each program walks a slab of output tiles,
     recomputes z for the activation mask (relu/relu6), keeps one fp32 accumulator per tap and
     reduces over pixels once at the end; one fp32 atomic add per program and channel. With an
     activation it also writes grad_z = grad_y * act'(z), which the second kernel needs at 9
     neighbouring outputs of every input pixel (recomputing z there would cost 81 loads each).
  2. grad_x in input-pixel (gather) form: grad_x[ih, iw] = sum over taps of grad_z[oh, ow] * w,
     with oh = (ih + 1 - dy) / stride where that divides; each element is written once, no atomics.
Accumulation is in fp32 for every dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import triton_autotune_enabled as _autotune_enabled
from .reference import out_format as _out_format

_ACTIVATION_CODE = {"none": 0, "relu": 1, "relu6": 2}


# ---------------------------------------------------------------------------------------------
# @triton.jit helpers and kernels


@triton.jit
def _output_pixels(tile, total, HoWo, Wo, BLOCK_Q: tl.constexpr):
    """Tile `tile`'s output pixels o = n*Ho*Wo + oh*Wo + ow as (n, oh, ow, valid); int64 offsets."""
    o = tl.arange(0, BLOCK_Q).to(tl.int64) + tile * BLOCK_Q
    n = o // HoWo
    q = o - n * HoWo
    oh = q // Wo
    return n, oh, q - oh * Wo, o < total


@triton.jit
def _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_n, s_c, s_h, s_w,
              DY: tl.constexpr, DX: tl.constexpr, STRIDE: tl.constexpr):
    """x at the (DY, DX) tap of each output pixel, zero outside the image, as fp32 (BLOCK_Q, BLOCK_C)."""
    ih = oh * STRIDE + (DY - 1)
    iw = ow * STRIDE + (DX - 1)
    ok = o_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = (n * s_n + ih * s_h + iw * s_w)[:, None] + c[None, :] * s_c
    return tl.load(x_ptr + offs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_weight_tap(w_ptr, c, c_ok, TAP: tl.constexpr):
    return tl.load(w_ptr + c * 9 + TAP, mask=c_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _dw_z(x_ptr, w_ptr, b_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_n, s_c, s_h, s_w,
          STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-activation output z = conv + bias for one tile, fp32 (BLOCK_Q, BLOCK_C)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(9):
        xv = _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_n, s_c, s_h, s_w, tap // 3, tap % 3, STRIDE)
        acc += xv * _load_weight_tap(w_ptr, c, c_ok, tap)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, Wo, HoWo, total,
    s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw,
    STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, oh, ow, o_ok = _output_pixels(tl.program_id(0), total, HoWo, Wo, BLOCK_Q)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    z = _dw_z(x_ptr, w_ptr, b_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw,
              STRIDE, HAS_BIAS, BLOCK_Q, BLOCK_C)
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    offs = (n * s_yn + oh * s_yh + ow * s_yw)[:, None] + c[None, :] * s_yc
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_bwd_weight_kernel(
    gy_ptr, x_ptr, w_ptr, b_ptr, gz_ptr, gw_ptr, gb_ptr,
    C, H, W, Wo, HoWo, total, tiles_per_program,
    s_gyn, s_gyc, s_gyh, s_gyw, s_xn, s_xc, s_xh, s_xw,
    STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_w[c, tap] = sum_o grad_z[o, c] * x[tap(o), c]; grad_b = sum_o grad_z; grad_z out if ACT."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    a0 = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    a8 = tl.zeros_like(a0)
    ab = tl.zeros_like(a0)
    first_tile = tl.program_id(0) * tiles_per_program
    for tile in range(first_tile, first_tile + tiles_per_program):
        n, oh, ow, o_ok = _output_pixels(tile, total, HoWo, Wo, BLOCK_Q)
        ok = o_ok[:, None] & c_ok[None, :]
        gy_offs = (n * s_gyn + oh * s_gyh + ow * s_gyw)[:, None] + c[None, :] * s_gyc
        gz = tl.load(gy_ptr + gy_offs, mask=ok, other=0.0)
        if ACT != 0:
            z = _dw_z(x_ptr, w_ptr, b_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw,
                      STRIDE, HAS_BIAS, BLOCK_Q, BLOCK_C)
            if ACT == 1:
                keep = z > 0.0
            else:
                keep = (z > 0.0) & (z < 6.0)
            gz = tl.where(keep, gz, 0.0)
        gz16 = gz
        gz = gz.to(tl.float32)
        ab += gz
        a0 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 0, 0, STRIDE)
        a1 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 0, 1, STRIDE)
        a2 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 0, 2, STRIDE)
        a3 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 1, 0, STRIDE)
        a4 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 1, 1, STRIDE)
        a5 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 1, 2, STRIDE)
        a6 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 2, 0, STRIDE)
        a7 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 2, 1, STRIDE)
        a8 += gz * _load_tap(x_ptr, n, oh, ow, c, c_ok, o_ok, H, W, s_xn, s_xc, s_xh, s_xw, 2, 2, STRIDE)
        if ACT != 0:
            # stored last, so that no store separates the tap loads above from the identical
            # ones in _dw_z (the compiler can reuse them); grad_z has grad_y's strides
            tl.store(gz_ptr + gy_offs, gz16, mask=ok)
    gw = gw_ptr + c * 9
    tl.atomic_add(gw + 0, tl.sum(a0, axis=0), mask=c_ok)
    tl.atomic_add(gw + 1, tl.sum(a1, axis=0), mask=c_ok)
    tl.atomic_add(gw + 2, tl.sum(a2, axis=0), mask=c_ok)
    tl.atomic_add(gw + 3, tl.sum(a3, axis=0), mask=c_ok)
    tl.atomic_add(gw + 4, tl.sum(a4, axis=0), mask=c_ok)
    tl.atomic_add(gw + 5, tl.sum(a5, axis=0), mask=c_ok)
    tl.atomic_add(gw + 6, tl.sum(a6, axis=0), mask=c_ok)
    tl.atomic_add(gw + 7, tl.sum(a7, axis=0), mask=c_ok)
    tl.atomic_add(gw + 8, tl.sum(a8, axis=0), mask=c_ok)
    tl.atomic_add(gb_ptr + c, tl.sum(ab, axis=0), mask=c_ok)


@triton.jit
def _dw_bwd_input_kernel(
    gz_ptr, w_ptr, gx_ptr,
    C, H, W, Ho, Wo, HW, total,
    s_gzn, s_gzc, s_gzh, s_gzw, s_gxn, s_gxc, s_gxh, s_gxw,
    STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[ih, iw] = sum_taps grad_z[oh, ow] * w[tap] with oh*STRIDE - 1 + dy = ih (gather form)."""
    n, ih, iw, i_ok = _output_pixels(tl.program_id(0), total, HW, W, BLOCK_Q)  # input pixels here
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(9):
        th = ih + 1 - tap // 3
        tw = iw + 1 - tap % 3
        if STRIDE == 1:
            oh = th
            ow = tw
            ok = i_ok & (th >= 0) & (th < Ho) & (tw >= 0) & (tw < Wo)
        else:
            oh = th // STRIDE
            ow = tw // STRIDE
            ok = i_ok & (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (oh < Ho) & (ow < Wo)
        offs = (n * s_gzn + oh * s_gzh + ow * s_gzw)[:, None] + c[None, :] * s_gzc
        g = tl.load(gz_ptr + offs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += g * _load_weight_tap(w_ptr, c, c_ok, tap)
    offs = (n * s_gxn + ih * s_gxh + iw * s_gxw)[:, None] + c[None, :] * s_gxc
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=i_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Autotuning


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(C), 64)


# (BLOCK_Q, BLOCK_C, num_warps); short lists, each config compiles once per shape. Large BLOCK_Q
# covers several image rows, so fewer halo rows are re-read from L2.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_Q": q, "BLOCK_C": c}, num_warps=w)
    for q, c, w in ((64, 64, 4), (128, 64, 8), (256, 32, 8), (32, 128, 4))
]
_DW_KEY = ["C", "H", "W", "total", "STRIDE", "HAS_BIAS", "ACT"]
_dw_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_DW_KEY)(_dw_fwd_kernel)
_INPUT_CONFIGS = [
    triton.Config({"BLOCK_Q": q, "BLOCK_C": c}, num_warps=w)
    for q, c, w in ((64, 64, 4), (128, 64, 8), (256, 32, 8))
]
_dw_bwd_input_tuned = triton.autotune(_INPUT_CONFIGS, key=["C", "H", "W", "total", "STRIDE"])(_dw_bwd_input_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dw_conv3x3_forward(x, weight, bias, stride, activation):
    """y = act(depthwise_conv3x3(x, weight, stride, padding=1) + bias)."""
    N, C, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((N, C, Ho, Wo), device=x.device, dtype=x.dtype, memory_format=_out_format(x))
    total = N * Ho * Wo
    if total == 0 or C == 0:
        return y
    args = (x, weight, bias if bias is not None else weight, y, C, H, W, Wo, Ho * Wo, total, *x.stride(), *y.stride())
    flags = dict(STRIDE=stride, HAS_BIAS=bias is not None, ACT=_ACTIVATION_CODE[activation])
    if _autotune_enabled():
        _dw_fwd_tuned[lambda cfg: (triton.cdiv(total, cfg["BLOCK_Q"]), triton.cdiv(C, cfg["BLOCK_C"]))](*args, **flags)
    else:
        block_c = _block_c(C)
        block_q = max(16, 4096 // block_c)
        grid = (triton.cdiv(total, block_q), triton.cdiv(C, block_c))
        _dw_fwd_kernel[grid](*args, **flags, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4)
    return y


def _weight_grad_into(grad_y, x, weight, bias, stride, activation, gw, gb):
    """Adds the weight and bias gradients into the float32 gw (C, 1, 3, 3) and gb (C,) (zeroed by
    the caller); returns grad_z = grad_y * act'(z) (grad_y itself without an activation)."""
    N, C, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    total = N * Ho * Wo
    act = _ACTIVATION_CODE[activation]
    # with an activation, grad_z = grad_y * act'(z) is materialised once (same strides as grad_y)
    grad_z = torch.empty_like(grad_y) if act != 0 else grad_y
    # about 4 slabs per SM over all channel blocks
    block_c = _block_c(C)
    block_q = max(16, 2048 // block_c)  # 10 fp32 accumulator tiles live: 8 warps keep them in registers
    c_blocks = triton.cdiv(C, block_c)
    tiles = triton.cdiv(total, block_q)
    slabs = max(1, min(tiles, 4 * _num_sms(x.device) // c_blocks))
    tiles_per_program = triton.cdiv(tiles, slabs)
    slabs = triton.cdiv(tiles, tiles_per_program)
    _dw_bwd_weight_kernel[(slabs, c_blocks)](
        grad_y, x, weight, bias if bias is not None else weight, grad_z, gw, gb,
        C, H, W, Wo, Ho * Wo, total, tiles_per_program, *grad_y.stride(), *x.stride(),
        STRIDE=stride, HAS_BIAS=bias is not None, ACT=act, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=8,
    )
    return grad_z


def dw_conv3x3_weight_grad(grad_y, x):
    """(grad_weight (C, 1, 3, 3), grad_bias (C,)) of the stride-1 depthwise 3x3 conv of x without
    activation, float32 (one launch after a zero fill): RepSO's one-node GPU path can use it in
    place of cuDNN's weight gradient (falconnet/layers/repso_train.py, WEIGHT_GRAD)."""
    C = x.shape[1]
    acc = torch.zeros(10 * C, device=x.device, dtype=torch.float32)
    gw, gb = acc[: 9 * C].view(C, 1, 3, 3), acc[9 * C:]
    if x.numel():
        _weight_grad_into(grad_y, x, x.new_empty(()), None, 1, "none", gw, gb)
    return gw, gb


def dw_conv3x3_backward(grad_y, x, weight, bias, stride, activation):
    """(grad_x, grad_weight, grad_bias) of dw_conv3x3_forward; grad_bias has shape (C,) always."""
    N, C, H, W = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_out_format(x))
    # fp32 accumulators for the atomic adds, zeroed by one fill, cast at the end (copy=True: the
    # two results never share memory)
    acc = torch.zeros(10 * C, device=x.device, dtype=torch.float32)
    gw, gb = acc[: 9 * C].view(C, 1, 3, 3), acc[9 * C:]
    total = N * Ho * Wo
    if total == 0 or C == 0:
        grad_x.zero_()
        return grad_x, gw.to(weight.dtype, copy=True), gb.to(weight.dtype, copy=True)
    # 1. weight and bias gradients (and grad_z with an activation)
    grad_z = _weight_grad_into(grad_y, x, weight, bias, stride, activation, gw, gb)
    block_c = _block_c(C)
    c_blocks = triton.cdiv(C, block_c)

    # 2. grad_x, gathered per input pixel
    in_total = N * H * W
    args = (grad_z, weight, grad_x, C, H, W, Ho, Wo, H * W, in_total, *grad_z.stride(), *grad_x.stride())
    if _autotune_enabled():
        _dw_bwd_input_tuned[lambda cfg: (triton.cdiv(in_total, cfg["BLOCK_Q"]), triton.cdiv(C, cfg["BLOCK_C"]))](
            *args, STRIDE=stride)
    else:
        block_q = max(16, 4096 // block_c)
        grid = (triton.cdiv(in_total, block_q), c_blocks)
        _dw_bwd_input_kernel[grid](*args, STRIDE=stride, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4)
    return grad_x, gw.to(weight.dtype, copy=True), gb.to(weight.dtype, copy=True)
