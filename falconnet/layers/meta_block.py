"""The Meta Basic Block (paper 3.2, Table 2) and the Meta Light Block (paper 3.2, Fig. 4a).

Meta Basic Block: SO1 -> CO1 -> SO2 -> CO2 -> SO3 (+ shortcut). Each operator is one of
  "identity"  no-op
  "dw"        depthwise 3x3 conv + BN
  "pconv"     FasterNet's partial conv: a regular 3x3 conv on the first C/4 channels, no BN
  "conv"      regular 3x3 conv + BN
  "pw"        1x1 conv + BN (the channel operator; rows S and T of Table 2 also put it in an SO slot)
Widths: the first "pw" in the sequence expands C -> e*C, the last "pw" projects back to C (a
single "pw" maps C -> C); every other operator keeps the width it gets.
Activations: after every learnable operator except the last learnable one (MobileNetV2's linear
projection) and except "pconv" (FasterNet puts neither BN nor activation after it).

Meta Light Block: x -> CO1 (C -> eC) + BN + act -> SO (eC) + BN + act -> CO2 (eC -> C) + BN -> + x,
with SO = "dw" or "repso" and CO = "pw" or "refco". Its CO2 takes the shortcut as `residual`, so
a deployed RefCO adds it in the fused sf_conv epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .activation import DEFAULT_ACTIVATION, check_activation
from .conv_bn import ConvBN
from .refco import RefCO
from .repso import RepSO

SPATIAL_OPS = ("identity", "dw", "pconv", "conv", "pw")
CHANNEL_OPS = ("identity", "pw", "dw")


class PartialConv(nn.Module):
    """FasterNet's PConv: a regular 3x3 conv on the first channels // n_div channels, the rest untouched."""

    def __init__(self, channels: int, n_div: int = 4):
        super().__init__()
        if channels % n_div:
            raise ValueError(f"PartialConv needs n_div to divide channels: {n_div} does not divide {channels}")
        self.conv_channels = channels // n_div
        self.conv = nn.Conv2d(self.conv_channels, self.conv_channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv_channels
        return torch.cat((self.conv(x[:, :c]), x[:, c:]), dim=1)


def _make_op(kind: str, in_ch: int, out_ch: int, activation: str) -> Optional[nn.Module]:
    if kind == "identity":
        return None
    if kind == "dw":
        return ConvBN(in_ch, in_ch, 3, groups=in_ch, activation=activation)
    if kind == "conv":
        return ConvBN(in_ch, in_ch, 3, activation=activation)
    if kind == "pconv":
        return PartialConv(in_ch)
    if kind == "pw":
        return ConvBN(in_ch, out_ch, 1, activation=activation)
    raise ValueError(f"unknown operator {kind!r}; expected one of {SPATIAL_OPS}")


class MetaBasicBlock(nn.Module):
    """SO1 -> CO1 -> SO2 -> CO2 -> SO3 (+ shortcut); see the module docstring for the rules."""

    def __init__(
        self,
        channels: int,
        so1: str = "identity",
        co1: str = "pw",
        so2: str = "dw",
        co2: str = "pw",
        so3: str = "identity",
        expansion: float = 4,
        activation: str = DEFAULT_ACTIVATION,
        shortcut: bool = True,
    ):
        super().__init__()
        check_activation(activation)
        kinds = [so1, co1, so2, co2, so3]
        for slot, kind, allowed in zip(("so1", "co1", "so2", "co2", "so3"), kinds, (SPATIAL_OPS, CHANNEL_OPS) * 2 + (SPATIAL_OPS,)):
            if kind not in allowed:
                raise ValueError(f"MetaBasicBlock {slot} must be one of {allowed}, got {kind!r}")
        hidden = int(round(channels * expansion))
        pw_slots = [i for i, kind in enumerate(kinds) if kind == "pw"]
        learnable = [i for i, kind in enumerate(kinds) if kind != "identity"]
        self.kinds = tuple(kinds)
        self.shortcut = shortcut
        ops = []
        width = channels
        for i, kind in enumerate(kinds):
            out = width
            if kind == "pw":
                if len(pw_slots) > 1 and i == pw_slots[0]:
                    out = hidden
                elif i == pw_slots[-1]:
                    out = channels
            act = "none" if (learnable and i == learnable[-1]) or kind == "pconv" else activation
            ops.append(_make_op(kind, width, out, act) or nn.Identity())
            width = out
        if width != channels:
            raise ValueError(f"MetaBasicBlock {kinds} does not return to {channels} channels")
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for op in self.ops:
            y = op(y)
        return y + x if self.shortcut else y


# Table 2 (paper 4.3.1). Its "Exp Ratio" column was lost. Rows with the same operators (B/C,
# D/E/O, F/P, G/R, H/I, J/K, L/M) can only differ in it. E equals Table 1's IRB row and I its
# FasterNet row, both of which Table 1's counts put at e = 4 (docs/design.md), so the
# better-scoring member of each pair gets 4 and the other 2 (O, the weakest of D/E/O, gets 1).
_T2 = {
    "A": ("identity", "pw", "identity", "pw", "identity", 4),
    "B": ("dw", "pw", "identity", "pw", "identity", 2),
    "C": ("dw", "pw", "identity", "pw", "identity", 4),
    "D": ("identity", "pw", "dw", "pw", "identity", 2),
    "E": ("identity", "pw", "dw", "pw", "identity", 4),
    "F": ("dw", "pw", "dw", "pw", "identity", 4),
    "G": ("dw", "pw", "dw", "pw", "dw", 2),
    "H": ("pconv", "pw", "identity", "pw", "identity", 2),
    "I": ("pconv", "pw", "identity", "pw", "identity", 4),
    "J": ("conv", "pw", "identity", "pw", "identity", 2),
    "K": ("conv", "pw", "identity", "pw", "identity", 4),
    "L": ("conv", "pw", "dw", "pw", "identity", 2),
    "M": ("conv", "pw", "dw", "pw", "identity", 4),
    "N": ("dw", "pw", "identity", "identity", "identity", 4),
    "O": ("identity", "pw", "dw", "pw", "identity", 1),
    "P": ("dw", "pw", "dw", "pw", "identity", 2),
    "Q": ("dw", "pw", "identity", "pw", "dw", 4),
    "R": ("dw", "pw", "dw", "pw", "dw", 4),
    "S": ("pw", "identity", "identity", "dw", "pw", 4),
    "T": ("pw", "identity", "pw", "dw", "dw", 4),
}
TABLE2_CONFIGS = {
    row: dict(so1=a, co1=b, so2=c, co2=d, so3=e, expansion=ratio) for row, (a, b, c, d, e, ratio) in _T2.items()
}


def table2_block(row: str, channels: int, **kwargs) -> MetaBasicBlock:
    """The Meta Basic Block of Table 2 row "A".."T" (keyword arguments override the row)."""
    if row not in TABLE2_CONFIGS:
        raise ValueError(f"Table 2 row must be one of {sorted(TABLE2_CONFIGS)}, got {row!r}")
    return MetaBasicBlock(channels, **{**TABLE2_CONFIGS[row], **kwargs})


class MetaLightBlock(nn.Module):
    """x -> CO1 (C -> eC) + act -> SO (eC) + act -> CO2 (eC -> C) -> + x.

    spatial: "dw" (IRB) or "repso" (RepSO block); channel: "pw" or "refco" (FalconNet).
    refco: keyword arguments for RefCO (branches, r, k); repso: keyword arguments for RepSO;
    refco_on: which PW-Convs become RefCO when channel="refco" (both by default).
    """

    def __init__(
        self,
        channels: int,
        expansion: float = 4,
        activation: str = DEFAULT_ACTIVATION,
        spatial: str = "dw",
        channel: str = "pw",
        shortcut: bool = True,
        refco: Optional[dict] = None,
        repso: Optional[dict] = None,
        refco_on: tuple = ("co1", "co2"),
    ):
        super().__init__()
        check_activation(activation)
        hidden = int(round(channels * expansion))
        self.shortcut = shortcut
        if channel not in ("pw", "refco"):
            raise ValueError(f"MetaLightBlock channel must be 'pw' or 'refco', got {channel!r}")
        if not set(refco_on) <= {"co1", "co2"}:
            raise ValueError(f"MetaLightBlock refco_on must name 'co1' and/or 'co2', got {refco_on!r}")
        use_refco = {name: channel == "refco" and name in refco_on for name in ("co1", "co2")}
        if use_refco["co1"]:
            self.co1 = RefCO(channels, hidden, activation=activation, **(refco or {}))
        else:
            self.co1 = ConvBN(channels, hidden, 1, activation=activation)
        if spatial == "dw":
            self.so = ConvBN(hidden, hidden, 3, groups=hidden, activation=activation)
        elif spatial == "repso":
            self.so = RepSO(hidden, activation=activation, **(repso or {}))
        else:
            raise ValueError(f"MetaLightBlock spatial must be 'dw' or 'repso', got {spatial!r}")
        if use_refco["co2"]:
            self.co2 = RefCO(hidden, channels, activation="none", **(refco or {}))
        else:
            self.co2 = ConvBN(hidden, channels, 1, activation="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.co2(self.so(self.co1(x)), residual=x if self.shortcut else None)
