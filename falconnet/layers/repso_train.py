"""RepSO's training forward, exact, with one depthwise conv (SPEC 3a, docs/repso_training.md).

sum_b bn_b(conv_b(x)) + identity_bn(x) with training-mode BatchNorms equals one KxK depthwise conv
of x whose kernel and bias are folded from each branch's batch statistics. Those statistics come
from the K*K shifted means and the K*K x K*K shifted covariance of x (falconnet_kernels.repso_moments,
one pass over x): a branch with kernel k (embedded in KxK) has batch mean k.mean and biased
variance k^T cov k. Autograd runs through the fold into the branch weights and BN affine
parameters, and through the moments op into x, so every gradient is that of the seven-branch path.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from falconnet_kernels.ops import differentiable_grads
from falconnet_kernels.repso_moments import (
    CPP_NAMESPACE,
    cpp_train_path_available,
    flat_layout,
    fold_cpp_available,
    repso_fold,
    repso_moments,
    repso_moments_ref,
    stats_dtype,
    triton_train_path_available,
)

from .activation import activation_, activation_backward, apply_activation, split_for_fusion


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


def needs_sync(bn: nn.Module) -> bool:
    """SyncBatchNorm's own rule for reducing its statistics across processes in this forward: the
    folded training paths (RepSO's one conv, RefCO's fused form) compute this process's batch
    statistics only, so they step aside for it."""
    return (
        isinstance(bn, nn.SyncBatchNorm)
        and bn.training
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def bn_step_factor(bn: nn.BatchNorm2d) -> float:
    """Count one training step as nn.BatchNorm2d does (num_batches_tracked += 1 when tracked) and
    return the running-statistics factor: the momentum, or 1 / steps for momentum None."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor,
                         count: int, factor: float) -> None:
    """running <- (1 - factor) running + factor batch, with the biased batch variance var made
    unbiased over count values, as nn.BatchNorm2d keeps it; nothing without running statistics."""
    if running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def _bn_update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update nn.BatchNorm2d makes in a training forward."""
    if not (bn.training and bn.track_running_stats):
        return
    update_running_stats(bn.running_mean, bn.running_var, mean, var, count, bn_step_factor(bn))


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



def _update_running_batched(bns: Sequence[nn.BatchNorm2d], mean: Tensor, var: Tensor) -> None:
    """_bn_update_running for every BatchNorm at once: one foreach launch for the counters and one
    for the running means and variances together (the usual case of one momentum). mean and var
    are (B, C) rows: row b the batch mean and the unbiased batch variance for bns[b]. Contiguous
    rows keep CUDA's foreach ops on their one-launch path (strided ones fall back to a launch per
    tensor). The buffers are read from each module's _buffers: Module.__getattr__ (~1 us a lookup,
    ~50 a step for seven BatchNorms) cost more than the update at small maps."""
    tracked = [(b, bn, bn._buffers) for b, bn in enumerate(bns) if bn.training and bn.track_running_stats]
    if not tracked:
        return
    counters = [bufs["num_batches_tracked"] for _, _, bufs in tracked if bufs.get("num_batches_tracked") is not None]
    if counters:
        torch._foreach_add_(counters, 1)
    means, variances = mean.unbind(0), var.unbind(0)
    running_means, running_vars, new_means, new_vars, factors = [], [], [], [], []
    for b, bn, bufs in tracked:
        rm, rv = bufs.get("running_mean"), bufs.get("running_var")
        if rm is None:
            continue
        running_means.append(rm)
        running_vars.append(rv)
        new_means.append(means[b] if means[b].dtype == rm.dtype else means[b].to(rm.dtype))
        new_vars.append(variances[b] if variances[b].dtype == rv.dtype else variances[b].to(rv.dtype))
        if bn.momentum is None:  # cumulative moving average
            count = bufs.get("num_batches_tracked")
            factors.append(1.0 / float(count) if count is not None else 0.0)
        else:
            factors.append(float(bn.momentum))
    if not running_means:
        return
    with torch.no_grad():
        running, new = running_means + running_vars, new_means + new_vars
        if len(set(factors)) == 1:  # the usual case: one momentum; running += factor (new - running)
            torch._foreach_lerp_(running, new, factors[0])
        else:
            factors = factors * 2
            torch._foreach_mul_(running, [1 - f for f in factors])
            torch._foreach_add_(running, torch._foreach_mul(new, factors))


def _running_rows(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(C, B) batch means and biased variances as _update_running_batched's (B, C) rows."""
    return mean.t(), (var * (count / (count - 1))).t()


@functools.lru_cache(maxsize=64)
def _eps_on(eps: tuple, device: torch.device) -> Tensor:
    # built once per device: a fresh host-to-GPU copy every step would stall the launch queue
    return torch.tensor(eps, dtype=torch.float64, device=device)


def _fold_inputs(weights, bns, with_identity: bool, K: int, dtype, device):
    """The fold's inputs for the custom-op path: kernels (C, B, K*K) (each branch embedded in
    K x K, the identity last), gamma and beta (C, B) in dtype, from the flat parameters by one
    differentiable index_select (_unpack); eps (B,) float64 on device."""
    shapes = tuple((w.shape[2], w.shape[3]) for w in weights)
    flat = _flat_parameters(weights, bns, constants=True)
    kernels, gamma, beta = _unpack(flat, shapes, with_identity, K, weights[0].shape[0], dtype)
    return kernels, gamma, beta, _cached(_eps_on, tuple(float(bn.eps) for bn in bns), device)


def _differentiable_grads(ctx, grad_y: Tensor, inputs: tuple, unpack) -> list:
    """A one-conv node's gradients of its differentiable inputs for a backward with
    create_graph=True (falconnet_kernels.ops.differentiable_grads), through the same math in
    PyTorch ops: the moments reference, the fold as tensor ops, F.conv2d, the activation.
    unpack(*inputs) gives (x, kernels (C, B, K*K), gamma (C, B), beta (C, B)); eps is saved."""
    K, eps = ctx.K, ctx.eps

    def forward(*inputs):
        x, kernels, gamma, beta = unpack(*inputs)
        C = x.shape[1]
        mean_s, cov_s = repso_moments_ref(x, K)
        dt = mean_s.dtype
        k = kernels.to(dt)
        mean, var = _batched_branch_stats(k, mean_s, cov_s)
        folded, bias = _batched_fold(k, mean, var, gamma.to(dt), beta.to(dt), eps.to(device=x.device, dtype=dt))
        return apply_activation(
            F.conv2d(x, folded.view(C, 1, K, K).to(x.dtype), bias.to(x.dtype), padding=K // 2, groups=C),
            ctx.activation)

    return differentiable_grads(ctx, grad_y, inputs, forward)


class _OneConvTrainCPU(torch.autograd.Function):
    """moments -> fold -> conv and their backward in one autograd node, calling the C++ kernels
    directly (the conv: the extension's dw_conv3x3 forward for channels_last x when own_conv,
    else F.conv2d): the same math as the custom-op path (repso_moments, repso_fold, F.conv2d), without
    two custom ops' Python autograd wrappers and dispatch (~65 us each per step), the conv's own
    node, and the separate accumulation of grad_x's two parts. CPU only; torch.compile traces it
    through the kernels' fake implementations (falconnet_kernels/repso_moments.py).

    The branch parameters come in as they are (params: the n_w branch weights, then the BatchNorms'
    weights, then their biases) and the C++ fold reads them and writes their gradients directly
    (repso_fold_*_params): the flat concatenation, its gather into (C, B, K*K) and the gradients'
    concatenation and scatter cost ~0.5 ms of a 1024@7 layer's ~11 ms step (batch 16, 2 AVX2 cores,
    2026-11-27)."""

    @staticmethod
    def forward(ctx, x, eps, config, *params):
        K, activation, own_conv, n_w = config
        cpp = getattr(torch.ops, CPP_NAMESPACE)
        C, x_in = x.shape[1], x
        B = (len(params) - n_w) // 2
        # The C++ kernels' fast path is channels_last (K = 3, C a multiple of 16); other layouts
        # take a channels_last copy there (and hand y and grad_x back in their own layout): two
        # copies each way cost a fraction of the per-channel kernels' time
        ctx.nchw = K == 3 and C % 16 == 0 and not x.is_contiguous(memory_format=torch.channels_last)
        if ctx.nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        mean, cov = cpp.repso_moments_forward(x, K)
        folded, bias, bmean, bvar = cpp.repso_fold_forward_params(
            mean, cov, params[:n_w], params[n_w:n_w + B], params[n_w + B:], eps)
        weight = folded.view(C, 1, K, K).to(x.dtype)
        # (under autocast F.conv2d, which runs in the autocast dtype as the branch form's convs do)
        if own_conv and K == 3 and x.is_contiguous(memory_format=torch.channels_last) \
                and not torch.is_autocast_enabled("cpu"):
            # the extension's conv with the activation in its store: 1.0-1.1x oneDNN's conv + clamp
            # a layer fwd+bwd (batch 16, the hidden shapes), 1.015x a 224 px FalconNet step
            y = cpp.dw_conv3x3_forward(x, weight, bias.to(x.dtype), 1, activation)
        else:
            y = activation_(F.conv2d(x, weight, bias.to(x.dtype), padding=K // 2, groups=C), activation)
        y = y.contiguous() if ctx.nchw else y
        # (x_in: for a backward with create_graph=True, _differentiable_grads)
        ctx.save_for_backward(x, mean, cov, weight, y if activation != "none" else None, x_in, *params)
        ctx.K, ctx.activation, ctx.eps, ctx.n_w, ctx.B = K, activation, eps, n_w, B
        ctx.mark_non_differentiable(bmean, bvar)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for bmean and bvar
        return y, bmean, bvar

    @staticmethod
    def backward(ctx, grad_y, _grad_bmean, _grad_bvar):
        n_params = ctx.n_w + 2 * ctx.B
        if grad_y is None:  # y took no part in the loss
            return (None, None, None) + (None,) * n_params
        x, mean, cov, weight, y, x_in, *params = ctx.saved_tensors
        K, C, eps, n_w = ctx.K, x.shape[1], ctx.eps, ctx.n_w
        weights, gammas = params[:n_w], params[n_w:n_w + ctx.B]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            shapes = tuple((w.shape[2], w.shape[3]) for w in weights)

            def unpack(x, _eps, _config, *ps):  # the parameters' flat form and its gather, as torch ops
                return (x, *_unpack(_flatten(ps, True), shapes, ctx.B > n_w, K, C, stats_dtype(x.dtype)))

            return tuple(_differentiable_grads(ctx, grad_y, (x_in, None, None, *params), unpack))
        grad_y = activation_backward(grad_y, y, ctx.activation)
        # under autocast the forward's conv ran in the autocast dtype: the backward works in x's
        grad_y = grad_y.to(x.dtype)
        cpp = getattr(torch.ops, CPP_NAMESPACE)
        need_x = ctx.needs_input_grad[0]
        if K == 3 and C % 16 == 0 and x.is_contiguous(memory_format=torch.channels_last):
            # the channels_last fast path: the conv's weight gradient, then all of grad_x in one pass
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
            grad_w, grad_b = cpp.repso_conv_weight_grad(grad_y, x)
            g_mean, g_cov, g_params = cpp.repso_fold_backward_params(
                grad_w.view(C, K * K), grad_b, mean, cov, weights, gammas, eps)
            grad_x = cpp.repso_train_backward_x(g_mean, g_cov, x, mean, grad_y, weight) if need_x else None
            if grad_x is not None and ctx.nchw:
                grad_x = grad_x.contiguous()
        else:
            grad_x_conv, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y.contiguous(memory_format=torch.channels_last)
                if x.is_contiguous(memory_format=torch.channels_last) else grad_y.contiguous(),
                x, weight, [C], [1, 1], [K // 2, K // 2], [1, 1], False, [0, 0], C, [need_x, True, True])
            g_mean, g_cov, g_params = cpp.repso_fold_backward_params(
                grad_w.reshape(C, K * K).to(mean.dtype), grad_b.to(mean.dtype), mean, cov, weights, gammas, eps)
            grad_x = None
            if need_x:
                grad_x = cpp.repso_moments_backward(g_mean, g_cov, x, mean, K)
                grad_x += grad_x_conv
        return (grad_x, None, None, *g_params)


@functools.lru_cache(maxsize=64)
def _flat_indices(shapes: tuple, with_identity: bool, K: int, C: int, device: torch.device) -> Tensor:
    """The index vector (on device) that picks (kernels (C, B, K*K), gamma (C, B), beta (C, B)) out
    of the flat parameters (flat_layout, followed by the constants 0 and 1) in one index_select:
    the torch-op form of the fold's inputs (the fold's fallback, and the one-node paths' backward
    with create_graph=True)."""
    taps, cs, gamma_at, beta_at = _cached(flat_layout, shapes, with_identity, K, C)
    B = len(taps)
    n = beta_at + B * C  # the parameters; flat[n] = 0, flat[n + 1] = 1
    taps_t, cs_t = torch.tensor(taps), torch.tensor(cs)
    c = torch.arange(C)
    at = taps_t[None] + c[:, None, None] * cs_t[None, :, None]  # (C, B, KK)
    at = torch.where(taps_t[None] >= 0, at, torch.where(taps_t[None] == -2, n + 1, n))
    bc = (torch.arange(B)[None, :] * C + c[:, None]).reshape(-1)  # (C, B) flattened: b * C + c
    return torch.cat([at.reshape(-1), gamma_at + bc, beta_at + bc]).to(device)


def _cached(fn, *args):
    """fn(*args) through its functools cache, or computed afresh while torch.compile traces (dynamo
    does not honour lru_cache)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


@functools.lru_cache(maxsize=16)
def _constants(dtype: torch.dtype, device: torch.device, value: tuple) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _unpack(flat: Tensor, shapes: tuple, with_identity: bool, K: int, C: int, dtype) -> tuple:
    """(kernels (C, B, K*K), gamma (C, B), beta (C, B)) in dtype from flat parameters with the
    constants (_flat_parameters(..., constants=True)), by one differentiable index_select."""
    gather = _cached(_flat_indices, shapes, with_identity, K, C, flat.device)
    packed = flat.index_select(0, gather).to(dtype)
    B, n_k = len(shapes) + with_identity, C * (len(shapes) + with_identity) * K * K
    return (packed[:n_k].view(C, B, K * K), packed[n_k:n_k + C * B].view(C, B), packed[n_k + C * B:].view(C, B))


# Which kernel computes the one conv's weight gradient on the GPU one-node path at K = 3: "rows"
# (falconnet_kernels.triton_repso_moments.conv3_weight_grad_totals, the moments kernels' row layout),
# "cudnn" (torch's convolution_backward) or "triton" (triton_dw_conv3x3's weight-gradient kernel).
# H100, bf16, batch 128 (2026-11-26): cuDNN 48-335 us at the 4 hidden shapes (530-640 GB/s, ~20%
# of copy; its workspace also held the layer's peak memory above a third of the seven-branch
# path's at 3 of them), triton 0.76x cuDNN. "rows": ~40 instructions an output on sm_90 against
# the triton kernel's ~100; unmeasured (benchmarks/test_bench_repso_train.py times all three as
# conv-wgrad-rows, conv-wgrad, conv-wgrad-triton).
WEIGHT_GRAD = "rows"

# The one conv itself on the GPU one-node path at K = 3: "rows" (triton_repso_moments.conv3_forward,
# the activation fused) or "cudnn" (F.conv2d). cuDNN's: 40-257 us at the 4 hidden shapes on the
# H100 (640-800 GB/s, 21-27% of copy, 2026-11-26); "rows" ~35 instructions an output on sm_90,
# unmeasured (conv-rows beside conv in benchmarks/test_bench_repso_train.py).
CONV = "rows"


class _OneConvTrainTriton(torch.autograd.Function):
    """The GPU counterpart of _OneConvTrainCPU: moments (Triton) -> fold (one Triton kernel) ->
    the depthwise conv (CONV: a Triton row kernel at K = 3, else cuDNN's); backward: the conv's
    weight gradient (WEIGHT_GRAD) -> fold backward (one Triton kernel, which also prepares the
    moments backward's inputs) -> one Triton kernel for all of grad_x (the moments' part and the
    conv's input gradient, one read of x and grad_y, one write). The branch parameters come in as
    one flat tensor (_flat_parameters; the fold kernels index it: triton_repso_fold.Params.flat)
    and their gradient leaves as one buffer the fold backward fills, whose slices autograd hands to
    the parameters as they are. At K = 3 with the row kernels a training step launches 7 kernels
    forward (the moments kernel and its sum, the fold, the conv; the parameters' concatenation;
    the running statistics' two foreach ops) and 4 backward (+1 for a fused activation's mask),
    against ~25 and ~30 before the flat parameters (the custom-op path: ~70 a direction). float32, bfloat16 and float16 x; runs on CPU tensors under
    TRITON_INTERPRET=1 (the tests)."""

    @staticmethod
    def forward(ctx, x, flat, shapes, with_identity, eps, K, activation):
        from falconnet_kernels import triton_repso_fold, triton_repso_moments

        N, C, H, W = x.shape
        params = triton_repso_fold.Params.flat(flat, shapes, with_identity, K, C)
        if K == 3:
            sums, shift = triton_repso_moments.forward_totals3(x)
            prods = None  # fold_forward reads the compact totals
        else:
            sums, prods, shift = triton_repso_moments.forward_partials(x, K)
        mean, cov, weight, bias, bmean, bvar = triton_repso_fold.fold_forward(
            sums, prods, shift, N * H * W, params, eps, K, x.dtype)
        weight = weight.view(C, 1, K, K)
        if K == 3 and CONV == "rows":
            # in autocast's dtype where it is on, as F.conv2d would run (and return) it
            dev = x.device.type
            cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            y = triton_repso_moments.conv3_forward(x.to(cdt), weight.to(cdt), bias.to(cdt), activation)
        else:
            y = activation_(F.conv2d(x, weight, bias, padding=K // 2, groups=C), activation)
        ctx.save_for_backward(x, mean, cov, flat, weight, y if activation != "none" else None)
        ctx.K, ctx.activation, ctx.eps, ctx.shapes, ctx.with_identity = K, activation, eps, shapes, with_identity
        ctx.mark_non_differentiable(bmean, bvar)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for bmean and bvar (two launches)
        return y, bmean, bvar

    @staticmethod
    def backward(ctx, grad_y, _grad_bmean, _grad_bvar):
        from falconnet_kernels import triton_repso_fold, triton_repso_moments

        if grad_y is None:  # y took no part in the loss
            return None, None, None, None, None, None, None
        x, mean, cov, flat, weight, y = ctx.saved_tensors
        K, C, eps = ctx.K, x.shape[1], ctx.eps
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = _differentiable_grads(
                ctx, grad_y, (x, flat), lambda x, flat: (x, *_unpack(
                    torch.cat([flat, _constants(flat.dtype, flat.device, (0.0, 1.0))]), ctx.shapes, ctx.with_identity,
                    K, C, stats_dtype(x.dtype))))
            return (*grads, None, None, None, None, None)
        params = triton_repso_fold.Params.flat(flat, ctx.shapes, ctx.with_identity, K, C)
        need_x = ctx.needs_input_grad[0]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        grad_y = activation_backward(grad_y, y, ctx.activation)
        # under autocast the forward's conv ran in the autocast dtype: the backward works in x's
        grad_y = grad_y.to(x.dtype).contiguous(memory_format=fmt)
        # the conv's weight and bias gradients only: its input gradient is computed inside the
        # moments backward kernel, from the same pass over grad_y and x that writes grad_x
        if K == 3 and WEIGHT_GRAD == "rows":
            totals = triton_repso_moments.conv3_weight_grad_totals(grad_y, x)  # (10, C) float64
            grad_w, grad_b = totals[:9].t(), totals[9]
        elif K == 3 and WEIGHT_GRAD == "triton":
            from falconnet_kernels import triton_dw_conv3x3

            grad_w, grad_b = triton_dw_conv3x3.dw_conv3x3_weight_grad(grad_y, x)
        else:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, x, weight, [C], [1, 1], [K // 2, K // 2], [1, 1], False, [0, 0], C, [False, True, True])
        grad_w = grad_w.reshape(C, K * K)
        grad_x = None
        if K == 3:
            # the fold backward also writes the K = 3 grad_x kernel's class tables
            g_flat, _, _, tab, cst, bd, bc, shift = triton_repso_fold.fold_backward(
                grad_w, grad_b, mean, cov, params, eps, K, x.dtype, n_pos=x.shape[0] * x.shape[2] * x.shape[3])
            if need_x:
                grad_x = triton_repso_moments.backward3_launch(x, tab, cst, bd, bc, shift, conv=(grad_y, weight))
        else:
            g_flat, _, _, a_hi, a_lo, cst, shift = triton_repso_fold.fold_backward(
                grad_w, grad_b, mean, cov, params, eps, K, x.dtype)
            if need_x:
                grad_x = triton_repso_moments.backward_launch(x, a_hi, a_lo, cst, shift, K, conv=(grad_y, weight))
        return grad_x, g_flat, None, None, None, None, None


def _flat_parameters(weights: Sequence[Tensor], bns: Sequence[nn.BatchNorm2d], constants: bool = False) -> Tensor:
    """The one-node paths' one parameter tensor (falconnet_kernels.repso_moments.flat_layout):
    every branch weight flattened, then the BatchNorms' weights, then their biases, and with
    constants the values 0 and 1 (the CPU node's gather takes the embedding's zeros and the
    identity's 1 from there). One launch; its backward hands each parameter a contiguous slice of
    the node's gradient, which autograd keeps as the parameter's gradient without a copy."""
    return _flatten([*weights, *[bn.weight for bn in bns], *[bn.bias for bn in bns]], constants)


def _flatten(params: Sequence[Tensor], constants: bool) -> Tensor:
    """_flat_parameters' tensor from the parameters themselves: weights, gammas, betas in order."""
    parts = [p.reshape(-1) for p in params]
    if constants:
        parts.append(_cached(_constants, params[0].dtype, params[0].device, (0.0, 1.0)))
    return torch.cat(parts)


def _use_one_node(x: Tensor, conv: str) -> bool:
    return (
        x.device.type == "cpu"
        and conv != "falconnet"
        and torch.is_grad_enabled()
        and cpp_train_path_available(x)
    )


def _use_triton_node(x: Tensor, conv: str) -> bool:
    """The Triton one-node path: where the moments op runs on Triton (CUDA; or CPU tensors with
    FALCONNET_BACKEND=triton under the interpreter), float32/16-bit x, eager mode (torch.compile
    traces the custom ops instead: Triton launches with autotuning are not traced here)."""
    return (
        conv != "falconnet"
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and triton_train_path_available(x)
    )


def _fold_batch_stats(
    weights: Sequence[Tensor], bns: Sequence[nn.BatchNorm2d], with_identity: bool, K: int, dtype,
    mean_s: Tensor, cov_s: Tensor, count: int,
) -> tuple[Tensor, Tensor]:
    """The folded (C, K*K) kernel and (C,) bias when every BatchNorm uses batch statistics and is
    affine, vectorized over the branches: ~20 tensor ops forward and as many backward, whatever the
    branch count (each op on a (C, B)-sized tensor costs about as much as on a (C,) one, so at
    small maps the per-branch loop's ~100 ops cost more than the moments kernels)."""
    C, KK = mean_s.shape
    if fold_cpp_available(mean_s):
        # the same math in one C++ pass forward and one backward
        kernels, gamma, beta, eps = _fold_inputs(weights, bns, with_identity, K, dtype, mean_s.device)
        folded, bias, mean, var = repso_fold(mean_s, cov_s, kernels, gamma, beta, eps)
        _update_running_batched(bns, *_running_rows(mean.detach(), var.detach(), count))
        return folded, bias
    kernels, gamma, beta, _ = _fold_inputs(weights, bns, with_identity, K, dtype, mean_s.device)
    mean, var = _batched_branch_stats(kernels, mean_s, cov_s)
    _update_running_batched(bns, *_running_rows(mean.detach(), var.detach(), count))
    eps = [bn.eps for bn in bns]
    eps = eps[0] if len(set(eps)) == 1 else torch.tensor(eps, dtype=dtype, device=mean_s.device)
    return _batched_fold(kernels, mean, var, gamma, beta, eps)


def _batched_branch_stats(kernels: Tensor, mean_s: Tensor, cov_s: Tensor) -> tuple[Tensor, Tensor]:
    """Every branch's batch mean and biased variance (C, B) from the (C, B, K*K) embedded kernels:
    k.mean and cov k in one batched product, (C, B, K*K) @ (C, K*K, K*K + 1)."""
    KK = mean_s.shape[1]
    prod = torch.bmm(kernels, torch.cat([cov_s, mean_s.unsqueeze(-1)], -1))
    return prod[..., KK], (prod[..., :KK] * kernels).sum(-1).clamp_min(0)  # clamp: see _branch_moments


def _batched_fold(kernels: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps) -> tuple[Tensor, Tensor]:
    """The folded (C, K*K) kernel and (C,) bias of the batch-statistics BatchNorms (C, B)."""
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    return torch.bmm(scale.unsqueeze(1), kernels).view(kernels.shape[0], -1), shift.sum(1)



def _fold_per_branch(kernels, bns, batch, dtype, count, mean_s, cov_s) -> tuple[Tensor, Tensor]:
    """The fold branch by branch: any mix of batch-statistics and running-statistics (eval-mode)
    BatchNorms, affine or not."""
    stacked = torch.stack(kernels)  # (B, C, K*K)
    if mean_s is not None:
        means, variances = _branch_moments(stacked, mean_s, cov_s)  # (B, C) each
    scales, shifts = [], []
    for b, bn in enumerate(bns):
        if batch[b]:
            mean, var = means[b], variances[b]
            _bn_update_running(bn, mean.detach(), var.detach(), count)
            scale, shift = _scale_shift(bn, mean, var, dtype)
        else:
            scale, shift = _scale_shift(bn, None, None, dtype)
        scales.append(scale)
        shifts.append(shift)
    folded = (torch.stack(scales).unsqueeze(-1) * stacked).sum(0)
    return folded, torch.stack(shifts).sum(0)

def _use_fused_dw_conv(x: Tensor, K: int, conv: str) -> bool:
    """Whether the one conv runs on falconnet_kernels.dw_conv3x3 (3x3 only) or on F.conv2d.

    "auto" picks F.conv2d on both devices, by forward+backward measurements at the hidden shapes:
    on an H200 cuDNN's beat the Triton op 1.1-1.6x and the CUDA C++ op 2.4-11x
    (benchmarks/results/2026-11-26-h200/bench_gpu.md, "dw_conv3x3 fwd+bwd"). On the CPU the
    one-node path (_OneConvTrainCPU) runs its own kernels instead: the extension's forward for
    channels_last x with "auto" (oneDNN's with "torch") and its own backward kernels; elsewhere on
    the CPU oneDNN's conv measured 1.1-7.6x faster than the extension's op before its
    channels_last backward was rewritten (docs/repso_training.md).
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
    one_node: bool = True,
    activation: str = "none",
) -> Tensor:
    """activation(sum_b bns[b](conv2d(x, weights[b], padding=(kh//2, kw//2), groups=C)) + identity_bn(x)),
    exactly, with one conv; BatchNorms in training mode use batch statistics and update their running
    statistics (and num_batches_tracked) in place, as nn.BatchNorm2d does. Stride 1.

    conv picks the one conv: "falconnet" (falconnet_kernels.dw_conv3x3, K = 3 only), "torch"
    (F.conv2d: cuDNN / oneDNN) or "auto" (see _use_fused_dw_conv).

    one_node=True (the default) runs the training case (every BatchNorm affine, batch statistics)
    as one autograd node where the kernels allow (_OneConvTrainCPU with the C++ kernels,
    _OneConvTrainTriton with Triton); False takes the custom ops (repso_moments, the fold, the
    conv) one by one, as torch.compile does (benchmarks compare the two).

    activation ("none" or any of falconnet.layers.activation.ACTIVATIONS): the one-node paths apply
    relu / relu6 in place to the conv's output and take the backward's mask from it (the pre-
    activation tensor is not kept); the other paths apply it after the conv.
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
    all_bns = list(bns) + ([identity_bn] if identity_bn is not None else [])

    count = N * H * W
    batch = [_uses_batch_stats(bn) for bn in all_bns]
    if any(batch) and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    folding_all = all(batch) and all(bn.affine for bn in all_bns)
    cpu_node = folding_all and one_node and _use_one_node(x, conv)
    triton_node = folding_all and one_node and not cpu_node and _use_triton_node(x, conv)
    if cpu_node or triton_node:
        # the training case: moments, fold and conv in one autograd node
        fused, after = split_for_fusion(activation)
        shapes = tuple((w.shape[2], w.shape[3]) for w in weights)
        eps = _cached(_eps_on, tuple(float(bn.eps) for bn in all_bns), x.device)
        if triton_node:
            y, mean, var = _OneConvTrainTriton.apply(x, _flat_parameters(weights, all_bns), shapes,
                                                     identity_bn is not None, eps, K, fused)
        else:
            y, mean, var = _OneConvTrainCPU.apply(
                x, eps, (K, fused, conv == "auto", len(weights)), *weights,
                *[bn.weight for bn in all_bns], *[bn.bias for bn in all_bns])
            mean, var = _running_rows(mean, var, count)
        _update_running_batched(all_bns, mean, var)
        return apply_activation(y, after)
    if any(batch):
        mean_s, cov_s = repso_moments(x, K)  # (C, K*K), (C, K*K, K*K)

    if folding_all:
        # the training case: every branch folded at once
        folded, bias = _fold_batch_stats(weights, all_bns, identity_bn is not None, K, dtype, mean_s, cov_s, count)
    else:
        kernels = [_embed(w.to(dtype), K) for w in weights]
        if identity_bn is not None:
            centre = torch.zeros(C, K * K, dtype=dtype, device=x.device)
            centre[:, (K * K) // 2] = 1
            kernels.append(centre)
        folded, bias = _fold_per_branch(kernels, all_bns, batch, dtype, count, mean_s if any(batch) else None,
                                        cov_s if any(batch) else None)

    weight = folded.view(C, 1, K, K).to(x.dtype)
    bias = bias.to(x.dtype)
    if _use_fused_dw_conv(x, K, conv):
        import falconnet_kernels

        fused, after = split_for_fusion(activation)
        return apply_activation(falconnet_kernels.dw_conv3x3(x, weight, bias, activation=fused), after)
    return apply_activation(F.conv2d(x, weight, bias, padding=K // 2, groups=C), activation)
