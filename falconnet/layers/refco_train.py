"""RefCO's training forward, exact, with one or two fused SF-Conv calls (docs/refco_training.md).

The branch form (RefCO._branch_forward) runs a grouped 1x1 conv with M*c_h outputs per k-channel
group, a BatchNorm over M*C_in/r hidden channels, a branch sum, a shuffle copy, a second grouped
conv, a BatchNorm over M*C_out channels and another branch sum. Each BatchNorm is an affine map
per channel once its batch mean and variance are known, and both sets follow without running
the branches:

* Stage 1. Branch b's hidden value A_b[g, j] = w1_b[g, j] . x_g is linear in the k channels x_g
  of group g, so its batch mean is w1_b[g, j] . mean(x_g) and its biased variance
  w1_b[g, j]^T cov(x_g) w1_b[g, j]: one mean per channel and one k x k covariance per group, from
  x alone. The M BatchNorms fold into one stage-1 weight W1 = sum_b s_b w1_b and a hidden bias
  c = sum_b (beta_b - s_b mu_b), so the hidden sum is H = W1 x + c.
* Stage 2. Branch b's output Z_b[j, t] = w2_b[j, t] . H[:, j]: its mean follows from mean(H) and
  its variance is w2_b[j, t]^T cov(H[:, j]) w2_b[j, t]. Where the hidden width G*c_h is under
  M*C_out (widening layers), the c_h covariances of G x G come from the hidden values directly
  (_HiddenCovariance); elsewhere one SF-Conv call computes every branch's output at once (W1,
  then the M stage-2 weights side by side: M*C_out channels, without c, which moves each mean by
  w2_b . c and leaves each variance) and its per-channel statistics are taken (_ChannelMoments).
  The BatchNorms fold into W2 = sum_b s2_b w2_b and the bias.
* y = act(sf_conv(x, W1, W2) + bias) + residual, with the fused epilogue.

Autograd runs through the statistics (covariances, the Z statistics, the folds: tensor ops and
three small autograd functions; the SF-Conv op has its own backward), so every gradient is the
branch form's, and the running statistics are updated as nn.BatchNorm2d does. BatchNorms in eval
mode use their running statistics in the same formulas, so an undeployed RefCO in eval mode is
one SF-Conv call too.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

import falconnet_kernels
from falconnet_kernels.ops import SUPPORTED_DTYPES, compute_dtype
from falconnet_kernels.repso_moments import stats_dtype

from .activation import apply_activation, split_for_fusion
from .repso_train import _bn_update_running, _scale_shift, _uses_batch_stats, needs_sync

# Where RefCO's batch statistics come from. "groups": per-group covariances of x (_GroupMoments,
# C_in k multiply-adds a pixel), then for stage 2 the hidden values' covariance (_HiddenCovariance,
# c_h G^2 + C_in c_h) where the hidden width is under M C_out, else every branch's output through
# one more SF-Conv call (_ChannelMoments, M C_out G). "gram": x's full C_in x C_in covariance
# (_FullMoments: one batched GEMM, C_in^2 a pixel, one read of x) and weight-side products for
# everything else. "auto": "gram" on a GPU, whose tensor cores make C_in^2 cheap and where the
# per-group forms' degenerate GEMMs (M, N <= 32, K = every pixel), their float32 copies of x and
# of the hidden values, and the narrowing layers' extra SF-Conv call made the fused form 12-47x
# slower than a dense conv + BatchNorm (H100, 2026-11-26: benchmarks/results/2026-11-26-h100-2);
# on the CPU whichever _gram_cheaper says (measured per shape there). The GPU choice is not yet
# measured.
STATS = "auto"


def _gram_cheaper(C_in: int, C_out: int, G: int, k: int, c_h: int, M: int) -> bool:
    """The CPU's STATS = "auto" choice: "gram" where x's full covariance (C_in^2 multiply-adds a
    pixel, in one clean GEMM each way) costs at most 3.5x the per-group forms' multiply-adds. Fused
    training forward+backward, batch 16, 2 threads, float32, channels_last, ms (2026-11-27), groups
    -> gram: 32->128@56 14.9 -> 8.2, 64->256@28 8.3 -> 5.3, 128->512@14 4.9 -> 4.1 (MAC ratio
    1.6 / 1.8 / 3.2); 256->1024@7 4.0 -> 4.3, 128->32@56 50.4 -> 50.9 (3.6 / 4.6); 256->64@28
    19.8 -> 32.1, 512->128@14 11.0 -> 23.7, 1024->256@7 8.2 -> 27.6 (8 / 9 / 16)."""
    stage2 = c_h * G * G + C_in * c_h if c_h * G < M * C_out else M * C_out * G
    return C_in * C_in <= 3.5 * (C_in * k + stage2)


def fused_path_applies(x: Tensor, bns) -> bool:
    """Whether refco_train_forward can stand in for the branch form: the SF-Conv op takes the
    dtype it would compute in (x's, or autocast's) on x's device, no BatchNorm needs cross-process statistics (SyncBatchNorm under
    torch.distributed: the fold would use this process's batch only), and BatchNorm's own
    "more than 1 value per channel" error is left to the branch form to raise."""
    if x.dtype not in SUPPORTED_DTYPES.get(x.device.type, ()) or compute_dtype(x) not in SUPPORTED_DTYPES[x.device.type]:
        return False
    batch = [bn for bn in bns if bn is not None and _uses_batch_stats(bn)]
    if batch and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        return False
    return not any(needs_sync(bn) for bn in batch)


def _no_double_backward() -> None:
    """The statistics nodes' backward is written for one differentiation (in-place and out=
    kernels): with create_graph=True say so, rather than fail inside it or return gradients a
    second backward would treat as constants."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "RefCO's fused training form has no double backward (a backward with create_graph=True); "
            "build the layer with RefCO(..., fused_training=False) for gradient penalties or Hessian products"
        )


def _batch_major(t: Tensor) -> Tensor:
    """t, or a contiguous copy when its batch dimension is not the outermost in memory: torch's
    CPU bmm then falls back to a select and a clone per batch entry (measured 50-190 us a call at
    CIFAR-sized maps, 5-10 us after the copy)."""
    return t if t.stride(0) >= max(t.stride(1) * t.shape[1], t.stride(2) * t.shape[2]) else t.contiguous()


class _BatchMatmul(torch.autograd.Function):
    """torch.bmm with every operand it multiplies, forward and backward, batch-major (_batch_major):
    autograd's own bmm backward multiplies transposed and expanded views, which hit the same slow path."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = _batch_major(a), _batch_major(b)
        ctx.save_for_backward(a, b)
        return torch.bmm(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = _batch_major(grad)
        grad_a = torch.bmm(grad, _batch_major(b.transpose(1, 2))) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(_batch_major(a.transpose(1, 2)), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    # _BatchMatmul only for the CPU's slow path, and not under autocast: its backward runs
    # outside autocast (always on a GPU, whose backward runs on autograd's device thread), where
    # a bfloat16 grad meets float32 operands; torch.bmm's autograd casts for itself. The compiler
    # picks its own layouts.
    if not a.is_cpu or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return torch.bmm(a, b)
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.bmm(_batch_major(a), _batch_major(b))  # inside the nodes here: no autograd node
    return _BatchMatmul.apply(a, b)


class _GroupMoments(torch.autograd.Function):
    """Per-channel mean (C,) and per-group biased covariance (C/k, k, k) of x over (N, H, W), in
    float32 (float64 for float64 x), centred first (no cancellation when a channel's mean dwarfs
    its spread). The covariances are the k x k diagonal blocks of the B x B Gram matrices of
    channel blocks of B = a few groups (>= 16 channels where the groups allow): one batched
    GEMM over the pixels, whose rows are then 64-byte runs of a channels_last x, where k = 4
    groups alone would make it gather 16-byte pieces (3-4x slower). The backward is another
    GEMM: grad_x = x_centred (g + g^T) / count + grad_mean / count, g block-diagonal. It centres
    x again rather than keep the float32 copy from the forward (x is kept by the SF-Conv calls
    anyway): one more pass over x against a saved activation of x's width."""

    @staticmethod
    def forward(ctx, x, k, dtype):
        with torch.autocast(x.device.type, enabled=False):  # a bfloat16 Gram would lose the statistics
            N, C, H, W = x.shape
            mean = x.sum((0, 2, 3), dtype=dtype) / (N * H * W)
            centred, channels_last, q = _centred_blocks(x, mean, k)
            nb, B = C // k // q, k * q
            if channels_last:  # (blocks, pixels, B)
                gram = _bmm(centred.transpose(1, 2), centred)
            else:  # (images x blocks, B, H*W): one GEMM per image and block
                gram = _bmm(centred, centred.transpose(1, 2)).view(N, nb, B, B).sum(0)
            cov = _block_diagonal_part(gram, q, k, k) / (N * H * W)
        ctx.save_for_backward(x, mean)
        ctx.k = k
        return mean, cov

    @staticmethod
    def backward(ctx, grad_mean, grad_cov):
        _no_double_backward()
        x, mean = ctx.saved_tensors
        N, C, H, W = x.shape
        k, count = ctx.k, N * H * W
        with torch.autocast(x.device.type, enabled=False):
            centred, channels_last, q = _centred_blocks(x, mean, k)
            G, B = C // k, k * q
            nb = G // q
            if grad_mean is None:
                grad_mean = mean.new_zeros(C)
            if grad_cov is None:
                grad_cov = mean.new_zeros(G, k, k)
            block_diag = _block_diagonal((grad_cov + grad_cov.transpose(1, 2)) / count, q)  # (nb, B, B)
            shift = grad_mean / count
            if channels_last:
                grad = _bmm(centred, block_diag)  # (blocks, pixels, B)
                grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
                rows = grad_x.permute(0, 2, 3, 1).view(count, nb, B)
                if torch.compiler.is_compiling():  # functionalization takes copy_ into a view, not out=
                    rows.copy_(grad.transpose(0, 1) + shift.view(1, nb, B))
                else:  # the mean's share added while copied back into the (pixels, C) rows: one pass
                    torch.add(grad.transpose(0, 1), shift.view(1, nb, B), out=rows)
                return grad_x, None, None
            diag = block_diag.unsqueeze(0).expand(N, nb, B, B).reshape(N * nb, B, B)
            grad = torch.baddbmm(shift.view(1, nb, B, 1).expand(N, nb, B, 1).reshape(N * nb, B, 1), diag, centred)
            return grad.view(N, C, H, W).to(x.dtype), None, None


def _centred_blocks(x: Tensor, mean: Tensor, k: int) -> tuple[Tensor, bool, int]:
    """x - mean in mean's dtype, laid out for _GroupMoments' GEMMs: (blocks, pixels, B) for a
    channels_last x (centred while copied out of its (pixels, C) rows), else (images x blocks,
    B, H*W) in x's own order; with whether x was channels_last and q, the groups a block."""
    N, C, H, W = x.shape
    G, count = C // k, N * H * W
    q = max(d for d in range(1, G + 1) if G % d == 0 and (d == 1 or k * d <= 16))
    B, nb = k * q, G // q
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        centred = torch.empty((nb, count, B), dtype=mean.dtype, device=x.device)
        torch.sub(x.permute(0, 2, 3, 1).reshape(count, nb, B).transpose(0, 1), mean.view(nb, 1, B), out=centred)
        return centred, True, q
    centred = (x.to(mean.dtype) - mean.view(1, C, 1, 1)).contiguous().view(N * nb, B, H * W)
    return centred, False, q


def _block_diagonal(w: Tensor, q: int) -> Tensor:
    """(G, r, c) per-group matrices -> (G/q, q*r, q*c): q groups a block on its diagonal."""
    G, r, c = w.shape
    out = w.new_zeros(G // q, q, r, q, c)
    torch.diagonal(out, dim1=1, dim2=3).copy_(w.view(G // q, q, r, c).permute(0, 2, 3, 1))
    return out.view(G // q, q * r, q * c)


def _block_diagonal_part(m: Tensor, q: int, r: int, c: int) -> Tensor:
    """The inverse: the (G, r, c) diagonal blocks of (G/q, q*r, q*c) matrices."""
    nb = m.shape[0]
    return torch.diagonal(m.view(nb, q, r, q, c), dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(nb * q, r, c)


class _HiddenCovariance(torch.autograd.Function):
    """For every hidden index j, the G x G covariance over (N, H, W) of the stage-1 outputs
    H[g, j] = w1[g, j] . x_g: (c_h, G, G). Stage 2 branch b's output w2_b[j, t] . H[:, j] then has
    variance w2_b[j, t]^T cov[j] w2_b[j, t]. c_h G^2 multiply-adds a pixel (two batched GEMMs:
    the hidden values from the centred x, then their Gram matrices), against M C_out G for the
    SF-Conv call that computes every branch's output (refco_train_forward takes the cheaper);
    nothing of the hidden width is kept for the backward, which recomputes it. mean is x's
    per-channel mean: the hidden values are centred, so no gradient flows through it."""

    @staticmethod
    def forward(ctx, x, mean, w1):
        with torch.autocast(x.device.type, enabled=False):
            hidden, _ = _HiddenCovariance._hidden(x, mean, w1)
            cov = _bmm(hidden, hidden.transpose(1, 2)) / (x.shape[0] * x.shape[2] * x.shape[3])
        ctx.save_for_backward(x, mean, w1)
        return cov

    @staticmethod
    def _hidden(x, mean, w1):
        """(hidden (c_h, G, P) centred, (centred x blocks, w1 blocks, channels_last, q))."""
        N, C, H, W = x.shape
        G, c_h, k = w1.shape
        centred, channels_last, q = _centred_blocks(x, mean, k)
        nb = G // q
        blocks = _block_diagonal(w1.to(mean.dtype), q)  # (nb, q*c_h, B)
        if channels_last:  # centred (nb, P, B) -> (nb, P, q*c_h)
            h = _bmm(centred, blocks.transpose(1, 2))
            hidden = h.view(nb, -1, q, c_h).permute(3, 0, 2, 1).reshape(c_h, G, -1)
        else:  # centred (N*nb, B, HW) -> (N*nb, q*c_h, HW)
            h = _bmm(blocks.repeat(N, 1, 1), centred)
            hidden = h.view(N, nb, q, c_h, H * W).permute(3, 1, 2, 0, 4).reshape(c_h, G, -1)
        return hidden, (centred, blocks, channels_last, q)

    @staticmethod
    def backward(ctx, grad_cov):
        _no_double_backward()
        x, mean, w1 = ctx.saved_tensors
        N, C, H, W = x.shape
        G, c_h, k = w1.shape
        count = N * H * W
        with torch.autocast(x.device.type, enabled=False):
            hidden, (centred, blocks, channels_last, q) = _HiddenCovariance._hidden(x, mean, w1)
            nb = G // q
            grad_hidden = _bmm((grad_cov + grad_cov.transpose(1, 2)).to(hidden.dtype) / count, hidden)  # (c_h, G, P)
            grad_x = grad_w1 = None
            if channels_last:
                gh = grad_hidden.view(c_h, nb, q, count).permute(1, 3, 2, 0).reshape(nb, count, q * c_h)
                if ctx.needs_input_grad[2]:
                    grad_w1 = _block_diagonal_part(_bmm(gh.transpose(1, 2), centred), q, c_h, k)
                if ctx.needs_input_grad[0]:
                    g = _bmm(gh, blocks)  # (nb, P, B)
                    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
                    grad_x.permute(0, 2, 3, 1).view(count, nb, q * k).copy_(g.transpose(0, 1))
            else:
                gh = grad_hidden.view(c_h, nb, q, N, H * W).permute(3, 1, 2, 0, 4).reshape(N * nb, q * c_h, H * W)
                if ctx.needs_input_grad[2]:
                    gw = _bmm(gh, centred.transpose(1, 2)).view(N, nb, q * c_h, q * k).sum(0)
                    grad_w1 = _block_diagonal_part(gw, q, c_h, k)
                if ctx.needs_input_grad[0]:
                    grad_x = _bmm(blocks.transpose(1, 2).repeat(N, 1, 1), gh).view(N, C, H, W).to(x.dtype)
        return grad_x, None, None if grad_w1 is None else grad_w1.to(w1.dtype)


class _FullMoments(torch.autograd.Function):
    """Per-channel mean (C,) and the full biased covariance (C, C) of x over (N, H, W), float32
    (float64 for float64 x): Gram matrices of chunks of whole images (_gram_chunks; on the CPU one
    over every pixel, NCHW x taken to channels_last rows first) in one batched GEMM (C^2
    multiply-adds a pixel), the chunks summed in float64. Every BatchNorm statistic of RefCO
    follows from these two by weight-side products (STATS = "gram"): stage 1's variances from the
    k x k diagonal blocks, stage 2's from cov(H[:, j]) = V_j^T S V_j. On a GPU, bfloat16/float16 x
    goes into the GEMM as it is, with float32 output (products of 16-bit values are exact in
    float32; uncentred, as RepSO's bf16 moments); other x is shifted by its first pixel's values
    and widened to float32 first, so a channel's mean does not cancel against its spread. The
    backward is one more GEMM: grad_x = (x - mean) (G + G^T) / count + grad_mean / count."""

    @staticmethod
    def forward(ctx, x, dtype):
        with torch.autocast(x.device.type, enabled=False):
            N, C, H, W = x.shape
            count = N * H * W
            raw = _raw16(x)
            if raw:
                shift, xs = None, x
            else:
                shift = x[:1, :, :1, :1].to(dtype)
                xs = x.to(dtype) - shift
                if not x.is_cuda:  # the CPU's one GEMM over every pixel wants (pixels, C) rows
                    xs = xs.contiguous(memory_format=torch.channels_last)
            a, b = _image_matrices(xs)
            if b.is_contiguous():  # channels_last: (pixels, C) rows, cut into chunks of whole images
                rows = b.reshape(_gram_chunks(N, C, x.is_cuda), -1, C)
                a, b = rows.transpose(1, 2), rows
            # else NCHW: a Gram matrix an image
            gram = (_bmm32(a, b) if raw else torch.bmm(a, b)).sum(0, dtype=torch.float64)
            mean_s = xs.sum((0, 2, 3), dtype=torch.float64) / count
            cov = gram / count - mean_s[:, None] * mean_s[None, :]
            mean = mean_s if shift is None else mean_s + shift.view(C).double()
        mean = mean.to(dtype)
        ctx.save_for_backward(x, mean)
        return mean, cov.to(dtype)

    @staticmethod
    def backward(ctx, grad_mean, grad_cov):
        _no_double_backward()
        x, mean = ctx.saved_tensors
        N, C, H, W = x.shape
        count = N * H * W
        with torch.autocast(x.device.type, enabled=False):
            g = mean.new_zeros(C, C) if grad_cov is None else (grad_cov + grad_cov.t()) / count
            offset = -(mean @ g)
            if grad_mean is not None:
                offset = offset + grad_mean / count
            # per image grad_n = g x_n + offset (g symmetric), in x's layout
            rows = _image_matrices(x)[1]
            if _raw16(x) and rows.is_contiguous():
                # 16-bit channels_last x on a GPU, as the forward took it: tensor-core GEMMs with
                # float32 output, g as two 16-bit parts (~2^-17 relative), no float32 copy of x
                rows = rows.reshape(count, C)
                g_hi = g.to(x.dtype)
                grad = _mm32(rows, g_hi)
                grad += _mm32(rows, (g - g_hi.to(g.dtype)).to(x.dtype))
                grad += offset.view(1, C).float()
                return grad.view(N, H, W, C).permute(0, 3, 1, 2).to(x.dtype), None
            a, b = _image_matrices(x.to(mean.dtype))
            if b.is_contiguous():  # channels_last: the (N*H*W, C) rows times g, one GEMM
                grad = torch.addmm(offset.view(1, C), b.reshape(count, C), g)
                grad = grad.view(N, H, W, C).permute(0, 3, 1, 2)
            else:  # (C, C) times every image's (C, H*W); matmul broadcasts g without copying it
                grad = (torch.matmul(g, a) + offset.view(1, C, 1)).view(N, C, H, W)
        return grad.to(x.dtype), None


def _gram_chunks(N: int, C: int, gpu: bool) -> int:
    """How many partial Gram matrices _FullMoments forms over a channels_last x of N images: on the
    CPU one (a single GEMM over every pixel: a GEMM an image, K = H*W, ran ~10x slower at 7x7); on
    a GPU enough for its parallelism (one an image) while their float32 partials stay within 64 MB
    (a divisor of N: 16 of 1024 x 1024 at C = 1024, where one an image at batch 128 would be 512
    MB)."""
    if not gpu:
        return 1
    return max(d for d in range(1, N + 1) if N % d == 0 and (d == 1 or d * C * C <= 1 << 24))


def _raw16(x: Tensor) -> bool:
    """16-bit x on a GPU in eager mode: _FullMoments' GEMMs take it as it is, with float32 output
    (torch's out_dtype matmuls, CUDA only; _mm32, _bmm32). Not while torch.compile traces: its
    lowerings of the out_dtype matmuls have had bugs (pytorch/pytorch#163880), and it fuses the
    float32 conversion the other path makes anyway."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling()


_OUT_DTYPE_MATMUL = [True]  # cleared if this torch build's CUDA matmuls refuse out_dtype


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    return _matmul32(torch.mm, a, b)


def _bmm32(a: Tensor, b: Tensor) -> Tensor:
    return _matmul32(torch.bmm, a, b)


def _matmul32(op, a: Tensor, b: Tensor) -> Tensor:
    """op(a, b) with float32 output from 16-bit operands (torch >= 2.8 on CUDA); where the build
    refuses out_dtype, the same product on float32 copies (the same values, more memory traffic),
    with one warning."""
    if _OUT_DTYPE_MATMUL[0]:
        try:
            return op(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            _OUT_DTYPE_MATMUL[0] = False
            warnings.warn(f"RefCO's statistics: {op.__name__} with out_dtype=float32 is not available here ({exc}); "
                          "multiplying float32 copies instead", stacklevel=2)
    return op(a.float(), b.float())


def _image_matrices(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x_n as (N, C, H*W), its transpose (N, H*W, C)), views where x's layout allows (channels_last
    or NCHW): the two operands of the per-image Gram matrices."""
    N, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).reshape(N, H * W, C)
        return rows.transpose(1, 2), rows
    cols = x.reshape(N, C, H * W)
    return cols, cols.transpose(1, 2)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of z over (N, H, W), in float32 (float64 for float64
    z), as E[z^2] - mean^2: the caller centres z (the SF-Conv call subtracts the analytic mean as
    its bias), so nothing cancels. torch.var_mean reduces a (N, C, H, W) tensor over (0, 2, 3) at
    a tenth of the speed of sum on the CPU, and its autograd backward takes four passes over z;
    this backward is one (grad_z = a * z + b per channel)."""

    @staticmethod
    def forward(ctx, z):
        dims, count = (0, 2, 3), z.numel() // z.shape[1]
        zs = z if z.dtype in (torch.float32, torch.float64) else z.float()
        mean = zs.sum(dims) / count
        var = (zs.square().sum(dims) / count - mean * mean).clamp_min(0)
        ctx.save_for_backward(z, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        _no_double_backward()
        z, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        a = grad_var * (2.0 / ctx.count)
        b = grad_mean / ctx.count - a * mean
        shape = (1, -1, 1, 1)
        return torch.addcmul(b.to(z.dtype).view(shape), z, a.to(z.dtype).view(shape))


def refco_train_forward(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bn1: Optional[nn.BatchNorm2d],
    bn2: Optional[nn.BatchNorm2d],
    activation: str = "none",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """act(sum_b bn2_b(w2_b . shuffle(sum_b bn1_b(w1_b . x)))) + residual, exactly, in two SF-Conv
    calls (one when bn2 uses running statistics or is None). weight1 (M, G, c_h, k), weight2
    (M, c_h, m, G); bn1 over M*G*c_h channels (b*G*c_h + g*c_h + j), bn2 over M*C_out
    (b*C_out + j*m + t), as in RefCO. Training-mode BatchNorms use batch statistics and update
    their running statistics in place."""
    M, G, c_h, k = weight1.shape
    m = weight2.shape[2]
    N, C_in, H, W = x.shape
    count = N * H * W
    dtype = stats_dtype(x.dtype)
    w1, w2 = weight1.to(dtype), weight2.to(dtype)
    mean_x = None

    # STATS: every statistic from x's full covariance, or from the per-group forms
    gram = STATS == "gram" or (STATS == "auto" and (x.is_cuda or _gram_cheaper(C_in, m * c_h, G, k, c_h, M)))
    cov_full = None

    # stage 1: the M BatchNorms folded into W1 (G, c_h, k) and the hidden bias c (G, c_h)
    if bn1 is None:
        W1, c = w1.sum(0), None
    else:
        mean1 = var1 = None
        if _uses_batch_stats(bn1):
            if gram:
                mean_x, cov_full = _FullMoments.apply(x, dtype)
                cov_x = cov_full.view(G, k, G, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, k, k) blocks
            else:
                mean_x, cov_x = _GroupMoments.apply(x, k, dtype)
            mean1 = (w1 * mean_x.view(1, G, 1, k)).sum(-1).reshape(-1)
            # w^T cov_g w for every row w of group g's M*c_h filters: one (M*c_h, k) @ (k, k)
            # product a group. The broadcast form (M, G, c_h, k, k) temporaries took ~10x longer
            # forward+backward (949 vs 95 us at M = 3, G = 8, c_h = 64, k = 16; 1 thread): a fixed
            # cost a step, whatever the batch, ~half of a RefCO layer's time at CIFAR-sized maps
            wg = w1.permute(1, 0, 2, 3).reshape(G, M * c_h, k)
            var1 = (_bmm(wg, cov_x) * wg).sum(-1).view(G, M, c_h).transpose(0, 1).reshape(-1).clamp_min(0)
            _bn_update_running(bn1, mean1.detach(), var1.detach(), count)
        scale1, shift1 = _scale_shift(bn1, mean1, var1, dtype)
        W1 = (scale1.view(M, G, c_h, 1) * w1).sum(0)
        c = shift1.view(M, G, c_h).sum(0)

    # c reaches branch b's output channel j*m + t through w2_b[j, t, :]
    d = None if c is None else (w2 * c.t().view(1, c_h, 1, G)).sum(-1)  # (M, c_h, m)
    if bn2 is None:
        W2 = w2.sum(0)
        bias = None if d is None else d.sum(0)
    else:
        mean2 = var2 = None
        if _uses_batch_stats(bn2):
            w2_all = w2.permute(1, 0, 2, 3).reshape(c_h, M * m, G)  # row j*(M*m) + b*m + t: every branch
            if gram and cov_full is None:
                mean_x, cov_full = _FullMoments.apply(x, dtype)
            if mean_x is None:
                mean_x = x.to(dtype).mean(dim=(0, 2, 3))
            if gram:
                # cov(H[:, j])[g, h] = W1[g, j]^T S[g-block, h-block] W1[h, j]: c_h C_in^2 multiply-adds
                # on the weights, whatever the batch
                Y = _bmm(W1, cov_full.view(G, k, G * k)).view(G, c_h, G, k)
                cov_h = (Y * W1.transpose(0, 1).unsqueeze(0)).sum(-1).permute(1, 0, 2)  # (c_h, G, G)
                hidden_mean = (W1 * mean_x.view(G, 1, k)).sum(-1)  # (G, c_h), without c
                mean_z = (w2_all * hidden_mean.t().unsqueeze(1)).sum(-1).reshape(-1)
                var_z = (_bmm(w2_all, cov_h) * w2_all).sum(-1).clamp_min(0).reshape(-1)
            elif c_h * G < M * m * c_h:
                # the hidden width under M*C_out: the branches' output statistics from the G x G
                # covariance of the hidden values per hidden index (c_h G^2 multiply-adds a pixel)
                cov_h = _HiddenCovariance.apply(x, mean_x.detach(), W1)
                hidden_mean = (W1 * mean_x.view(G, 1, k)).sum(-1)  # (G, c_h), without c
                mean_z = (w2_all * hidden_mean.t().unsqueeze(1)).sum(-1).reshape(-1)
                var_z = (_bmm(w2_all, cov_h) * w2_all).sum(-1).clamp_min(0).reshape(-1)
            else:
                # else from every branch's output at once (M*C_out channels, M*C_out*G a pixel),
                # minus its mean as known from x's (a constant shift: exact for the variance and,
                # detached, for every gradient; it keeps _ChannelMoments free of cancellation)
                with torch.no_grad():
                    hidden_mean = (W1 * mean_x.view(G, 1, k)).sum(-1)  # (G, c_h)
                    shift = (w2_all * hidden_mean.t().unsqueeze(1)).sum(-1).reshape(-1)
                    # the shift as the op applies it: rounded to its dtype (autocast's, if on)
                    shift = shift.to(compute_dtype(x)).to(dtype)
                z = falconnet_kernels.sf_conv(x, W1.to(x.dtype), w2_all.to(x.dtype), (-shift).to(x.dtype))
                mean_z, var_z = _ChannelMoments.apply(z)
                mean_z = mean_z + shift
            var2 = var_z.view(c_h, M, m).transpose(0, 1).reshape(-1)
            mean2 = mean_z.view(c_h, M, m).transpose(0, 1)
            mean2 = (mean2 if d is None else mean2 + d).reshape(-1)
            _bn_update_running(bn2, mean2.detach(), var2.detach(), count)
        scale2, shift2 = _scale_shift(bn2, mean2, var2, dtype)
        scale2, shift2 = scale2.view(M, c_h, m), shift2.view(M, c_h, m)
        W2 = (scale2.unsqueeze(-1) * w2).sum(0)
        bias = (shift2 if d is None else shift2 + scale2 * d).sum(0)

    fused, after = split_for_fusion(activation)
    W1, W2 = W1.to(x.dtype), W2.to(x.dtype)
    bias = None if bias is None else bias.reshape(-1).to(x.dtype)
    if after == "none":
        return falconnet_kernels.sf_conv(x, W1, W2, bias, residual, fused)
    y = apply_activation(falconnet_kernels.sf_conv(x, W1, W2, bias), after)
    return y if residual is None else y + residual
