"""RepSO's training forward, exact, with one depthwise conv (SPEC 3a, docs/repso_training.md).

sum_b bn_b(conv_b(x)) + identity_bn(x) with training-mode BatchNorms equals one KxK depthwise conv
of x whose kernel and bias are folded from each branch's batch statistics. Those statistics come
from the K*K shifted means and the K*K x K*K shifted covariance of x (falconnet_kernels.repso_moments,
one pass over x): a branch with kernel k (embedded in KxK) has batch mean k.mean and biased
variance k^T cov k. Autograd runs through the fold into the branch weights and BN affine
parameters, and through the moments op into x, so every gradient is that of the seven-branch path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from falconnet_kernels.repso_moments import repso_moments, stats_dtype


def _window_size(weights: Sequence[Tensor]) -> int:
    K = 1
    for i, w in enumerate(weights):
        if w.dim() != 4 or w.shape[1] != 1 or w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0:
            raise ValueError(f"weights[{i}] must be a depthwise (C, 1, kh, kw) kernel with odd kh, kw, got {tuple(w.shape)}")
        K = max(K, w.shape[2], w.shape[3])
    return K


def _embed(weight: Tensor, K: int) -> Tensor:
    """(C, 1, kh, kw) -> (C, K*K): zero-padded to KxK around the same centre (the branch's padding
    (kh//2, kw//2) keeps its output aligned with a KxK conv of padding K//2)."""
    dh, dw = (K - weight.shape[2]) // 2, (K - weight.shape[3]) // 2
    return F.pad(weight, (dw, dw, dh, dh)).reshape(weight.shape[0], K * K)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    # nn.BatchNorm's own rule
    return bn.training or bn.running_mean is None


def _bn_update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update nn.BatchNorm2d makes in a training forward."""
    if not (bn.training and bn.track_running_stats):
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    if bn.running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _branch_moments(kernel: Tensor, mean_s: Tensor, cov_s: Tensor) -> tuple[Tensor, Tensor]:
    """Batch means and biased variances (B, C) of the branches with (B, C, K*K) kernels k:
    k.mean_s and k^T cov_s k.

    The quadratic form is one batched (K*K x K*K) @ (K*K x B) product per channel: einsum's path
    (B separate batched products of one row) or a broadcast (B, C, K*K, K*K) temporary each cost
    more than the whole conv on a CPU. The clamp: rounding can leave the variance of a
    (near-)constant branch slightly negative, where BatchNorm's is >= 0.
    """
    mean = (kernel * mean_s).sum(-1)
    k = kernel.permute(1, 2, 0)  # (C, K*K, B)
    var = (torch.bmm(cov_s, k) * k).sum(1).t().clamp_min(0)
    return mean, var


def _scale_shift(bn: nn.BatchNorm2d, mean: Optional[Tensor], var: Optional[Tensor], dtype) -> tuple[Tensor, Tensor]:
    """BN as y = scale * z + shift; batch statistics when given, else the running ones."""
    if mean is None:
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.to(dtype)
        return scale, bn.bias.to(dtype) - mean * scale
    return scale, -mean * scale


def _use_fused_dw_conv(x: Tensor, K: int, conv: str) -> bool:
    """Whether the one conv runs on falconnet_kernels.dw_conv3x3 (3x3 only) or on F.conv2d.

    "auto" picks F.conv2d on both devices, by forward+backward measurements at the hidden shapes:
    on the CPU oneDNN's depthwise conv beat the extension's 1.1-7.6x (docs/repso_training.md); on
    an H200 cuDNN's beat the Triton op 1.1-1.6x and the CUDA C++ op 2.4-11x
    (benchmarks/results/2026-11-26-h200/bench_gpu.md, "dw_conv3x3 fwd+bwd").
    """
    if K != 3 or conv == "torch":
        return False
    return conv == "falconnet"


def repso_train_forward(
    x: Tensor,
    weights: Sequence[Tensor],
    bns: Sequence[nn.BatchNorm2d],
    identity_bn: Optional[nn.BatchNorm2d] = None,
    conv: str = "auto",
) -> Tensor:
    """sum_b bns[b](conv2d(x, weights[b], padding=(kh//2, kw//2), groups=C)) + identity_bn(x), exactly,
    with one conv; BatchNorms in training mode use batch statistics and update their running
    statistics (and num_batches_tracked) in place, as nn.BatchNorm2d does. Stride 1.

    conv picks the one conv: "falconnet" (falconnet_kernels.dw_conv3x3, K = 3 only), "torch"
    (F.conv2d: cuDNN / oneDNN) or "auto" (see _use_fused_dw_conv).
    """
    if conv not in ("auto", "falconnet", "torch"):
        raise ValueError(f"conv must be 'auto', 'falconnet' or 'torch', got {conv!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if len(weights) != len(bns):
        raise ValueError(f"weights and bns must pair up, got {len(weights)} weights and {len(bns)} BatchNorms")
    N, C, H, W = x.shape
    for i, w in enumerate(weights):
        if w.shape[0] != C:
            raise ValueError(f"weights[{i}] must have {C} output channels (depthwise over x), got {tuple(w.shape)}")
    K = _window_size(weights)
    dtype = stats_dtype(x.dtype)
    kernels = [_embed(w.to(dtype), K) for w in weights]
    all_bns = list(bns)
    if identity_bn is not None:
        centre = torch.zeros(C, K * K, dtype=dtype, device=x.device)
        centre[:, (K * K) // 2] = 1
        kernels.append(centre)
        all_bns.append(identity_bn)

    count = N * H * W
    batch = [_uses_batch_stats(bn) for bn in all_bns]
    if any(batch):
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean_s, cov_s = repso_moments(x, K)  # (C, K*K), (C, K*K, K*K)

    # All branches at once: (B, C, K*K) kernels.
    stacked = torch.stack(kernels)
    if any(batch):
        means, variances = _branch_moments(stacked, mean_s, cov_s)  # (B, C) each
    scales, shifts = [], []
    for b, bn in enumerate(all_bns):
        if batch[b]:
            mean, var = means[b], variances[b]
            _bn_update_running(bn, mean.detach(), var.detach(), count)
            scale, shift = _scale_shift(bn, mean, var, dtype)
        else:
            scale, shift = _scale_shift(bn, None, None, dtype)
        scales.append(scale)
        shifts.append(shift)
    folded = (torch.stack(scales).unsqueeze(-1) * stacked).sum(0)
    bias = torch.stack(shifts).sum(0)

    weight = folded.view(C, 1, K, K).to(x.dtype)
    bias = bias.to(x.dtype)
    if _use_fused_dw_conv(x, K, conv):
        import falconnet_kernels

        return falconnet_kernels.dw_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=K // 2, groups=C)
