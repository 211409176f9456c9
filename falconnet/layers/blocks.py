"""The basic blocks of Table 1, each at constant width C and stride 1 (LightNet's subsampling
layers change the resolution and width between stages).

Where a block is a Meta Basic Block instantiation it is built as one, so the Table 2 reading and
the Table 1 blocks share code. Expansion ratios were settled by counting (docs/design.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activation import DEFAULT_ACTIVATION, apply_activation, check_activation
from .conv_bn import ConvBN
from .meta_block import MetaBasicBlock, MetaLightBlock


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def dsc_block(channels: int, expansion: float = 4, activation: str = DEFAULT_ACTIVATION) -> MetaBasicBlock:
    """MobileNetV1's DS-Conv twice, C -> eC -> C (DW, PW, DW, PW): Table 2 row P's operators, no shortcut."""
    return MetaBasicBlock(channels, "dw", "pw", "dw", "pw", "identity", expansion, activation, shortcut=False)


def residual_dsc_block(channels: int, expansion: float = 4, activation: str = DEFAULT_ACTIVATION) -> MetaBasicBlock:
    """ResNet's basic block with both 3x3 convs replaced by DS-Convs (paper 4.2): dsc_block + shortcut."""
    return MetaBasicBlock(channels, "dw", "pw", "dw", "pw", "identity", expansion, activation, shortcut=True)


def inverted_residual_block(channels: int, expansion: float = 4, activation: str = DEFAULT_ACTIVATION) -> MetaLightBlock:
    """MobileNetV2's IRB = the Meta Light Block with a DW3x3 (Table 2 row E)."""
    return MetaLightBlock(channels, expansion, activation, spatial="dw", channel="pw")


def sandglass_block(channels: int, expansion: float = 5, activation: str = DEFAULT_ACTIVATION) -> MetaBasicBlock:
    """MobileNeXt's sandglass: DW, PW, PW, DW with the shortcut on the wide ends (Table 2 row Q)."""
    return MetaBasicBlock(channels, "dw", "pw", "identity", "pw", "dw", expansion, activation, shortcut=True)


def fasternet_block(channels: int, expansion: float = 4, activation: str = DEFAULT_ACTIVATION) -> MetaBasicBlock:
    """FasterNet's block: PConv, PW (C -> eC) + act, PW (eC -> C), shortcut (Table 2 row I)."""
    return MetaBasicBlock(channels, "pconv", "pw", "identity", "pw", "identity", expansion, activation, shortcut=True)


def repso_block(
    channels: int, expansion: float = 4, activation: str = DEFAULT_ACTIVATION, repso: Optional[dict] = None
) -> MetaLightBlock:
    """The Meta Light Block with RepSO as its spatial operator (LightNet + RepSO block)."""
    return MetaLightBlock(channels, expansion, activation, spatial="repso", channel="pw", repso=repso)


def falcon_block(
    channels: int,
    expansion: float = 4,
    activation: str = DEFAULT_ACTIVATION,
    repso: Optional[dict] = None,
    refco: Optional[dict] = None,
    refco_on: tuple = ("co1", "co2"),
) -> MetaLightBlock:
    """FalconNet's block: Meta Light Block with RepSO and RefCO for the PW-Convs (paper 3.5, Fig. 9)."""
    return MetaLightBlock(
        channels, expansion, activation, spatial="repso", channel="refco", repso=repso, refco=refco, refco_on=refco_on
    )


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1's stride-1 unit: GConv1x1 (C -> eC) + act, shuffle, DW3x3 (linear), GConv1x1 (eC -> C), + x, act."""

    def __init__(self, channels: int, expansion: float = 3, groups: int = 4, activation: str = DEFAULT_ACTIVATION):
        super().__init__()
        hidden = int(round(channels * expansion))
        for name, c in (("channels", channels), ("hidden width", hidden)):
            if c % groups:
                raise ValueError(f"ShuffleV1Unit needs groups={groups} to divide the {name} {c}")
        self.groups = groups
        self.activation = check_activation(activation)
        self.gconv1 = ConvBN(channels, hidden, 1, groups=groups, activation=activation)
        self.dw = ConvBN(hidden, hidden, 3, groups=hidden, activation="none")
        self.gconv2 = ConvBN(hidden, channels, 1, groups=groups, activation="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(channel_shuffle(self.gconv1(x), self.groups))
        return apply_activation(self.gconv2(y, residual=x), self.activation)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: split in halves; the second half goes PW (C/2 -> eC/2) + act,
    DW3x3 (linear), PW (-> C/2) + act; concatenate with the first half and shuffle in 2 groups.

    e expands the branch's half (hidden = e * C/2). LightNet's own subsampling layers, not
    ShuffleNetV2's stride-2 unit, join the stages (docs/design.md counts both)."""

    def __init__(self, channels: int, expansion: float = 7, activation: str = DEFAULT_ACTIVATION):
        super().__init__()
        if channels % 2:
            raise ValueError(f"ShuffleV2Unit needs an even channel count, got {channels}")
        half = channels // 2
        hidden = int(round(half * expansion))
        self.pw1 = ConvBN(half, hidden, 1, activation=activation)
        self.dw = ConvBN(hidden, hidden, 3, groups=hidden, activation="none")
        self.pw2 = ConvBN(hidden, half, 1, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((keep, self.pw2(self.dw(self.pw1(work)))), dim=1), 2)


class HBOBlock(nn.Module):
    """HBONet's harmonious bottleneck (2x, stride 1): spatial contraction-expansion around a
    channel expansion-contraction, on half the channels; the other half passes through.

    DW5x5 stride 2 (linear) -> PW (C -> eC) + act -> DW3x3 + act -> PW (eC -> C/2) (linear)
    -> nearest upsample to the input size -> + x[:, :C/2] -> DW5x5 (linear); output is
    concat(x[:, C/2:], that), so successive blocks alternate which half they transform.
    """

    def __init__(self, channels: int, expansion: float = 6, activation: str = DEFAULT_ACTIVATION):
        super().__init__()
        if channels % 2:
            raise ValueError(f"HBOBlock needs an even channel count, got {channels}")
        half = channels // 2
        hidden = int(round(channels * expansion))
        self.half = half
        self.contract = ConvBN(channels, channels, 5, stride=2, groups=channels, activation="none")
        self.expand = ConvBN(channels, hidden, 1, activation=activation)
        self.dw = ConvBN(hidden, hidden, 3, groups=hidden, activation=activation)
        self.project = ConvBN(hidden, half, 1, activation="none")
        self.upconv = ConvBN(half, half, 5, groups=half, activation="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(self.contract(x))))
        y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        return torch.cat((x[:, self.half :], self.upconv(x[:, : self.half] + y)), dim=1)


# name -> constructor(channels, expansion=..., activation=..., **block-specific keyword arguments)
BLOCKS = {
    "dsc": dsc_block,
    "rdsc": residual_dsc_block,
    "shufflev1": ShuffleV1Unit,
    "shufflev2": ShuffleV2Unit,
    "irb": inverted_residual_block,
    "sandglass": sandglass_block,
    "hbo": HBOBlock,
    "fasternet": fasternet_block,
    "repso": repso_block,
    "falcon": falcon_block,
    "meta_basic": MetaBasicBlock,  # Table 2 rows (--preset table2-*)
}


def make_block(name: str, channels: int, **kwargs) -> nn.Module:
    if name not in BLOCKS:
        raise ValueError(f"unknown block type {name!r}; expected one of {sorted(BLOCKS)}")
    return BLOCKS[name](channels, **kwargs)
