"""ConvBN: conv (no bias) + BatchNorm + activation, with an optional fused residual add.

`reparameterize()` folds the BN into the conv (which gains a bias). A deployed depthwise 3x3
ConvBN then runs on the fused dw_conv3x3 op with its activation in the epilogue.

Training on the CPU, BatchNorm (batch statistics) and relu / relu6 run as one autograd node
(_BatchNormAct): on the C++ kernels of csrc/cpu/bn_act.cpp for float32/float64 channels_last
input (3 passes over the activation forward and 5 backward, the activation's mask recomputed),
else on torch's native_batch_norm with the activation in place on its fresh output and the mask
from that output (bitwise what nn.BatchNorm2d + F.relu6 give). Either way the pre-activation
tensor is not kept for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from falconnet_kernels import _backend, dw_conv3x3
from falconnet_kernels.ops import differentiable_grads

from .activation import (
    DEFAULT_ACTIVATION,
    FUSED_ACTIVATIONS,
    activation_,
    activation_backward,
    add_residual,
    apply_activation,
    check_activation,
    split_for_fusion,
)
from .fold import fold_conv_bn
from .repso_train import bn_step_factor, update_running_stats


def _cpp_kernels(x: torch.Tensor) -> bool:
    """The C++ kernels of csrc/cpu/bn_act.cpp take float32/float64 channels_last x (the layout
    training runs in); other inputs take torch's native_batch_norm inside the same node."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous(memory_format=torch.channels_last)
        and _backend.select("bn_act", x.device) == "cpp"
    )


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x)) with batch statistics as one node, running statistics updated in place.

    On the C++ kernels (csrc/cpu/bn_act.cpp): 3 activation-sized passes forward, 5 backward (the
    mask recomputed from x, not read), against 5 and 8 for native_batch_norm + clamp + their
    backward; it saves x and the batch statistics. Otherwise torch's native_batch_norm, the
    activation in place on its output and, backward, the mask from that output (the kernels
    nn.BatchNorm2d + F.relu6 run, bitwise the same results); it saves x and the output (which the
    next layer keeps anyway). A backward with create_graph=True recomputes through F.batch_norm
    (falconnet_kernels.ops.differentiable_grads), so double backward is exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, activation):
        ctx.eps, ctx.activation = eps, activation
        ctx.cpp = _cpp_kernels(x)
        if ctx.cpp:
            y, mean, invstd = torch.ops.falconnet_C.bn_act_forward(x, weight, bias, eps, activation)
            update_running_stats(running_mean, running_var, mean, invstd.pow(-2) - eps, x.numel() // x.shape[1],
                                 momentum)
            ctx.save_for_backward(x, weight, bias, mean, invstd)
            return y
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        activation_(y, activation)
        ctx.save_for_backward(x, weight, bias, y, save_mean, save_invstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            x, weight, bias = ctx.saved_tensors[:3]
            grads = differentiable_grads(ctx, grad, (x, weight, bias), lambda x, w, b: apply_activation(
                F.batch_norm(x, None, None, w, b, True, 0.0, ctx.eps), ctx.activation))
            return (*grads, None, None, None, None, None)
        if ctx.cpp:
            x, weight, bias, mean, invstd = ctx.saved_tensors
            grad_x, grad_w, grad_b = torch.ops.falconnet_C.bn_act_backward(
                grad, x, weight, bias, mean, invstd, ctx.activation, need[0])
            return grad_x, grad_w, grad_b, None, None, None, None, None
        x, weight, bias, y, save_mean, save_invstd = ctx.saved_tensors
        grad = activation_backward(grad, y, ctx.activation)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, save_mean, save_invstd, True, ctx.eps, list(need[:3]))
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _use_bn_act_node(bn: nn.BatchNorm2d, x: torch.Tensor, activation: str) -> bool:
    """The fused node: a plain nn.BatchNorm2d (not SyncBatchNorm) in training mode, a fused
    activation, autograd recording, on the CPU (measured there, batch 16 at the hidden shapes:
    1.6-2x BN then F.relu6 on the C++ kernels, 1.1-1.3x on native_batch_norm;
    benchmarks/results/2026-11-26-cpu-5; on a GPU F.batch_norm takes cuDNN's kernels, which this
    node would not), not under CPU autocast (whose dtype rules F.batch_norm keeps) or
    torch.compile (which fuses BN and the clamp itself)."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and x.dim() == 4
        and x.numel() > x.shape[1]  # else nn.BatchNorm2d's own error (one value per channel) or empty batch
        and activation in FUSED_ACTIVATIONS
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(bn(x)), the BatchNorm in training mode, as one node where _use_bn_act_node
    allows (running statistics and num_batches_tracked updated as nn.BatchNorm2d updates them)."""
    if not _use_bn_act_node(bn, x, activation):
        return apply_activation(bn(x), activation, inplace=True)
    factor = bn_step_factor(bn)
    return _BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps, activation)


class ConvBN(nn.Module):
    """conv(kernel_size, stride, groups) -> BN -> activation [-> + residual].

    ``activation`` is "none" for a linear layer (projections, the stem's last DW conv).
    ``fused_training`` (default True): in training, BatchNorm + activation as one autograd node
    where _use_bn_act_node allows (a backward with create_graph=True recomputes through
    F.batch_norm, so double backward stays exact); False runs nn.BatchNorm2d then the activation.
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
        fused_training: bool = True,
    ):
        super().__init__()
        if not isinstance(fused_training, bool):
            raise ValueError(f"fused_training must be True or False, got {fused_training!r}")
        self.fused_training = fused_training
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
            if self.bn is not None and self.bn.training and self.fused_training:
                y = batch_norm_act(self.bn, y, self.activation)
            else:
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
