"""The public ops, torch.ops.falconnet.{sf_conv, dw_conv3x3} and their backward ops.

Each is a torch.library custom op with a fake kernel (torch.compile, torch.export), autograd and
a FLOP formula (torch.utils.flop_counter). The real kernel checks its inputs once, here, then
hands them to the backend chosen by _backend.select: C++ (CPU), CUDA C++, Triton or PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _backend
from . import reference as ref

# the dtypes the kernels take, per device type (other devices: the reference path, any dtype)
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _check_same(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.device != x.device:
        raise ValueError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have the same dtype as x ({x.dtype}), got {t.dtype}")


def _check_dtype(x: Tensor) -> None:
    allowed = SUPPORTED_DTYPES.get(x.device.type)
    if allowed is not None and x.dtype not in allowed:
        raise ValueError(f"x must have one of the dtypes {allowed} on {x.device.type}, got {x.dtype}")


_out_format = ref.out_format


def check_sf_conv(x, w1, w2, bias, residual, activation) -> tuple[int, int]:
    """Validate sf_conv's arguments; return (C_in, C_out)."""
    C_in, _, _, _, C_out = ref.sf_conv_shapes(x, w1, w2)
    ref.check_activation(activation)
    for name, t in (("w1", w1), ("w2", w2), ("bias", bias), ("residual", residual)):
        _check_same(name, t, x)
    _check_dtype(x)
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"bias must have shape ({C_out},), got {tuple(bias.shape)}")
    expected = (x.shape[0], C_out, x.shape[2], x.shape[3])
    if residual is not None and tuple(residual.shape) != expected:
        raise ValueError(f"residual must have the output's shape {expected}, got {tuple(residual.shape)}")
    return C_in, C_out


def check_dw_conv3x3(x, weight, bias, stride, activation) -> tuple[int, int, int]:
    """Validate dw_conv3x3's arguments; return (C, H_out, W_out)."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"weight must have shape ({C}, 1, 3, 3) for x with {C} channels, got {tuple(weight.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    ref.check_activation(activation)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_same(name, t, x)
    _check_dtype(x)
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
    return C, (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1


def _collapsible(x: Tensor) -> Tensor:
    """Kernels read NCHW-contiguous or channels_last tensors; anything else is copied once."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


_REFERENCE = {
    ("sf_conv", "forward"): ref.sf_conv_ref,
    ("sf_conv", "backward"): ref.sf_conv_backward_ref,
    ("dw_conv3x3", "forward"): ref.dw_conv3x3_ref,
    ("dw_conv3x3", "backward"): ref.dw_conv3x3_backward_ref,
}


def _run(op: str, pass_: str, x: Tensor, *args):
    """Call `op`'s `pass_` on the backend _backend.select picks for x's device."""
    backend = _backend.select(op, x.device, pass_)
    if backend in ("cpp", "cuda"):
        out = getattr(torch.ops.falconnet_C, f"{op}_{pass_}")(*args)
    elif backend == "triton":
        if op == "sf_conv":
            from . import triton_sf_conv as module
            from . import triton_sf_gemm

            w2 = args[2] if pass_ == "forward" else args[3]  # (c_h, m, G); see the callers below
            C_in, C_out = x.shape[1], w2.shape[0] * w2.shape[1]
            if triton_sf_gemm.routed(C_in, C_out, pass_, x.dtype):
                module = triton_sf_gemm  # the composed-weight GEMM form where it was measured faster
        else:
            from . import triton_dw_conv3x3 as module
        out = getattr(module, f"{op}_{pass_}")(*args)
    else:
        out = _REFERENCE[(op, pass_)](*args)
    # The fake kernels promise x's memory format for y and grad_x; a no-op for the kernels.
    if pass_ == "forward":
        return out.contiguous(memory_format=_out_format(x))
    return (out[0].contiguous(memory_format=_out_format(x)), *out[1:])


# ---------------------------------------------------------------------------------------------
# sf_conv


@torch.library.custom_op("falconnet::sf_conv", mutates_args=())
def sf_conv_op(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str
) -> Tensor:
    check_sf_conv(x, w1, w2, bias, residual, activation)
    x = _collapsible(x)
    residual = None if residual is None else _collapsible(residual)
    w1, w2 = w1.contiguous(), w2.contiguous()
    return _run("sf_conv", "forward", x, x, w1, w2, bias, residual, activation)


@sf_conv_op.register_fake
def _(x, w1, w2, bias, residual, activation):
    _, C_out = check_sf_conv(x, w1, w2, bias, residual, activation)
    shape = (x.shape[0], C_out, x.shape[2], x.shape[3])
    return x.new_empty(shape).contiguous(memory_format=_out_format(x))


@torch.library.custom_op("falconnet::sf_conv_backward", mutates_args=())
def sf_conv_backward_op(
    grad_y: Tensor, x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, grad_y = _collapsible(x), _collapsible(grad_y)
    w1, w2 = w1.contiguous(), w2.contiguous()
    return tuple(_run("sf_conv", "backward", x, grad_y, x, w1, w2, bias, activation))


@sf_conv_backward_op.register_fake
def _(grad_y, x, w1, w2, bias, activation):
    C_out = w2.shape[0] * w2.shape[1]
    return (
        x.new_empty(x.shape).contiguous(memory_format=_out_format(x)),
        w1.new_empty(w1.shape),
        w2.new_empty(w2.shape),
        w2.new_empty((C_out,)),
    )


def _sf_setup(ctx, inputs, output):
    x, w1, w2, bias, residual, activation = inputs
    ctx.save_for_backward(x, w1, w2, bias)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def differentiable_grads(ctx, grad_y, inputs, forward) -> list:
    """For a backward run with create_graph=True (double backward: gradient penalties, Hessian
    products): the gradients of forward(*inputs) for the tensors in inputs that ctx needs (None
    for the others), by autograd through forward, a pure-PyTorch form of the same function, so a
    second backward gets every term. A fused kernel's results would be constants to it: a
    silently partial second derivative. Used by the ops here and the training nodes of
    falconnet/layers (ConvBN's BatchNorm + activation, RepSO's one conv)."""
    wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        found = torch.autograd.grad(forward(*inputs), [t for _, t in wanted], grad_y, create_graph=True)
    out = [None] * len(inputs)
    for (i, _), g in zip(wanted, found, strict=True):
        out[i] = g
    return out


def _sf_backward(ctx, grad_y):
    x, w1, w2, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        gx, gw1, gw2, gb = differentiable_grads(
            ctx, grad_y, (x, w1, w2, bias), lambda *t: ref.sf_conv_ref(*t, None, ctx.activation))
        return gx, gw1, gw2, gb, grad_y if ctx.has_residual else None, None
    gx, gw1, gw2, gb = torch.ops.falconnet.sf_conv_backward(grad_y, x, w1, w2, bias, ctx.activation)
    return gx, gw1, gw2, gb if ctx.has_bias else None, grad_y if ctx.has_residual else None, None


sf_conv_op.register_autograd(_sf_backward, setup_context=_sf_setup)


def sf_conv_macs(x_shape, w1_shape, w2_shape) -> int:
    """Multiply-accumulates of one SF-Conv pair: P * (G*c_h*k + c_h*m*G) for P pixels."""
    N, _, H, W = x_shape
    G, c_h, k = w1_shape
    m = w2_shape[1]
    return N * H * W * (G * c_h * k + c_h * m * G)


@register_flop_formula(torch.ops.falconnet.sf_conv)
def _(x_shape, w1_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sf_conv_macs(x_shape, w1_shape, w2_shape)


@register_flop_formula(torch.ops.falconnet.sf_conv_backward)
def _(grad_shape, x_shape, w1_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    # grad_x and the two weight gradients: twice the forward, as for any linear layer
    return 4 * sf_conv_macs(x_shape, w1_shape, w2_shape)


# ---------------------------------------------------------------------------------------------
# dw_conv3x3


@torch.library.custom_op("falconnet::dw_conv3x3", mutates_args=())
def dw_conv3x3_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, activation: str) -> Tensor:
    check_dw_conv3x3(x, weight, bias, stride, activation)
    x = _collapsible(x)
    weight = weight.contiguous()
    return _run("dw_conv3x3", "forward", x, x, weight, bias, stride, activation)


@dw_conv3x3_op.register_fake
def _(x, weight, bias, stride, activation):
    C, Ho, Wo = check_dw_conv3x3(x, weight, bias, stride, activation)
    return x.new_empty((x.shape[0], C, Ho, Wo)).contiguous(memory_format=_out_format(x))


@torch.library.custom_op("falconnet::dw_conv3x3_backward", mutates_args=())
def dw_conv3x3_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    x, grad_y = _collapsible(x), _collapsible(grad_y)
    weight = weight.contiguous()
    return tuple(_run("dw_conv3x3", "backward", x, grad_y, x, weight, bias, stride, activation))


@dw_conv3x3_backward_op.register_fake
def _(grad_y, x, weight, bias, stride, activation):
    return (
        x.new_empty(x.shape).contiguous(memory_format=_out_format(x)),
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0],)),
    )


def _dw_setup(ctx, inputs, output):
    x, weight, bias, stride, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.stride, ctx.activation, ctx.has_bias = stride, activation, bias is not None


def _dw_backward(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        gx, gw, gb = differentiable_grads(
            ctx, grad_y, (x, weight, bias), lambda *t: ref.dw_conv3x3_ref(*t, ctx.stride, ctx.activation))
        return gx, gw, gb, None, None
    gx, gw, gb = torch.ops.falconnet.dw_conv3x3_backward(grad_y, x, weight, bias, ctx.stride, ctx.activation)
    return gx, gw, gb if ctx.has_bias else None, None, None


dw_conv3x3_op.register_autograd(_dw_backward, setup_context=_dw_setup)


def dw_conv3x3_macs(out_shape) -> int:
    N, C, Ho, Wo = out_shape
    return 9 * N * C * Ho * Wo


@register_flop_formula(torch.ops.falconnet.dw_conv3x3)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dw_conv3x3_macs(out_shape)


@register_flop_formula(torch.ops.falconnet.dw_conv3x3_backward)
def _(grad_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * dw_conv3x3_macs(grad_shape)


# ---------------------------------------------------------------------------------------------
# The Python face: what the layers call.


def _autocast_on(x: Tensor) -> bool:
    return x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the ops compute x in: autocast's where it is on (as nn.Conv2d does), else x's."""
    return torch.get_autocast_dtype(x.device.type) if _autocast_on(x) else x.dtype


def _autocast(*tensors):
    """Under torch.autocast the ops compute in the autocast dtype, as nn.Conv2d does."""
    if not _autocast_on(tensors[0]):
        return tensors
    dtype = compute_dtype(tensors[0])
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def sf_conv(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: str = "none",
) -> Tensor:
    """Fused SF-Conv pair: act(sf(x; w1, w2) + bias) + residual. See reference.sf_conv_ref."""
    x, w1, w2, bias, residual = _autocast(x, w1, w2, bias, residual)
    return torch.ops.falconnet.sf_conv(x, w1, w2, bias, residual, activation)


def dw_conv3x3(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1, activation: str = "none"
) -> Tensor:
    """Fused depthwise 3x3 conv (padding 1, stride 1 or 2) with bias and activation."""
    x, weight, bias = _autocast(x, weight, bias)
    return torch.ops.falconnet.dw_conv3x3(x, weight, bias, stride, activation)
