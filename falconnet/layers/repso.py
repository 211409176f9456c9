"""RepSO: the re-parameterized spatial operator (paper 3.3, SPEC section 3, Table 3).

Training: parallel depthwise conv branches, each followed by its own BatchNorm, plus an
identity branch (BN only), summed, then the activation. Inference: ONE depthwise conv with bias
of the largest branch size (3x3 for the paper's default, run on the fused dw_conv3x3 op).

Branch structure (a contract: falconnet/layers/repso_train.py computes the same sum exactly
with one conv, from the same modules):
  self.branches     nn.ModuleList; branch i is nn.Sequential(conv=nn.Conv2d(C, C, (kh, kw),
                    stride, padding=(kh//2, kw//2), groups=C, bias=False), bn=nn.BatchNorm2d(C))
  self.identity_bn  nn.BatchNorm2d(C) or None
  self._train_forward(x) = sum_i branches[i](x) + identity_bn(x)   (before the activation;
                    _train_forward(x, activation) applies it, inside the one-conv node where it can)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import torch
import torch.nn as nn

from falconnet_kernels import dw_conv3x3

from .activation import apply_activation, check_activation, split_for_fusion
from .fold import FOLD_DTYPE, fold_conv_bn, identity_kernel, pad_kernel
from .repso_train import needs_sync, repso_train_forward

# Table 3's header was lost. Its 11 count columns read as the branch kernels below: column 5 is
# 3x3 because row C (3x3 only) equals the IRB row of Table 1 (94.84 / 76.92) and rows P/Q/R hold
# "3" there (N = 3 parallel 3x3 branches, paper 3.3); row T (1,1,1,1,3) is then identity, 1x1,
# 1x3, 3x1 and three 3x3 - exactly the seven branches of paper 3.3. The text names rows C, E, F
# as the "large kernel" rows, so columns 10 and 11 (their only entries) are 5x5 and 7x7; columns
# 6-7 (row D, paired like 1x3/3x1) are 1x5/5x1 and 8-9 (row K) 1x7/7x1, the asymmetric pairs.
TABLE3_COLUMNS = ("identity", (1, 1), (1, 3), (3, 1), (3, 3), (1, 5), (5, 1), (1, 7), (7, 1), (5, 5), (7, 7))
_TABLE3_ROWS = {
    "A": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "B": (0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "C": (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "D": (0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0),
    "E": (0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0),
    "F": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    "G": (1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "H": (0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "I": (0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0),
    "J": (0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0),
    "K": (0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0),
    "L": (0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0),
    "M": (0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0),
    "N": (0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0),
    "O": (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0),
    "P": (0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0),
    "Q": (0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0),
    "R": (0, 0, 1, 1, 3, 0, 0, 0, 0, 0, 0),
    "S": (0, 1, 1, 1, 3, 0, 0, 0, 0, 0, 0),
    "T": (1, 1, 1, 1, 3, 0, 0, 0, 0, 0, 0),
}


def table3_config(row: str) -> dict:
    """RepSO keyword arguments for a row of Table 3 ("A".."T"); row T is the default RepSO."""
    if row not in _TABLE3_ROWS:
        raise ValueError(f"Table 3 row must be one of {sorted(_TABLE3_ROWS)}, got {row!r}")
    counts = dict(zip(TABLE3_COLUMNS, _TABLE3_ROWS[row]))
    cfg = {
        "identity": bool(counts.pop("identity")),
        "n1x1": counts.pop((1, 1)),
        "n1x3": counts.pop((1, 3)),
        "n3x1": counts.pop((3, 1)),
        "n3x3": counts.pop((3, 3)),
    }
    cfg["extra"] = {size: n for size, n in counts.items() if n}
    return cfg


TABLE3_CONFIGS = {row: table3_config(row) for row in _TABLE3_ROWS}


def _branch(channels: int, kh: int, kw: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, (kh, kw), stride, (kh // 2, kw // 2), groups=channels, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels)))


class RepSO(nn.Module):
    """Multi-branch depthwise spatial operator; `reparameterize()` makes it one DW conv + bias.

    Row A of Table 3 (no branch at all) is the identity map, as Table 2 row A (90.38%) shows.
    ``extra`` adds branches of other odd sizes: {(kh, kw): count}, e.g. {(5, 5): 1}.
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        n3x3: int = 3,
        n1x3: int = 1,
        n3x1: int = 1,
        n1x1: int = 1,
        identity: bool = True,
        extra: Optional[dict] = None,
        activation: str = "none",
        one_conv_training: Union[bool, str] = "auto",
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"RepSO stride must be 1 or 2, got {stride}")
        if one_conv_training not in (True, False, "auto"):
            raise ValueError(f"one_conv_training must be True, False or 'auto', got {one_conv_training!r}")
        # SPEC 3a: the training forward as one conv, exact (docs/repso_training.md); False runs
        # the seven-branch sum, the reference it is tested against. "auto": the one conv when the
        # folded kernel is 3x3 (every K = 3 row of Table 3: 1.25-7.9x faster on the CPU), the
        # branch sum for rows with 5x5 / 7x7 branches, whose statistics kernels are slower than
        # the branches themselves (CPU, 256@28: 0.15-0.68x; docs/repso_training.md).
        self.one_conv_training = one_conv_training
        if identity and stride != 1:
            raise ValueError("RepSO identity branch needs stride 1 (identity=True with stride 2)")
        sizes = [(3, 3)] * n3x3 + [(1, 3)] * n1x3 + [(3, 1)] * n3x1 + [(1, 1)] * n1x1
        for size, count in (extra or {}).items():
            kh, kw = size
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"RepSO branch kernels must have odd sizes, got {size}")
            sizes += [(kh, kw)] * count
        self.channels, self.stride = channels, stride
        self.activation = check_activation(activation)
        self.branches = nn.ModuleList(_branch(channels, kh, kw, stride) for kh, kw in sizes)
        self.identity_bn = nn.BatchNorm2d(channels) if identity else None
        # size of the folded kernel: the largest branch extent in each direction
        self.kernel_size = (max([kh for kh, _ in sizes] or [1]), max([kw for _, kw in sizes] or [1]))
        self.reparam_conv: Optional[nn.Conv2d] = None

    @property
    def deployed(self) -> bool:
        return self.reparam_conv is not None

    @property
    def is_identity(self) -> bool:
        return len(self.branches) == 0 and self.identity_bn is None and self.reparam_conv is None

    def _train_forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        one_conv = self.one_conv_training
        if one_conv == "auto":
            one_conv = self.kernel_size == (3, 3)
        bns = [b.bn for b in self.branches] + ([self.identity_bn] if self.identity_bn is not None else [])
        if one_conv and self.stride == 1 and len(self.branches) > 0 and not any(needs_sync(bn) for bn in bns):
            return repso_train_forward(
                x, [b.conv.weight for b in self.branches], [b.bn for b in self.branches], self.identity_bn,
                activation=activation,
            )
        out = x if self.is_identity else 0
        for branch in self.branches:
            out = out + branch(x)
        if self.identity_bn is not None:
            out = out + self.identity_bn(x)
        return apply_activation(out, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"RepSO expects x of shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        conv = self.reparam_conv
        if conv is None:
            return self._train_forward(x, self.activation)
        if conv.kernel_size == (3, 3):
            fused, after = split_for_fusion(self.activation)
            return apply_activation(dw_conv3x3(x, conv.weight, conv.bias, self.stride, fused), after)
        return apply_activation(conv(x), self.activation)

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (C, 1, kh, kw), bias (C,)), float64, of the one DW conv equal to the eval-mode branches."""
        kh, kw = self.kernel_size
        ref = self.identity_bn.running_mean if self.identity_bn is not None else self.branches[0].conv.weight
        weight = ref.new_zeros(self.channels, 1, kh, kw, dtype=FOLD_DTYPE)
        bias = ref.new_zeros(self.channels, dtype=FOLD_DTYPE)
        for branch in self.branches:
            w, b = fold_conv_bn(branch.conv.weight, None, branch.bn)
            weight += pad_kernel(w, kh, kw)
            bias += b
        if self.identity_bn is not None:
            w, b = fold_conv_bn(identity_kernel(self.channels, kh, kw, ref), None, self.identity_bn)
            weight += w
            bias += b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every branch into one DW conv with bias, in place; a second call does nothing."""
        if self.reparam_conv is not None or self.is_identity:
            return
        dtype = (self.identity_bn.weight if self.identity_bn is not None else self.branches[0].conv.weight).dtype
        weight, bias = self.fused_kernel()
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.channels, self.channels, (kh, kw), self.stride, (kh // 2, kw // 2), groups=self.channels)
        conv = conv.to(device=weight.device, dtype=dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.branches = nn.ModuleList()
        self.identity_bn = None
        self.reparam_conv = conv

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, kernel_size={self.kernel_size}, activation={self.activation!r}"
