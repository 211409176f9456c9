"""The C++ BatchNorm + activation training kernels (csrc/cpu/bn_act.cpp), which ConvBN's training
node calls (falconnet/layers/conv_bn.py): against F.batch_norm + the activation in float64, on
channel counts that use the vector loop, its tail, or both."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import falconnet_kernels  # noqa: F401  (loads the extension)

ACTS = {"relu6": F.relu6, "relu": F.relu, "none": lambda t: t}


def ops():
    return torch.ops.falconnet_C


def reference(x, weight, bias, activation, grad):
    """F.batch_norm (batch statistics) then the activation, in float64: y, grad_x, grad_w, grad_b."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    y = ACTS[activation](F.batch_norm(xd, None, None, wd, bd, True, 0.1, 1e-5))
    inputs = [t for t in (xd, wd, bd) if t is not None]
    grads = list(torch.autograd.grad(y, inputs, grad.double()))
    gx = grads.pop(0)
    gw = grads.pop(0) if wd is not None else None
    gb = grads.pop(0) if bd is not None else None
    return y.detach(), gx, gw, gb


def pytorch_error(x, weight, bias, activation, grad, ref):
    """The same computation by PyTorch in x's dtype, its largest error against ref (per output)."""
    x = x.detach().requires_grad_()
    w = None if weight is None else weight.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    y = ACTS[activation](F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))
    inputs = [t for t in (x, w, b) if t is not None]
    out = [y.detach(), *torch.autograd.grad(y, inputs, grad)]
    return [(o.double() - r).abs().max().item() for o, r in zip(out, [t for t in ref if t is not None], strict=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [7, 32, 37])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("affine", [True, False])
def test_bn_act_matches_batchnorm_then_activation(dtype, C, activation, affine):
    """Outputs, grad_x, grad_weight and grad_bias: float64 to ~1e-12 of the float64 reference,
    float32 within 3x PyTorch's own float32 error plus a few ulp. The inputs have a mean far from
    zero (the statistics must not cancel it away) and values on both sides of 0 and 6."""
    torch.manual_seed(C)
    x = (torch.randn(3, C, 5, 7, dtype=torch.float64) * 3 + 40).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(C, dtype=torch.float64) * 4 + 0.5).to(dtype) if affine else None
    bias = torch.randn(C, dtype=torch.float64).to(dtype) if affine else None
    grad = torch.randn(x.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = reference(x, weight, bias, activation, grad)
    if activation == "relu6" and affine:  # (unit-variance outputs without the affine map stay below 6)
        assert ((ref[0] > 0) & (ref[0] < 6)).any() and (ref[0] == 0).any() and (ref[0] == 6).any()
    y, mean, invstd = ops().bn_act_forward(x, weight, bias, 1e-5, activation)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    gx, gw, gb = ops().bn_act_backward(grad, x, weight, bias, mean, invstd, activation, True)
    assert (gw is None) == (gb is None) == (not affine)
    ours = [t for t in (y, gx, gw, gb) if t is not None]
    refs = [t for t in ref if t is not None]
    errors = [(a.double() - b).abs().max().item() for a, b in zip(ours, refs, strict=True)]
    sizes = [max(1.0, b.abs().max().item()) for b in refs]
    # the statistics themselves, against float64's
    xd = x.double()
    assert torch.allclose(mean, xd.mean((0, 2, 3)), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    if dtype == torch.float64:
        assert all(e <= 1e-12 * s for e, s in zip(errors, sizes, strict=True)), errors
    else:
        theirs = pytorch_error(x, weight, bias, activation, grad, ref)
        ulp = torch.finfo(dtype).eps
        assert all(e <= 3 * t + 8 * ulp * s for e, t, s in zip(errors, theirs, sizes, strict=True)), (errors, theirs)


def test_bn_act_backward_without_grad_x_and_small_batches():
    """need_x=False leaves grad_x undefined and the parameter gradients unchanged; 2 values per
    channel (batch 2 of 1x1 images), where BatchNorm is still defined."""
    x = torch.randn(2, 32, 1, 1, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(32, dtype=torch.float64) + 0.5, torch.randn(32, dtype=torch.float64)
    g = torch.randn_like(x)
    y, mean, invstd = ops().bn_act_forward(x, w, b, 1e-5, "relu")
    full = ops().bn_act_backward(g, x, w, b, mean, invstd, "relu", True)
    part = ops().bn_act_backward(g, x, w, b, mean, invstd, "relu", False)
    assert part[0] is None and torch.equal(part[1], full[1]) and torch.equal(part[2], full[2])
    ref = reference(x, w, b, "relu", g)
    for a, r in zip(full, ref[1:], strict=True):
        assert (a - r).abs().max() <= 1e-9 * max(1.0, r.abs().max().item())  # BN on 2 values: ~1/sqrt(eps) scale


def test_bn_act_rejects_bad_input():
    x = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="channels_last"):
        ops().bn_act_forward(torch.randn(2, 16, 3, 3), None, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops().bn_act_forward(x.bfloat16(), None, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops().bn_act_forward(torch.randn(1, 16, 1, 1), None, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match=r"weight must be \(16,\)"):
        ops().bn_act_forward(x, torch.ones(8), None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ops().bn_act_forward(x, None, None, 1e-5, "tanh")
    y, mean, invstd = ops().bn_act_forward(x, None, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="grad_y must match x"):
        ops().bn_act_backward(torch.randn(2, 16, 3, 4), x, None, None, mean, invstd, "relu", True)
