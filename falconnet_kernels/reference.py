"""Pure-PyTorch references for the fused ops: the definition every backend is tested against.

The layouts of the weights follow ../shared/SPEC.md section 4:

* ``w1`` has shape (G, c_h, k): G = C_in/k windows of k input channels, each mapped to c_h hidden
  values with its own (unshared) weights:  H[g, j] = sum_i w1[g, j, i] * x[g*k + i].
* ``w2`` has shape (c_h, m, G): a depthwise conv over H's G positions with width multiplier
  m = C_out/c_h:  y[j*m + t] = sum_g w2[j, t, g] * H[g, j].

Epilogue order of ``sf_conv``: y = act(z + bias) + residual, where z is the SF-Conv output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "relu6")


def out_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the ops give their outputs: channels_last for a 4-D channels_last x (one that is
    not also NCHW-contiguous, as 1x1 maps are), else NCHW."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.relu6(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, as a 0/1 mask (the derivative PyTorch's own relu and relu6 use)."""
    if activation == "none":
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sf_conv_shapes(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate the (x, w1, w2) triple; return (C_in, G, c_h, k, C_out). Errors name the argument."""
    if w1.dim() != 3:
        raise ValueError(f"w1 must have shape (G, c_h, k), got {tuple(w1.shape)}")
    if w2.dim() != 3:
        raise ValueError(f"w2 must have shape (c_h, m, G), got {tuple(w2.shape)}")
    G, c_h, k = w1.shape
    if w2.shape[0] != c_h or w2.shape[2] != G:
        raise ValueError(
            f"w2 must have shape (c_h={c_h}, m, G={G}) to match w1 {tuple(w1.shape)}, got {tuple(w2.shape)}"
        )
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != G * k:
        raise ValueError(f"x must have C_in = G*k = {G * k} channels (w1 is {tuple(w1.shape)}), got {x.shape[1]}")
    return G * k, G, c_h, k, c_h * w2.shape[1]


def sf_conv_dense_weight(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The (C_out, C_in) matrix of the SF-Conv pair: W[j*m + t, g*k + i] = w2[j, t, g] * w1[g, j, i]."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    # (c_h, m, G, k) -> rows j*m+t, columns g*k+i
    return torch.einsum("jtg,gji->jtgi", w2, w1).reshape(c_h * m, G * k)


def sf_conv_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    """SF-Conv pair, written as two batched matmuls over the pixel dimension (no loop over groups)."""
    C_in, G, c_h, k, C_out = sf_conv_shapes(x, w1, w2)
    check_activation(activation)
    N, _, H, W = x.shape
    xs = x.permute(0, 2, 3, 1).reshape(-1, G, k)  # (P, G, k)
    hidden = torch.einsum("pgi,gji->pgj", xs, w1)  # (P, G, c_h)
    z = torch.einsum("pgj,jtg->pjt", hidden, w2).reshape(N, H, W, C_out)  # (P, c_h, m) -> channels j*m+t
    z = z.permute(0, 3, 1, 2)
    if bias is not None:
        z = z + bias.view(1, -1, 1, 1)
    y = apply_activation(z, activation)
    if residual is not None:
        y = y + residual
    return y


def dw_conv3x3_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int = 1,
    activation: str = "none",
) -> torch.Tensor:
    """Depthwise 3x3 conv, padding 1, stride 1 or 2, with bias and activation: the folded RepSO."""
    check_activation(activation)
    C = x.shape[1]
    y = F.conv2d(x, weight, bias, stride=stride, padding=1, groups=C)
    return apply_activation(y, activation)


def sf_conv_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sf_conv_ref w.r.t. (x, w1, w2, bias), written out (no autograd needed).

    The residual's gradient is grad_y itself and is not returned. grad_bias has shape (C_out,)
    whether or not bias is given.
    """
    C_in, G, c_h, k, C_out = sf_conv_shapes(x, w1, w2)
    check_activation(activation)
    N, _, H, W = x.shape
    m = C_out // c_h
    xs = x.permute(0, 2, 3, 1).reshape(-1, G, k)
    hidden = torch.einsum("pgi,gji->pgj", xs, w1)
    gz = grad_y.permute(0, 2, 3, 1).reshape(-1, c_h, m)
    if activation != "none":
        z = torch.einsum("pgj,jtg->pjt", hidden, w2)
        if bias is not None:
            z = z + bias.view(1, c_h, m)
        gz = gz * activation_grad(z, activation)
    grad_bias = gz.sum(0).reshape(C_out)
    grad_w2 = torch.einsum("pjt,pgj->jtg", gz, hidden)
    grad_hidden = torch.einsum("pjt,jtg->pgj", gz, w2)
    grad_w1 = torch.einsum("pgj,pgi->gji", grad_hidden, xs)
    grad_x = torch.einsum("pgj,gji->pgi", grad_hidden, w1).reshape(N, H, W, C_in).permute(0, 3, 1, 2)
    return grad_x, grad_w1, grad_w2, grad_bias


def dw_conv3x3_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of dw_conv3x3_ref w.r.t. (x, weight, bias); grad_bias has shape (C,) always."""
    check_activation(activation)
    C = x.shape[1]
    if activation != "none":
        z = F.conv2d(x, weight, bias, stride=stride, padding=1, groups=C)
        grad_y = grad_y * activation_grad(z, activation)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], C, [True, True, False]
    )
    return grad_x, grad_w, grad_y.sum(dim=(0, 2, 3))
