"""Fused kernels for FalconNet: the SF-Conv pair and the folded RepSO depthwise 3x3 conv.

``sf_conv`` and ``dw_conv3x3`` call the custom ops torch.ops.falconnet.*, which run on the
C++ (CPU), CUDA C++ or Triton kernels, or on the pure-PyTorch references in ``reference``.
"""
from . import _backend
from .ops import dw_conv3x3, dw_conv3x3_macs, sf_conv, sf_conv_macs
from .reference import dw_conv3x3_ref, sf_conv_dense_weight, sf_conv_ref

__all__ = [
    "sf_conv",
    "dw_conv3x3",
    "sf_conv_ref",
    "dw_conv3x3_ref",
    "sf_conv_dense_weight",
    "sf_conv_macs",
    "dw_conv3x3_macs",
    "kernels_info",
    "backend_for",
]


def kernels_info() -> dict:
    """Which backends are built and which one runs each op on each device."""
    return _backend.info()


def backend_for(op: str, device="cpu", pass_: str = "forward") -> str:
    """The backend ('cpp', 'cuda', 'triton' or 'torch') that runs `op`'s forward or backward
    pass on `device` now."""
    import torch

    return _backend.select(op, torch.device(device), pass_)
