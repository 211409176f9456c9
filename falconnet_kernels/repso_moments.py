"""Shifted-window moments of a feature map: the statistics that make RepSO's training exact with one conv.

For one channel of x (N, C, H, W), let xp be x zero-padded by P = K // 2 and s_p the K x K window
shift of xp at offset p (p = 0 .. K*K-1, row-major), so that a depthwise KxK conv with kernel k is
z = sum_p k[p] s_p. Over the M = N*H*W output positions:

    mean[c, p]   = E[s_p]                                      (C, K*K)
    cov[c, p, q] = E[s_p s_q] - E[s_p] E[s_q]                  (C, K*K, K*K), symmetric

so any branch's batch mean and (biased) variance are k.mean and k^T cov k (docs/repso_training.md).
The op returns the covariance, not the raw second moment E[s_p s_q]: raw moments lose about
(mean/std)^2 digits when the variance is formed from them later in float32.

torch.ops.falconnet.repso_moments(x, K) -> (mean, cov) is a custom op with a fake kernel, autograd
(torch.ops.falconnet.repso_moments_backward: grad_x from grad_mean and grad_cov in one pass) and a
FLOP formula. Statistics are float64 for float64 input and float32 otherwise (as BatchNorm keeps
bf16 statistics in float32). Backends: C++ on CPU when built, Triton on CUDA, else the reference;
FALCONNET_BACKEND=torch forces the reference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _backend

# the C++ kernels' namespace (development builds of csrc/cpu/repso_moments.cpp load as falconnet_dev)
CPP_NAMESPACE = "falconnet_C"

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the moments for input of `dtype`: float64 stays, anything narrower gets float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_repso_moments(x: Tensor, K: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if K < 1 or K % 2 == 0:
        raise ValueError(f"K (the window size) must be a positive odd integer, got {K}")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x must have one of the dtypes {_SUPPORTED}, got {x.dtype}")
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have at least one position per channel, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Reference: the definition of the op (tests and docs use it).


def _windows(x: Tensor, K: int) -> Tensor:
    """(C, K*K, M): the K*K zero-padded shifts of each channel, positions flattened over (N, H, W)."""
    N, C, H, W = x.shape
    cols = F.unfold(x, K, padding=K // 2)  # (N, C*K*K, H*W)
    return cols.view(N, C, K * K, H * W).permute(1, 2, 0, 3).reshape(C, K * K, N * H * W)


def repso_moments_ref(x: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """mean (C, K*K) and covariance (C, K*K, K*K) of the K*K shifts, two-pass in the stats dtype."""
    s = _windows(x.to(stats_dtype(x.dtype)), K)
    mean = s.mean(dim=-1)
    centred = s - mean.unsqueeze(-1)
    cov = centred @ centred.transpose(1, 2) / s.shape[-1]
    return mean, cov


def repso_moments_backward_ref(grad_mean: Tensor, grad_cov: Tensor, x: Tensor, mean: Tensor, K: int) -> Tensor:
    """grad_x = fold over p of (grad_mean[p] + sum_q (G + G^T)[p, q] (s_q - mean[q])) / M.

    d mean[p] / d s_p = 1/M and d cov[p, q] / d s_p = (s_q - mean[q]) / M (the mean terms of the
    covariance have zero total derivative); col2im (F.fold) sends each shift back to x.
    """
    N, C, H, W = x.shape
    M = N * H * W
    s = _windows(x.to(mean.dtype), K)
    g_sym = grad_cov + grad_cov.transpose(1, 2)
    grad_s = (grad_mean.unsqueeze(-1) + g_sym @ (s - mean.unsqueeze(-1))) / M  # (C, K*K, M)
    cols = grad_s.view(C, K * K, N, H * W).permute(2, 0, 1, 3).reshape(N, C * K * K, H * W)
    return F.fold(cols, (H, W), K, padding=K // 2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The custom ops.


_CPP_KERNELS_SEEN: set[str] = set()


def _cpp_has(op: str) -> bool:
    """Whether the extension registers a CPU kernel for op (remembered once seen: a kernel does
    not go away, and the check costs a dispatcher lookup on every call of these small ops)."""
    if op in _CPP_KERNELS_SEEN:
        return True
    if torch.compiler.is_compiling():  # the dispatcher query is not traceable (a graph break)
        return False
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"{CPP_NAMESPACE}::{op}", "CPU")
    except RuntimeError:  # an extension built before this op existed lacks the schema
        return False
    if found:
        _CPP_KERNELS_SEEN.add(op)
    return found


def _cpp_built() -> bool:
    """The C++ kernels are in the extension only once it has been rebuilt with csrc/cpu/repso_moments.cpp."""
    return _cpp_has("repso_moments_forward")


# asked once at import (the extension is loaded by _backend by now), so that code traced by
# torch.compile finds the answers without querying the dispatcher
for _op in ("repso_moments_forward", "repso_moments_backward", "repso_fold_forward", "repso_fold_backward",
            "repso_fold_forward_params", "repso_fold_backward_params", "repso_conv_weight_grad",
            "repso_train_backward_x"):
    _cpp_has(_op)


def _register_cpp_fakes() -> None:
    """Fake (meta) implementations of the C++ kernels that RepSO's one-node CPU training path
    calls directly (falconnet/layers/repso_train.py), so torch.compile can trace that path too."""
    ns = CPP_NAMESPACE

    def fake(name):
        if not _cpp_has(name):  # an older build of the extension
            return lambda fn: fn
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("repso_moments_forward")
    def _(x, K):
        C, dtype = x.shape[1], stats_dtype(x.dtype)
        return x.new_empty((C, K * K), dtype=dtype), x.new_empty((C, K * K, K * K), dtype=dtype)

    @fake("repso_moments_backward")
    def _(grad_mean, grad_cov, x, mean, K):
        return _grad_x_like(x)

    @fake("repso_fold_forward")
    def _(mean, cov, kernels, gamma, beta, eps):
        C, B = gamma.shape
        return mean.new_empty(mean.shape), mean.new_empty((C,)), mean.new_empty((C, B)), mean.new_empty((C, B))

    @fake("repso_fold_backward")
    def _(grad_folded, grad_bias, mean, cov, kernels, gamma, eps):
        return (torch.empty_like(mean), torch.empty_like(cov), torch.empty_like(kernels), torch.empty_like(gamma),
                torch.empty_like(gamma))

    @fake("repso_fold_forward_params")
    def _(mean, cov, weights, gammas, betas, eps):
        C, B = mean.shape[0], len(gammas)
        return mean.new_empty(mean.shape), mean.new_empty((C,)), mean.new_empty((C, B)), mean.new_empty((C, B))

    @fake("repso_fold_backward_params")
    def _(grad_folded, grad_bias, mean, cov, weights, gammas, eps):
        # (distinct tensors: repeating one list's would tell the tracer that gradients alias)
        grads = ([torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
                 + [torch.empty_like(g) for g in gammas] + [torch.empty_like(g) for g in gammas])
        return torch.empty_like(mean), torch.empty_like(cov), grads

    @fake("repso_conv_weight_grad")
    def _(grad_y, x):
        C, dtype = x.shape[1], stats_dtype(x.dtype)
        return x.new_empty((C, 1, 3, 3), dtype=dtype), x.new_empty((C,), dtype=dtype)

    @fake("repso_train_backward_x")
    def _(grad_mean, grad_cov, x, mean, grad_y, weight):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @fake("dw_conv3x3_forward")  # the node's conv for channels_last x (the op's own layout rule)
    def _(x, weight, bias, stride, activation):
        from .ops import _out_format

        N, C, H, W = x.shape
        return x.new_empty((N, C, (H - 1) // stride + 1, (W - 1) // stride + 1)).contiguous(
            memory_format=_out_format(x))


if _cpp_has("repso_moments_forward") and _cpp_has("repso_fold_forward"):
    _register_cpp_fakes()


def _select(device: torch.device, dtype: torch.dtype) -> str:
    """'cpp', 'triton' or 'torch' for this device (the extension's own op names are repso_moments_*)."""
    forced = _backend.forced_backend()
    if forced == "torch":
        return "torch"
    if device.type == "cpu":
        return "cpp" if _cpp_built() else "torch"
    if device.type == "cuda" and _backend.triton_version() is not None and dtype != torch.float64:
        return "triton"  # float64 stays on the reference: the Triton kernels accumulate in float32
    return "torch"


def _backend_for(x: Tensor) -> str:
    # FALCONNET_BACKEND=triton on a CPU tensor runs the Triton kernels under TRITON_INTERPRET=1 (tests)
    if (
        x.device.type == "cpu"
        and x.dtype != torch.float64
        and _backend.forced_backend() == "triton"
        and _backend.triton_interpreting()
    ):
        return "triton"
    return _select(x.device, x.dtype)


@torch.library.custom_op("falconnet::repso_moments", mutates_args=())
def repso_moments_op(x: Tensor, K: int) -> tuple[Tensor, Tensor]:
    check_repso_moments(x, K)
    backend = _backend_for(x)
    if backend == "cpp":
        return getattr(torch.ops, CPP_NAMESPACE).repso_moments_forward(x, K)
    if backend == "triton":
        from . import triton_repso_moments

        return triton_repso_moments.repso_moments_forward(x, K)
    return repso_moments_ref(x, K)


@repso_moments_op.register_fake
def _(x, K):
    check_repso_moments(x, K)
    C, dtype = x.shape[1], stats_dtype(x.dtype)
    return x.new_empty((C, K * K), dtype=dtype), x.new_empty((C, K * K, K * K), dtype=dtype)


@torch.library.custom_op("falconnet::repso_moments_backward", mutates_args=())
def repso_moments_backward_op(grad_mean: Tensor, grad_cov: Tensor, x: Tensor, mean: Tensor, K: int) -> Tensor:
    grad_mean = grad_mean.to(mean.dtype).contiguous()
    grad_cov = grad_cov.to(mean.dtype).contiguous()
    backend = _backend_for(x)
    if backend == "cpp":
        grad_x = getattr(torch.ops, CPP_NAMESPACE).repso_moments_backward(grad_mean, grad_cov, x, mean, K)
    elif backend == "triton":
        from . import triton_repso_moments

        grad_x = triton_repso_moments.repso_moments_backward(grad_mean, grad_cov, x, mean, K)
    else:
        grad_x = repso_moments_backward_ref(grad_mean, grad_cov, x, mean, K)
    # one layout whatever the backend, the one the fake kernel promises
    from torch._prims_common import suggest_memory_format

    return grad_x.contiguous(memory_format=suggest_memory_format(x))


def _grad_x_like(x: Tensor) -> Tensor:
    # the kernels' output layout: x's suggested memory format (channels_last stays channels_last,
    # anything else comes back contiguous)
    from torch._prims_common import suggest_memory_format  # ATen's rule, also for fake tensors

    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


@repso_moments_backward_op.register_fake
def _(grad_mean, grad_cov, x, mean, K):
    return _grad_x_like(x)


def _setup(ctx, inputs, output):
    x, K = inputs
    ctx.save_for_backward(x, output[0])
    ctx.K = K


def _backward(ctx, grad_mean, grad_cov):
    x, mean = ctx.saved_tensors
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_cov is None:
        grad_cov = mean.new_zeros(mean.shape + mean.shape[-1:])
    return torch.ops.falconnet.repso_moments_backward(grad_mean, grad_cov, x, mean, ctx.K), None


repso_moments_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# The fold of RepSO's batch-statistics branches (falconnet/layers/repso_train.py), as one C++ op
# on the CPU: at small maps its ~20 tensor ops and their backward cost more than the moments.


def repso_fold_ref(mean: Tensor, cov: Tensor, kernels: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor):
    """folded (C, K*K), bias (C), branch means and biased variances (C, B) for kernels (C, B, K*K)
    and BatchNorm parameters gamma, beta (C, B), eps (B,) (the definition of the C++ op)."""
    m = (kernels * mean.unsqueeze(1)).sum(-1)
    v = (torch.bmm(kernels, cov.transpose(1, 2)) * kernels).sum(-1).clamp_min(0)
    s = gamma * torch.rsqrt(v + eps.to(v.dtype))
    folded = (s.unsqueeze(-1) * kernels).sum(1)
    return folded, (beta - m * s).sum(1), m, v


def repso_fold_backward_ref(grad_folded, grad_bias, mean, cov, kernels, gamma, eps):
    """Gradients of repso_fold_ref's folded and bias for mean, cov, kernels, gamma, beta:
    g_s = gF.k - g_bias m, g_m = -g_bias s, g_gamma = g_s r, g_v = -g_s gamma r^3 / 2 (0 where the
    clamp cut v), g_k = s gF + g_m mean + g_v (cov + cov^T) k, g_mean = sum_b g_m k,
    g_cov = sum_b g_v k k^T, g_beta = g_bias."""
    m = (kernels * mean.unsqueeze(1)).sum(-1)
    row = torch.bmm(kernels, cov.transpose(1, 2))  # (cov k)[p]
    col = torch.bmm(kernels, cov)  # (cov^T k)[p]
    v_raw = (row * kernels).sum(-1)
    r = torch.rsqrt(v_raw.clamp_min(0) + eps.to(v_raw.dtype))
    s = gamma * r
    gb = grad_bias.unsqueeze(1)
    g_s = (grad_folded.unsqueeze(1) * kernels).sum(-1) - gb * m
    g_m = -gb * s
    g_v = torch.where(v_raw < 0, torch.zeros_like(v_raw), -0.5 * g_s * gamma * r**3)
    g_k = s.unsqueeze(-1) * grad_folded.unsqueeze(1) + g_m.unsqueeze(-1) * mean.unsqueeze(1) + g_v.unsqueeze(-1) * (row + col)
    g_mean = (g_m.unsqueeze(-1) * kernels).sum(1)
    g_cov = torch.bmm((g_v.unsqueeze(-1) * kernels).transpose(1, 2), kernels)
    return g_mean, g_cov, g_k, g_s * r, gb.expand_as(gamma).clone()


@functools.lru_cache(maxsize=64)
def flat_layout(shapes: tuple, with_identity: bool, K: int, C: int) -> tuple:
    """Where RepSO's one-node training paths find each branch parameter in their one flat
    parameter tensor: every branch weight (C, 1, kh, kw) flattened, in `shapes`' order, then the B
    BatchNorms' weights (C each; the identity's last when with_identity), then their biases.
    Returns (taps, chan_stride, gamma_at, beta_at): taps[b][p] the offset of branch b's tap p (of
    the K x K window, row-major) for channel 0, -1 where the tap is outside the branch's window
    (a 0), -2 at the identity's centre (a 1); chan_stride[b] the offset between channels; gamma
    of (b, c) at gamma_at + b * C + c, beta at beta_at + b * C + c."""
    taps, cs, start = [], [], 0
    for kh, kw in shapes:
        if kh > K or kw > K or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"branch kernels must be odd-sized and fit {K}x{K}, got {kh}x{kw}")
        dh, dw = (K - kh) // 2, (K - kw) // 2
        row = []
        for i in range(K):
            for j in range(K):
                inside = dh <= i < dh + kh and dw <= j < dw + kw
                row.append(start + (i - dh) * kw + (j - dw) if inside else -1)
        taps.append(tuple(row))
        cs.append(kh * kw)
        start += C * kh * kw
    if with_identity:
        taps.append(tuple(-2 if p == (K * K) // 2 else -1 for p in range(K * K)))
        cs.append(0)
    return tuple(taps), tuple(cs), start, start + len(taps) * C


def fold_cpp_available(t: Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64)
        and _backend_for(t) == "cpp"
        and _cpp_has("repso_fold_forward")
    )


def cpp_train_path_available(x: Tensor) -> bool:
    """Whether RepSO's one-conv training forward can call the C++ moments and fold kernels directly
    for x (falconnet/layers/repso_train.py, _OneConvTrainCPU)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _SUPPORTED
        and _backend_for(x) == "cpp"
        and all(_cpp_has(op) for op in _ONE_NODE_OPS)
    )


def triton_train_path_available(x: Tensor) -> bool:
    """Whether RepSO's one-conv training forward can run its Triton one-node path for x (falconnet/
    layers/repso_train.py, _OneConvTrainTriton): wherever the moments op runs on Triton."""
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _backend_for(x) == "triton"


# every C++ op the one-node path calls (an extension built before some of them existed lacks them)
_ONE_NODE_OPS = ("repso_moments_forward", "repso_moments_backward", "repso_fold_forward_params",
                 "repso_fold_backward_params", "repso_conv_weight_grad", "repso_train_backward_x")


@torch.library.custom_op("falconnet::repso_fold", mutates_args=())
def repso_fold_op(
    mean: Tensor, cov: Tensor, kernels: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if fold_cpp_available(mean):
        return getattr(torch.ops, CPP_NAMESPACE).repso_fold_forward(mean, cov, kernels, gamma, beta, eps)
    return tuple(t.clone() for t in repso_fold_ref(mean, cov, kernels, gamma, beta, eps))


@repso_fold_op.register_fake
def _(mean, cov, kernels, gamma, beta, eps):
    C, B = gamma.shape
    return mean.new_empty(mean.shape), mean.new_empty((C,)), mean.new_empty((C, B)), mean.new_empty((C, B))


@torch.library.custom_op("falconnet::repso_fold_backward", mutates_args=())
def repso_fold_backward_op(
    grad_folded: Tensor, grad_bias: Tensor, mean: Tensor, cov: Tensor, kernels: Tensor, gamma: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if fold_cpp_available(mean):
        return getattr(torch.ops, CPP_NAMESPACE).repso_fold_backward(grad_folded, grad_bias, mean, cov, kernels, gamma, eps)
    return repso_fold_backward_ref(grad_folded, grad_bias, mean, cov, kernels, gamma, eps)


@repso_fold_backward_op.register_fake
def _(grad_folded, grad_bias, mean, cov, kernels, gamma, eps):
    return (torch.empty_like(mean), torch.empty_like(cov), torch.empty_like(kernels), torch.empty_like(gamma),
            torch.empty_like(gamma))


def _fold_setup(ctx, inputs, output):
    mean, cov, kernels, gamma, beta, eps = inputs
    ctx.save_for_backward(mean, cov, kernels, gamma, eps)
    # the branch means and variances feed the running statistics only
    ctx.mark_non_differentiable(output[2], output[3])


def _fold_backward(ctx, grad_folded, grad_bias, grad_bmean, grad_bvar):
    mean, cov, kernels, gamma, eps = ctx.saved_tensors
    if grad_folded is None:
        grad_folded = torch.zeros_like(mean)
    if grad_bias is None:
        grad_bias = mean.new_zeros(mean.shape[:1])
    g = torch.ops.falconnet.repso_fold_backward(grad_folded, grad_bias, mean, cov, kernels, gamma, eps)
    return (*g, None)


repso_fold_op.register_autograd(_fold_backward, setup_context=_fold_setup)


def repso_fold(mean: Tensor, cov: Tensor, kernels: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor):
    """(folded, bias, branch means, branch variances): see repso_fold_ref. The branch means and
    variances are outputs without gradient (they feed the running statistics)."""
    return torch.ops.falconnet.repso_fold(mean, cov, kernels, gamma, beta, eps)


def repso_moments_macs(x_shape, K: int) -> int:
    """Forward: K*K sums and K*K*(K*K+1)/2 products per position and channel."""
    N, C, H, W = x_shape
    KK = K * K
    return N * C * H * W * (KK + KK * (KK + 1) // 2)


@register_flop_formula(torch.ops.falconnet.repso_moments)
def _(x_shape, K, *args, out_shape=None, **kwargs) -> int:
    return 2 * repso_moments_macs(x_shape, K)


@register_flop_formula(torch.ops.falconnet.repso_moments_backward)
def _(grad_mean_shape, grad_cov_shape, x_shape, mean_shape, K, *args, out_shape=None, **kwargs) -> int:
    # one K*K x K*K product with the centred shifts per position (the col2im sum is free)
    N, C, H, W = x_shape
    return 2 * N * C * H * W * (K * K) ** 2


def _register_cpp_flop_formulas() -> None:
    """The same counts for the C++ kernels that RepSO's one-node CPU path calls directly, so a
    FlopCounterMode around a training step sees them as it sees the custom ops."""
    ns = getattr(torch.ops, CPP_NAMESPACE)

    def formula(name):
        return register_flop_formula(getattr(ns, name)) if _cpp_has(name) else (lambda fn: fn)

    @formula("repso_moments_forward")
    def _(x_shape, K, *args, out_shape=None, **kwargs) -> int:
        return 2 * repso_moments_macs(x_shape, K)

    @formula("repso_moments_backward")
    def _(grad_mean_shape, grad_cov_shape, x_shape, mean_shape, K, *args, out_shape=None, **kwargs) -> int:
        N, C, H, W = x_shape
        return 2 * N * C * H * W * (K * K) ** 2

    @formula("repso_train_backward_x")
    def _(grad_mean_shape, grad_cov_shape, x_shape, mean_shape, grad_y_shape, weight_shape, *args, out_shape=None,
          **kwargs) -> int:
        # the moments backward (as counted above, K = 3) plus the 3x3 conv's input gradient
        N, C, H, W = x_shape
        return 2 * N * C * H * W * (81 + 9)

    @formula("repso_conv_weight_grad")
    def _(grad_y_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
        N, C, H, W = x_shape
        return 2 * N * C * H * W * 9 + N * C * H * W  # the 9 taps' products and the bias sum

    @formula("dw_conv3x3_forward")  # the one conv of the CPU node (counted as aten's conv counts it)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        N, C, Ho, Wo = out_shape
        return 2 * 9 * N * C * Ho * Wo


_register_cpp_flop_formulas()


def repso_moments(x: Tensor, K: int = 3) -> tuple[Tensor, Tensor]:
    """mean (C, K*K) and covariance (C, K*K, K*K) of the K*K zero-padded window shifts of x."""
    return torch.ops.falconnet.repso_moments(x, K)
