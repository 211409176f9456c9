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
    on a CPU cost more than the clamp itself at 56x56 maps; their backward needs only the result)."""
    if name == "none":
        return x
    if name == "relu":
        return F.relu(x, inplace=inplace)
    if name == "relu6":
        return F.relu6(x, inplace=inplace)
    if name in _UNFUSED:  # out of place: their backward needs the input
        return _UNFUSED[name](x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


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
