"""SFConv2d: the Sparsely Factorized Conv of paper 3.4.2, as SPEC section 4 reconstructs it.

weight1 (G, c_h, k): G = C_in/k windows of k channels, each to c_h = k/r hidden values.
weight2 (c_h, m, G): for each hidden channel j, m = C_out/c_h outputs over all G windows.
The forward is the fused op falconnet_kernels.sf_conv (reference path on CPU until the kernels
land); the dense equivalent is falconnet_kernels.sf_conv_dense_weight. Neither is restated here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from falconnet_kernels import sf_conv, sf_conv_dense_weight

from .activation import apply_activation, check_activation, split_for_fusion


def check_sf_config(in_channels: int, out_channels: int, r: int, k: int) -> None:
    """Raise ValueError naming the violated SF-Conv constraint."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("r", r), ("k", k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"SF-Conv {name} must be a positive integer, got {v!r}")
    if in_channels % k:
        raise ValueError(f"SF-Conv needs k to divide C_in: k={k} does not divide in_channels={in_channels}")
    if k % r:
        raise ValueError(f"SF-Conv needs r to divide k: r={r} does not divide k={k}")
    c_h = k // r
    if out_channels % c_h:
        raise ValueError(
            f"SF-Conv needs c_h = k/r to divide C_out: c_h={c_h} (k={k}, r={r}) does not divide out_channels={out_channels}"
        )


def sf_conv_params(in_channels: int, out_channels: int, r: int, k: int) -> int:
    """Weights of one SF-Conv: C_in*k/r (1st) + C_in*C_out/k (2nd)."""
    return in_channels * k // r + in_channels * out_channels // k


def choose_k(in_channels: int, out_channels: int, r: int = 1) -> int:
    """The valid k nearest sqrt(r*C_out), where the parameter count is least.

    Valid: k divides C_in, r divides k, k/r divides C_out. Ties in |k - sqrt(r*C_out)| go to the
    k with fewer parameters, then to the smaller k (deterministic).
    """
    target = math.sqrt(r * out_channels)
    valid = [
        k for k in range(r, in_channels + 1, r) if in_channels % k == 0 and out_channels % (k // r) == 0
    ]
    if not valid:
        raise ValueError(
            f"no valid SF-Conv k for in_channels={in_channels}, out_channels={out_channels}, r={r}: "
            "k must divide C_in, r must divide k and k/r must divide C_out"
        )
    return min(valid, key=lambda k: (abs(k - target), sf_conv_params(in_channels, out_channels, r, k), k))


class SFConv2d(nn.Module):
    """SF-Conv as a 1x1-conv replacement: y = act(SF(x) + bias) + residual.

    Init (the paper only says "Xavier"): weight1 is uniform with variance 1/k, so each hidden
    value keeps the input's scale; weight2 is uniform with variance 2k/(C_in + C_out), so each
    entry of the dense equivalent W2*W1 has variance 2/(C_in + C_out), Xavier's value for the
    dense 1x1 conv it replaces, and the output variance matches that conv's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        r: int = 1,
        k: Optional[int] = None,
        bias: bool = False,
        activation: str = "none",
    ):
        super().__init__()
        if k is None:
            k = choose_k(in_channels, out_channels, r)
        check_sf_config(in_channels, out_channels, r, k)
        self.in_channels, self.out_channels, self.r, self.k = in_channels, out_channels, r, k
        self.groups = in_channels // k  # G
        self.hidden = k // r  # c_h
        self.multiplier = out_channels // self.hidden  # m
        self.activation = check_activation(activation)
        self.weight1 = nn.Parameter(torch.empty(self.groups, self.hidden, k))
        self.weight2 = nn.Parameter(torch.empty(self.hidden, self.multiplier, self.groups))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound1 = math.sqrt(3.0 / self.k)
        bound2 = math.sqrt(3.0 * 2.0 * self.k / (self.in_channels + self.out_channels))
        self.weight1.uniform_(-bound1, bound1)
        self.weight2.uniform_(-bound2, bound2)
        if self.bias is not None:
            self.bias.zero_()

    def dense_weight(self) -> torch.Tensor:
        """The equivalent (C_out, C_in) matrix of a dense 1x1 conv."""
        return sf_conv_dense_weight(self.weight1, self.weight2)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        fused, after = split_for_fusion(self.activation)
        if after == "none":
            return sf_conv(x, self.weight1, self.weight2, self.bias, residual, fused)
        y = apply_activation(sf_conv(x, self.weight1, self.weight2, self.bias, None, "none"), after)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, r={self.r}, k={self.k}, G={self.groups}, "
            f"c_h={self.hidden}, m={self.multiplier}, bias={self.bias is not None}, activation={self.activation!r}"
        )
