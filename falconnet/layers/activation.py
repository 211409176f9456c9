"""Activation by name, and which names the fused kernels' epilogues can apply.

The paper lost its activation. LightNet uses ReLU6 by default (MobileNetV2's choice, the IRB
block Table 1 builds on); "relu6", "relu" and "none" are fused into the sf_conv / dw_conv3x3
epilogues, "gelu", "silu" and "hardswish" run as a separate PyTorch op after them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from falconnet_kernels.reference import ACTIVATIONS as FUSED_ACTIVATIONS

_UNFUSED = {"gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish}
ACTIVATIONS = tuple(FUSED_ACTIVATIONS) + tuple(_UNFUSED)
DEFAULT_ACTIVATION = "relu6"


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def is_fused(name: str) -> bool:
    """True when the fused ops' epilogue can apply this activation itself."""
    return name in FUSED_ACTIVATIONS


def apply_activation(x: torch.Tensor, name: str, inplace: bool = False) -> torch.Tensor:
    """act(x); inplace=True lets relu / relu6 overwrite x (for a tensor the caller just created,
    such as a conv's output: it saves the allocation and the first touch of a fresh output, which
    on a CPU cost more than the clamp itself at 56x56 maps). Only where autograd does not record
    it: under autograd an in-place relu6 saves a clone of its input (torch 2.14: relu6_ ->
    hardtanh_ -> clone), one more pass and one more saved activation than out of place (BN +
    ReLU6 fwd+bwd at 16x128x56x56 on the CPU: 8.5 vs 7.8 ms)."""
    inplace = inplace and not (torch.is_grad_enabled() and x.requires_grad)
    if name == "none":
        return x
    if name == "relu":
        return F.relu(x, inplace=inplace)
    if name == "relu6":
        return F.relu6(x, inplace=inplace)
    if name in _UNFUSED:  # out of place: their backward needs the input
        return _UNFUSED[name](x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_(y: torch.Tensor, name: str) -> torch.Tensor:
    """A fused activation ("none", "relu", "relu6") applied in place, for the autograd nodes that
    apply it to their own fresh output (grad mode is off inside them); returns y."""
    if name == "relu":
        y.clamp_(min=0)
    elif name == "relu6":
        y.clamp_(0, 6)
    elif name != "none":
        raise ValueError(f"activation_ applies only {FUSED_ACTIVATIONS}, got {name!r}")
    return y


def activation_backward(grad: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient through a fused activation from its OUTPUT: relu passes it where out > 0,
    relu6 where 0 < out < 6; both are exactly where the input was in that range, so this equals
    the backward autograd derives from the input (F.relu / F.relu6: the same masks, the same
    kernels), and a node keeps only the output it shares with the next layer."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if name == "relu6":
        return torch.ops.aten.hardtanh_backward(grad, out, 0.0, 6.0)
    return grad


def add_residual(y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """y + residual, in place into y when autograd does not record it (y is then the caller's
    fresh output; under autograd the activation before may have saved y for its backward)."""
    if residual is None:
        return y
    recorded = torch.is_grad_enabled() and (y.requires_grad or residual.requires_grad)
    if recorded or residual.dtype != y.dtype or residual.shape != y.shape:  # y + residual's own rules
        return y + residual
    return y.add_(residual)


def split_for_fusion(name: str) -> tuple[str, str]:
    """(activation the fused op applies, activation applied after it)."""
    return (name, "none") if is_fused(name) else ("none", name)
