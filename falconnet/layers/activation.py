"""Activation by name, and which names the fused kernels' epilogues can apply.

The paper lost its activation. LightNet uses ReLU6 by default (MobileNetV2's choice, the IRB
block Table 1 builds on); "relu6", "relu" and "none" are fused into the sf_conv / dw_conv3x3
epilogues, "gelu", "silu" and "hardswish" run as a separate PyTorch op after them.
"""
from __future__ import annotations

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


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.relu6(x)
    if name in _UNFUSED:
        return _UNFUSED[name](x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def split_for_fusion(name: str) -> tuple[str, str]:
    """(activation the fused op applies, activation applied after it)."""
    return (name, "none") if is_fused(name) else ("none", name)
