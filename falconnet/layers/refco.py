"""RefCO: the re-parameterized factorized channel operator (paper 3.4.3, SPEC section 4).

Training: M parallel 1st-stage SF-Conv branches (each with its own BN over the C_in/r hidden
channels) summed into H, then M parallel 2nd-stage branches (each with its own BN over C_out)
summed into y. Inference: one SFConv2d with bias (`reparameterize()`). By default the training
form runs as one or two fused SF-Conv calls with every BatchNorm folded from its batch statistics,
exactly (refco_train.py); `fused_training=False` runs the branches below.

All M branches of a stage run as ONE grouped 1x1 conv: branch b's weights sit side by side in
the grouped conv's output channels, and the M per-branch BatchNorms are one BatchNorm2d over
M*channels (per-channel statistics are independent, so this is exactly M separate BNs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activation import apply_activation, check_activation
from .fold import FOLD_DTYPE, bn_scale_shift
from .refco_train import fused_path_applies, refco_train_forward
from .sf_conv import SFConv2d, check_sf_config, choose_k


class RefCO(nn.Module):
    """RefCO(in, out, branches=M, r, k, bn) -> act(y) [+ residual]; deploys to one SFConv2d.

    weight1: (M, G, c_h, k), weight2: (M, c_h, m, G) - branch b is SFConv2d(weight1[b], weight2[b]).
    bn1: BatchNorm2d(M*G*c_h), channel b*G*c_h + g*c_h + j is branch b's hidden value H_b[g, j].
    bn2: BatchNorm2d(M*C_out), channel b*C_out + o is branch b's output channel o.
    After reparameterize(): self.sf (an SFConv2d with bias and the activation) replaces them all.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        branches: int = 3,
        r: int = 1,
        k: Optional[int] = None,
        bn: bool = True,
        activation: str = "none",
        fused_training: bool = True,
    ):
        super().__init__()
        if branches < 1:
            raise ValueError(f"RefCO branches must be >= 1, got {branches}")
        if not isinstance(fused_training, bool):
            raise ValueError(f"fused_training must be True or False, got {fused_training!r}")
        # True: the undeployed forward as one or two fused SF-Conv calls with the BatchNorms folded from
        # their statistics, exact (refco_train.py), wherever refco_train.fused_path_applies;
        # False: the branch form, the reference it is tested against.
        self.fused_training = fused_training
        if k is None:
            k = choose_k(in_channels, out_channels, r)
        check_sf_config(in_channels, out_channels, r, k)
        self.in_channels, self.out_channels, self.r, self.k = in_channels, out_channels, r, k
        self.num_branches = branches
        self.activation = check_activation(activation)
        G, c_h = in_channels // k, k // r
        m = out_channels // c_h
        self.groups, self.hidden, self.multiplier = G, c_h, m
        # Each branch is initialised like a stand-alone SFConv2d (documented there).
        init = [SFConv2d(in_channels, out_channels, r, k) for _ in range(branches)]
        self.weight1 = nn.Parameter(torch.stack([s.weight1.detach() for s in init]))
        self.weight2 = nn.Parameter(torch.stack([s.weight2.detach() for s in init]))
        self.bn1 = nn.BatchNorm2d(branches * G * c_h) if bn else None
        self.bn2 = nn.BatchNorm2d(branches * out_channels) if bn else None
        self.sf: Optional[SFConv2d] = None

    @property
    def deployed(self) -> bool:
        return self.sf is not None

    def _branch_forward(self, x: torch.Tensor) -> torch.Tensor:
        M, G, c_h, m = self.num_branches, self.groups, self.hidden, self.multiplier
        N, _, H, W = x.shape
        # stage 1: groups=G; output channel g*M*c_h + b*c_h + j = sum_i weight1[b, g, j, i] x[g*k+i]
        w1 = self.weight1.permute(1, 0, 2, 3).reshape(G * M * c_h, self.k, 1, 1)
        h = F.conv2d(x, w1, groups=G).view(N, G, M, c_h, H, W).transpose(1, 2)  # (N, M, G, c_h)
        if self.bn1 is not None:
            h = self.bn1(h.reshape(N, M * G * c_h, H, W)).view(N, M, G, c_h, H, W)
        hidden = h.sum(1)  # (N, G, c_h, H, W): H[g, j]
        # stage 2: shuffle to (j, g), then groups=c_h; output channel j*M*m + b*m + t
        shuffled = hidden.transpose(1, 2).reshape(N, c_h * G, H, W)
        w2 = self.weight2.permute(1, 0, 2, 3).reshape(c_h * M * m, G, 1, 1)
        y = F.conv2d(shuffled, w2, groups=c_h).view(N, c_h, M, m, H, W).transpose(1, 2)  # (N, M, c_h, m)
        y = y.reshape(N, M * self.out_channels, H, W)
        if self.bn2 is not None:
            y = self.bn2(y)
        return y.view(N, M, self.out_channels, H, W).sum(1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sf is not None:
            return self.sf(x, residual)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RefCO expects x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.fused_training and fused_path_applies(x, (self.bn1, self.bn2)):
            return refco_train_forward(x, self.weight1, self.weight2, self.bn1, self.bn2, self.activation, residual)
        y = apply_activation(self._branch_forward(x), self.activation)
        return y if residual is None else y + residual

    @torch.no_grad()
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, bias), float64, of the single SF-Conv equal to the eval-mode branches."""
        M, G, c_h, m = self.num_branches, self.groups, self.hidden, self.multiplier
        w1, w2 = self.weight1.to(FOLD_DTYPE), self.weight2.to(FOLD_DTYPE)
        hidden_bias = w1.new_zeros(G, c_h)
        bias = w1.new_zeros(self.out_channels)
        if self.bn1 is not None:
            s1, o1 = bn_scale_shift(self.bn1)
            w1 = w1 * s1.view(M, G, c_h, 1)
            hidden_bias = o1.view(M, G, c_h).sum(0)
        if self.bn2 is not None:
            s2, o2 = bn_scale_shift(self.bn2)
            w2 = w2 * s2.view(M, c_h, m, 1)
            bias = o2.view(M, self.out_channels).sum(0)
        w1, w2 = w1.sum(0), w2.sum(0)
        # A constant hidden value H[g, j] = hidden_bias[g, j] reaches output j*m+t through w2[j, t, g].
        bias = bias + torch.einsum("jtg,gj->jt", w2, hidden_bias).reshape(self.out_channels)
        return w1, w2, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one SFConv2d with bias, in place; a second call does nothing."""
        if self.sf is not None:
            return
        dtype = self.weight1.dtype
        w1, w2, bias = self.fused_weights()
        sf = SFConv2d(self.in_channels, self.out_channels, self.r, self.k, bias=True, activation=self.activation)
        sf = sf.to(device=w1.device, dtype=dtype)
        sf.weight1.copy_(w1)
        sf.weight2.copy_(w2)
        sf.bias.copy_(bias)
        del self.weight1, self.weight2
        self.bn1 = self.bn2 = None
        self.sf = sf

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, branches={self.num_branches}, r={self.r}, k={self.k}, "
            f"activation={self.activation!r}, fused_training={self.fused_training}, deployed={self.deployed}"
        )
