"""ConvBN: conv (no bias) + BatchNorm + activation, with an optional fused residual add.

`reparameterize()` folds the BN into the conv (which gains a bias). A deployed depthwise 3x3
ConvBN then runs on the fused dw_conv3x3 op with its activation in the epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from falconnet_kernels import dw_conv3x3

from .activation import DEFAULT_ACTIVATION, add_residual, apply_activation, check_activation, split_for_fusion
from .fold import fold_conv_bn


class ConvBN(nn.Module):
    """conv(kernel_size, stride, groups) -> BN -> activation [-> + residual].

    ``activation`` is "none" for a linear layer (projections, the stem's last DW conv).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        activation: str = DEFAULT_ACTIVATION,
        bn: bool = True,
    ):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.activation = check_activation(activation)
        self.conv = nn.Conv2d(
            in_channels, out_channels, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=not bn
        )
        self.bn = nn.BatchNorm2d(out_channels) if bn else None

    @property
    def is_depthwise3x3(self) -> bool:
        c = self.conv
        return (
            c.kernel_size == (3, 3)
            and c.groups == c.in_channels == c.out_channels
            and c.stride[0] == c.stride[1]
            and c.stride[0] in (1, 2)
        )

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.bn is None and self.is_depthwise3x3:
            fused, after = split_for_fusion(self.activation)
            y = apply_activation(dw_conv3x3(x, self.conv.weight, self.conv.bias, self.conv.stride[0], fused), after)
        else:
            y = self.conv(x)
            if self.bn is not None:
                y = self.bn(y)
            y = apply_activation(y, self.activation, inplace=True)  # y: this layer's fresh output
        return add_residual(y, residual)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the conv in place; a second call does nothing."""
        if self.bn is None:
            return
        weight, bias = fold_conv_bn(self.conv.weight, self.conv.bias, self.bn)
        c = self.conv
        self.conv = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups, bias=True
        ).to(device=c.weight.device, dtype=c.weight.dtype)
        self.conv.weight.copy_(weight)
        self.conv.bias.copy_(bias)
        self.bn = None
