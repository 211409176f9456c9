"""The re-parameterization math, written once: BatchNorm folding and kernel merging.

Every multi-branch module (RepSO, RefCO, ConvBN) folds through these functions, and the tests
use the same ones only through the modules, never re-deriving them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Folding is done in float64 and rounded once at the end, so a folded float32 model differs from
# the branches only by the float32 rounding of the forward itself.
FOLD_DTYPE = torch.float64


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift (per channel, float64), from its running statistics."""
    std = torch.sqrt(bn.running_var.to(FOLD_DTYPE) + bn.eps)
    gamma = bn.weight.to(FOLD_DTYPE) if bn.affine else torch.ones_like(std)
    beta = bn.bias.to(FOLD_DTYPE) if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.to(FOLD_DTYPE) * scale


def fold_conv_bn(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: Optional[nn.BatchNorm2d]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv (weight (C_out, ...), optional bias) followed by eval BN -> one conv weight and bias (float64)."""
    weight = weight.to(FOLD_DTYPE)
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.to(FOLD_DTYPE)
    if bn is None:
        return weight, bias
    scale, shift = bn_scale_shift(bn)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias * scale + shift


def pad_kernel(kernel: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Zero-pad a (C, 1, h, w) kernel to (C, 1, kh, kw), centred (odd sizes keep the same centre)."""
    h, w = kernel.shape[-2:]
    if (kh - h) % 2 or (kw - w) % 2:
        raise ValueError(f"cannot centre a {h}x{w} kernel in {kh}x{kw}: sizes must differ by an even number")
    dh, dw = (kh - h) // 2, (kw - w) // 2
    return F.pad(kernel, (dw, dw, dh, dh))


def identity_kernel(channels: int, kh: int, kw: int, like: torch.Tensor) -> torch.Tensor:
    """The depthwise (C, 1, kh, kw) kernel of the identity map: a centred 1."""
    kernel = like.new_zeros(channels, 1, kh, kw)
    kernel[:, 0, kh // 2, kw // 2] = 1
    return kernel
