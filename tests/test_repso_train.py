"""RepSO's one-conv training forward (falconnet/layers/repso_train.py) against the branch-by-branch
sum it replaces, and the shifted-window moments op (falconnet_kernels/repso_moments.py) against its
reference, on every backend this machine has (C++, reference, Triton under the interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from saved_storages import saved_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from falconnet.layers.repso import TABLE3_CONFIGS, RepSO
from falconnet.layers.repso_train import repso_train_forward
from falconnet_kernels import repso_moments as rm

ROWS = sorted(row for row in TABLE3_CONFIGS if row != "A")  # row A has no branch: the identity map


def cpp_built() -> bool:
    return rm._cpp_built()


BACKENDS = ["torch", "cpp", "triton"]
# the Triton tests below run on the GPU when there is one, else on CPU tensors in the interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def use_triton(monkeypatch) -> None:
    """The Triton kernels with one untimed tile each (no autotuning on a GPU) and true float32
    convs (cuDNN's default TF32 would dominate a float32 comparison on a GPU)."""
    use_backend(monkeypatch, "triton")
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def use_backend(monkeypatch, backend: str) -> None:
    if backend == "cpp":
        if not cpp_built():
            pytest.skip("the C++ extension was built without csrc/cpu/repso_moments.cpp")
        monkeypatch.delenv("FALCONNET_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FALCONNET_BACKEND", backend)


# ---------------------------------------------------------------------------------------------
# helpers


def make_repso(C: int, row: str = "T", dtype=torch.float64, momentum=0.1) -> RepSO:
    """A RepSO of a Table 3 row with random weights and BatchNorm parameters/statistics."""
    module = RepSO(C, **TABLE3_CONFIGS[row]).to(dtype).train()
    bns = [b.bn for b in module.branches] + ([module.identity_bn] if module.identity_bn is not None else [])
    with torch.no_grad():
        for b in module.branches:
            b.conv.weight.normal_(0, 0.5)
        for bn in bns:
            bn.momentum = momentum
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return module


def branch_sum(module: RepSO, x: torch.Tensor) -> torch.Tensor:
    """The definition: sum_b bn_b(conv_b(x)) + identity_bn(x), straight from the modules."""
    out = sum(b.bn(b.conv(x)) for b in module.branches)
    if module.identity_bn is not None:
        out = out + module.identity_bn(x)
    return out


def fused(module: RepSO, x: torch.Tensor, conv: str = "auto", one_node: bool = True) -> torch.Tensor:
    return repso_train_forward(
        x, [b.conv.weight for b in module.branches], [b.bn for b in module.branches], module.identity_bn, conv=conv,
        one_node=one_node,
    )


def parameters(module: RepSO) -> list[torch.nn.Parameter]:
    params = [b.conv.weight for b in module.branches]
    for b in module.branches:
        params += [b.bn.weight, b.bn.bias]
    if module.identity_bn is not None:
        params += [module.identity_bn.weight, module.identity_bn.bias]
    return params


def buffers(module: RepSO) -> list[torch.Tensor]:
    return [buf for name, buf in module.named_buffers()]


def run(fn, module: RepSO, x: torch.Tensor, grad_y: torch.Tensor, autocast: bool = False):
    """(output, grads for x and every parameter, buffers after the step) of fn; with autocast the
    forward under bfloat16 autocast and the backward outside it, as training runs (on a GPU the
    backward runs on autograd's device thread, where autocast is never on)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = fn(module, x)
    grads = torch.autograd.grad(y, [x] + parameters(module), grad_y.to(y.dtype))
    return y.detach(), list(grads), [b.clone() for b in buffers(module)]


def max_err(a, b) -> float:
    return max((u.double() - v.double()).abs().max().item() for u, v in zip(a, b))


def scale(t) -> float:
    return max(v.double().abs().max().item() for v in t)


def batchnorm_stats_error(x: torch.Tensor) -> float:
    """Relative error (to the largest value) of nn.BatchNorm2d's own batch mean and biased variance
    of x, computed in x's dtype (float32 statistics), against float64."""
    C = x.shape[1]
    M = x.numel() // C
    errors = []
    for data in (x, x.double()):
        running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
        rm_, rv_ = running_mean.to(rm.stats_dtype(data.dtype)), running_var.to(rm.stats_dtype(data.dtype))
        F.batch_norm(data, rm_, rv_, training=True, momentum=1.0)
        errors.append((rm_.double(), rv_.double() * (M - 1) / M))
    (m, v), (ref_m, ref_v) = errors
    return max(((m - ref_m).abs().max() / ref_m.abs().max()).item(), ((v - ref_v).abs().max() / ref_v.abs().max()).item())


# ---------------------------------------------------------------------------------------------
# the moments op


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("K", [1, 3, 5, 7])
# (5, 2, 3, 60): the C++ kernels interleave 2 images per row there, leaving a partial group of 1
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 17, 4, 9), (3, 2, 1, 2), (5, 2, 3, 60)], ids=str)
def test_moments_match_reference(monkeypatch, backend, K, shape):
    use_backend(monkeypatch, backend)
    dtypes = [torch.float32] if backend == "triton" else [torch.float64, torch.float32, torch.bfloat16]
    for dtype in dtypes:
        # an offset mean: the kernels must not lose the covariance to cancellation
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype)
        if backend == "triton":
            x = x.contiguous(memory_format=torch.channels_last)
        mean, cov = rm.repso_moments(x, K)
        ref_mean, ref_cov = rm.repso_moments_ref(x.double(), K)
        assert mean.dtype == rm.stats_dtype(dtype) and cov.shape == (shape[1], K * K, K * K)
        # float64: about 1e-15 relative. C++ accumulates in double: float32 output rounding, a few
        # ulps. Triton accumulates 32-position tiles in float32: ~32 ulps of sum |w_p w_q|.
        tol = 1e-12 if dtype == torch.float64 else (4e-6 if backend == "triton" else 4e-7)
        assert (mean.double() - ref_mean).abs().max() <= tol * ref_mean.abs().max()
        assert (cov.double() - ref_cov).abs().max() <= tol * ref_cov.abs().max()
        g_mean, g_cov = torch.randn_like(ref_mean), torch.randn_like(ref_cov)
        gx = torch.ops.falconnet.repso_moments_backward(g_mean.to(mean.dtype), g_cov.to(mean.dtype), x, mean, K)
        ref_gx = rm.repso_moments_backward_ref(g_mean, g_cov, x.double(), ref_mean, K)
        # grad_x is stored in x's dtype: its rounding (2^-8 for bf16, 2^-24 for float32) bounds the error
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
        assert (gx.double() - ref_gx).abs().max() <= tol * ref_gx.abs().max()


# The C++ channels_last fast path (K = 3, C a multiple of 16: vectorized across channels, images
# grouped per plane set): odd sizes, 1-wide maps, a batch of 1, several channel blocks.
# (3, 32, 15, 14): 210 positions an image, where the backward walks images in the outer loop
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (3, 32, 1, 2), (1, 16, 4, 9), (16, 48, 7, 7), (2, 16, 1, 1),
                                   (3, 32, 15, 14)], ids=str)
def test_moments_channels_last_fast_path(monkeypatch, shape):
    use_backend(monkeypatch, "cpp")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype).contiguous(memory_format=torch.channels_last)
        mean, cov = rm.repso_moments(x, 3)
        ref_mean, ref_cov = rm.repso_moments_ref(x.double(), 3)
        # float64: double throughout, ~1e-15 relative. float32 and bf16 x: float products and chunked
        # float sums added into double totals; the bar is BatchNorm's own float32 batch statistics on
        # the same x (3x its error, at least a few float32 ulps)
        tol = 1e-12 if dtype == torch.float64 else max(4e-7, 3 * batchnorm_stats_error(x))
        assert (mean.double() - ref_mean).abs().max() <= tol * ref_mean.abs().max()
        assert (cov.double() - ref_cov).abs().max() <= tol * ref_cov.abs().max()
        g_mean, g_cov = torch.randn_like(ref_mean), torch.randn_like(ref_cov)
        gx = torch.ops.falconnet.repso_moments_backward(g_mean.to(mean.dtype), g_cov.to(mean.dtype), x, mean, 3)
        assert gx.is_contiguous(memory_format=torch.channels_last)
        ref_gx = rm.repso_moments_backward_ref(g_mean, g_cov, x.double(), ref_mean, 3)
        # grad_x is stored in x's dtype: its rounding bounds the error
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
        assert (gx.double() - ref_gx).abs().max() <= tol * ref_gx.abs().max()


# The channels_last fast path of the one-conv backward (falconnet/layers/repso_train.py,
# _OneConvTrainCPU): the conv's weight and bias gradients, and grad_x = moments backward + the conv's
# input gradient in one pass. Against float64 (aten's conv backward and the moments reference);
# float32 and bf16 within 3x PyTorch's own conv backward error at that dtype, plus 4 output ulps.
# (2, 16, 12, 19) and (3, 48, 14, 15): >= 196 positions an image, the grad_x kernel's image-major order
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (3, 32, 1, 2), (1, 16, 4, 9), (4, 48, 7, 7), (2, 16, 12, 19),
                                   (3, 48, 14, 15)], ids=str)
def test_cl3_conv_weight_grad_and_fused_grad_x(shape):
    C = shape[1]
    cpp = torch.ops.falconnet_C
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        cl = dict(memory_format=torch.channels_last)
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 5).to(dtype).contiguous(**cl)
        grad_y = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(**cl)
        w = torch.randn(C, 1, 3, 3, dtype=torch.float64).to(dtype)

        def conv_backward(gy, xx, ww):
            return torch.ops.aten.convolution_backward(
                gy, xx, ww, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C, [True, True, True])

        ref_gx, ref_gw, ref_gb = conv_backward(grad_y.double(), x.double(), w.double())
        pt_gx, pt_gw, pt_gb = conv_backward(grad_y, x, w)  # PyTorch's own, at this dtype
        gw, gb = cpp.repso_conv_weight_grad(grad_y, x)
        assert gw.shape == (C, 1, 3, 3) and gb.shape == (C,) and gw.dtype == rm.stats_dtype(dtype)
        # float64: PyTorch is exact against itself, the difference is summation order (~M ulps)
        ulp = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        assert max_err([gw], [ref_gw]) <= 3 * max_err([pt_gw], [ref_gw]) + ulp * scale([ref_gw])
        assert max_err([gb], [ref_gb]) <= 3 * max_err([pt_gb], [ref_gb]) + ulp * scale([ref_gb])

        mean, _ = rm.repso_moments(x, 3)
        g_mean = torch.randn(C, 9, dtype=torch.float64)
        g_cov = torch.randn(C, 9, 9, dtype=torch.float64)
        gx = cpp.repso_train_backward_x(g_mean.to(mean.dtype), g_cov.to(mean.dtype), x, mean, grad_y, w)
        assert gx.is_contiguous(**cl) and gx.dtype == dtype
        ref_mean, _ = rm.repso_moments_ref(x.double(), 3)
        moments_part = rm.repso_moments_backward_ref(g_mean, g_cov, x.double(), ref_mean, 3)
        ref = moments_part + ref_gx
        # PyTorch's own error for this sum: its conv input gradient at this dtype, plus the moments
        # part rounded to this dtype
        own = max_err([pt_gx], [ref_gx]) + max_err([moments_part.to(dtype)], [moments_part])
        assert max_err([gx], [ref]) <= 3 * own + ulp * scale([ref]), (dtype, max_err([gx], [ref]), own)


def test_cl3_backward_ops_reject_other_layouts():
    cpp = torch.ops.falconnet_C
    x = torch.randn(2, 16, 5, 5)  # NCHW
    with pytest.raises(RuntimeError, match="channels_last"):
        cpp.repso_conv_weight_grad(x, x)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)  # C not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpp.repso_conv_weight_grad(x, x)


# Maps under 3 pixels high or wide are mostly padding, whose shifted value is the constant -a: the
# fast path computes them in double (in float their a^2 products would swamp covariance entries
# that are 0), so even a channel mean 10 std away from 0 stays at the usual bar.
@pytest.mark.parametrize("shape", [(8, 16, 1, 7), (8, 16, 7, 1), (4, 16, 1, 1), (8, 16, 2, 7), (3, 32, 1, 3)], ids=str)
def test_moments_fast_path_small_maps_large_mean(monkeypatch, shape):
    use_backend(monkeypatch, "cpp")
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 20).float().contiguous(memory_format=torch.channels_last)
    mean, cov = rm.repso_moments(x, 3)
    ref_mean, ref_cov = rm.repso_moments_ref(x.double(), 3)
    tol = max(4e-7, 3 * batchnorm_stats_error(x))
    assert (mean.double() - ref_mean).abs().max() <= tol * ref_mean.abs().max()
    assert (cov.double() - ref_cov).abs().max() <= tol * ref_cov.abs().max()


def test_cpp_ops_reject_empty_and_misshapen_inputs():
    cpp = torch.ops.falconnet_C
    for shape in ((0, 16, 4, 4), (2, 16, 0, 4), (0, 3, 4, 4)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="at least one position"):
            cpp.repso_moments_forward(x, 3)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    mean, cov = cpp.repso_moments_forward(x, 3)
    with pytest.raises(RuntimeError, match="grad_mean must have shape"):
        cpp.repso_moments_backward(torch.zeros(3), torch.zeros(16, 9, 9), x, mean, 3)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpp.repso_train_backward_x(torch.zeros(16, 9), torch.zeros(16, 9, 9), x, mean, x, torch.zeros(9, 16))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fold_op_matches_reference(monkeypatch, backend):
    """falconnet::repso_fold (C++ on the CPU) against its definition, with gradcheck and opcheck;
    a kernel with zero taps and a branch whose variance clamps to 0 included."""
    use_backend(monkeypatch, backend)
    C, B, KK = 13, 7, 9  # 13: one full group of 8 channels and a partial one
    mean, cov = rm.repso_moments_ref(torch.randn(3, C, 6, 5, dtype=torch.float64), 3)
    kernels = torch.randn(C, B, KK, dtype=torch.float64)
    kernels[:, 3, :3] = 0
    kernels[0, 5] = 0  # a zero kernel: variance 0, BatchNorm of a constant
    gamma, beta = torch.rand(C, B, dtype=torch.float64) + 0.5, torch.randn(C, B, dtype=torch.float64)
    eps = torch.full((B,), 1e-5, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (mean, cov, kernels, gamma, beta)]
    out = rm.repso_fold(*inputs, eps)
    ref = rm.repso_fold_ref(*inputs, eps)
    for a, b in zip(out, ref):
        assert (a - b).abs().max() <= 1e-13 * max(1.0, b.abs().max().item())
    assert not out[2].requires_grad and not out[3].requires_grad  # they feed the running statistics only
    g = (torch.randn(C, KK, dtype=torch.float64), torch.randn(C, dtype=torch.float64))
    g_ours = torch.autograd.grad(out[:2], inputs, g)
    g_ref = torch.autograd.grad(ref[:2], inputs, g)
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())
    torch.autograd.gradcheck(lambda *t: rm.repso_fold(*t, eps)[:2], inputs)
    torch.library.opcheck(torch.ops.falconnet.repso_fold, (mean, cov, kernels, gamma, beta, eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K, shapes, identity", [
    (3, [(3, 3), (3, 3), (1, 3), (3, 1), (1, 1)], True),
    (3, [(1, 3), (3, 3)], False),
    (5, [(5, 5), (3, 3), (1, 5), (5, 1), (1, 1)], True),
], ids=["K3-identity", "K3", "K5-identity"])
def test_fold_params_ops_match_dense_fold(K, shapes, identity, dtype):
    """The CPU node's fold on the branch parameters as they are (repso_fold_*_params) against the
    same fold on the embedded (C, B, K*K) kernels (repso_fold_forward / _backward, tested against
    the definition above): the same inputs reach the same arithmetic, so the results are equal
    bit for bit; each parameter's gradient is the dense gradient at its own taps. C = 13: a full
    vector group of channels and a partial one."""
    from falconnet.layers.repso_train import _embed

    cpp = torch.ops.falconnet_C
    C = 13
    mean, cov = rm.repso_moments_ref(torch.randn(3, C, 7, 6, dtype=torch.float64), K)
    mean, cov = mean.to(dtype), cov.to(dtype)
    weights = [torch.randn(C, 1, kh, kw, dtype=dtype) for kh, kw in shapes]
    B = len(shapes) + identity
    gammas = [torch.rand(C, dtype=dtype) + 0.5 for _ in range(B)]
    betas = [torch.randn(C, dtype=dtype) for _ in range(B)]
    eps = torch.full((B,), 1e-5, dtype=torch.float64)
    kernels = [_embed(w, K).reshape(C, K * K) for w in weights]
    if identity:
        kernels.append(F.one_hot(torch.full((C,), K * K // 2), K * K).to(dtype))
    kernels = torch.stack(kernels, 1)
    gamma, beta = torch.stack(gammas, 1), torch.stack(betas, 1)
    dense = cpp.repso_fold_forward(mean, cov, kernels, gamma, beta, eps)
    ours = cpp.repso_fold_forward_params(mean, cov, weights, gammas, betas, eps)
    for a, b in zip(ours, dense):
        assert torch.equal(a, b)
    g_folded, g_bias = torch.randn(C, K * K, dtype=dtype), torch.randn(C, dtype=dtype)
    g_mean, g_cov, g_k, g_gamma, g_beta = cpp.repso_fold_backward(g_folded, g_bias, mean, cov, kernels, gamma, eps)
    o_mean, o_cov, o_params = cpp.repso_fold_backward_params(g_folded, g_bias, mean, cov, weights, gammas, eps)
    assert torch.equal(o_mean, g_mean) and torch.equal(o_cov, g_cov)
    n_w = len(weights)
    assert len(o_params) == n_w + 2 * B
    for b, (w, g) in enumerate(zip(weights, o_params[:n_w])):
        kh, kw = w.shape[2:]
        taps = g_k[:, b].reshape(C, K, K)[:, (K - kh) // 2:(K + kh) // 2, (K - kw) // 2:(K + kw) // 2]
        assert g.shape == w.shape and torch.equal(g[:, 0], taps)
    for b in range(B):
        assert torch.equal(o_params[n_w + b], g_gamma[:, b]) and torch.equal(o_params[n_w + B + b], g_beta[:, b])


def test_fold_params_ops_name_bad_arguments():
    cpp = torch.ops.falconnet_C
    C = 16
    mean, cov = torch.zeros(C, 9), torch.zeros(C, 9, 9)
    w, g, eps = torch.zeros(C, 1, 3, 3), torch.ones(C), torch.full((2,), 1e-5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be \(16, 1, kh, kw\) with odd kh, kw <= 3, got \[16, 1, 5, 5\]"):
        cpp.repso_fold_forward_params(mean, cov, [w, torch.zeros(C, 1, 5, 5)], [g, g], [g, g], eps)
    with pytest.raises(RuntimeError, match=r"gammas\[1\] must be \(16\), got \[15\]"):
        cpp.repso_fold_forward_params(mean, cov, [w], [g, torch.ones(15)], [g, g], eps)
    with pytest.raises(RuntimeError, match="one entry per weight .* got 1 weights and 3 gammas"):
        cpp.repso_fold_backward_params(torch.zeros(C, 9), torch.zeros(C), mean, cov, [w], [g, g, g], eps)
    with pytest.raises(RuntimeError, match="eps must have B = 2 entries, got 3"):
        cpp.repso_fold_forward_params(mean, cov, [w], [g, g], [g, g], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mean must be \\(C, K\\*K\\) for an odd K, got \\[16, 8\\]"):
        cpp.repso_fold_forward_params(torch.zeros(C, 8), cov, [w], [g, g], [g, g], eps)
    with pytest.raises(RuntimeError, match="mean must be a \\(C, K\\*K\\) floating-point CPU tensor, got \\[144\\]"):
        cpp.repso_fold_backward_params(torch.zeros(C, 9), torch.zeros(C), torch.zeros(C * 9), cov, [w], [g, g], eps)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_moments_gradcheck(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: rm.repso_moments(t, 3), (x,))


def test_moments_opcheck_and_flops():
    x = torch.randn(2, 4, 5, 5)
    torch.library.opcheck(torch.ops.falconnet.repso_moments, (x, 3))
    with FlopCounterMode(display=False) as counter:
        rm.repso_moments(x, 3)
    assert counter.get_total_flops() == 2 * rm.repso_moments_macs(x.shape, 3)


@pytest.mark.parametrize("channels_last", [True, False])
def test_flops_of_a_training_step_do_not_depend_on_the_path(monkeypatch, channels_last):
    """FlopCounterMode over a RepSO training step counts the moments the same way whether the
    one-node CPU path (C++ kernels called directly) or the custom ops run them."""
    module = make_repso(16, "T", dtype=torch.float32)
    x = torch.randn(2, 16, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def forward_flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn(copy.deepcopy(module), x)
        return counter.get_total_flops()

    one_node = forward_flops(fused)
    monkeypatch.setattr(rm, "_CPP_KERNELS_SEEN", set())  # the custom-op path: nothing known
    monkeypatch.setattr(rm, "cpp_train_path_available", lambda x: False)
    import falconnet.layers.repso_train as rt

    monkeypatch.setattr(rt, "cpp_train_path_available", lambda x: False)
    custom = forward_flops(fused)
    assert one_node == custom > 2 * rm.repso_moments_macs(x.shape, 3)


def test_moments_bad_input():
    with pytest.raises(ValueError, match="K"):
        rm.repso_moments(torch.randn(1, 2, 3, 3), 2)
    with pytest.raises(ValueError, match="4-D"):
        rm.repso_moments(torch.randn(2, 3, 3), 3)


# ---------------------------------------------------------------------------------------------
# exactness of the one-conv training forward


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float64_every_table3_row(monkeypatch, row, backend):
    """Output, every gradient and the updated running statistics equal the branch sum to ~1e-10."""
    use_backend(monkeypatch, backend)
    module = make_repso(3, row)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64) * 1.5 + 0.5  # odd H, W
    grad_y = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    twin = copy.deepcopy(module)
    y0, g0, b0 = run(branch_sum, module, x, grad_y)
    y1, g1, b1 = run(fused, twin, x, grad_y)
    assert (y1 - y0).abs().max() <= 1e-10 * max(1.0, scale([y0]))
    assert max_err(g1, g0) <= 1e-10 * max(1.0, scale(g0))
    assert max_err(b1, b0) <= 1e-12 * max(1.0, scale(b0))  # includes num_batches_tracked


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float64_channels_last_fast_path(monkeypatch, backend):
    """The benchmark's layout: channels_last, C a multiple of 16 (the C++ moments fast path and the
    C++ fold), against the branch sum to ~1e-10."""
    use_backend(monkeypatch, backend)
    module = make_repso(32, "T")
    x = (torch.randn(3, 32, 9, 7, dtype=torch.float64) * 1.5 + 0.5).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    twin = copy.deepcopy(module)
    y0, g0, b0 = run(branch_sum, module, x, grad_y)
    y1, g1, b1 = run(fused, twin, x, grad_y)
    assert (y1 - y0).abs().max() <= 1e-10 * max(1.0, scale([y0]))
    assert max_err(g1, g0) <= 1e-10 * max(1.0, scale(g0))
    assert max_err(b1, b0) <= 1e-12 * max(1.0, scale(b0))


@pytest.mark.parametrize("conv", ["falconnet", "torch"])
def test_float64_either_conv(conv):
    """The one conv on falconnet_kernels.dw_conv3x3 (the CUDA default) or on F.conv2d (the CPU default)."""
    module = make_repso(3, "T")
    x, grad_y = torch.randn(3, 3, 6, 5, dtype=torch.float64), torch.randn(3, 3, 6, 5, dtype=torch.float64)
    twin = copy.deepcopy(module)
    y0, g0, b0 = run(branch_sum, module, x, grad_y)
    y1, g1, b1 = run(lambda m, t: fused(m, t, conv), twin, x, grad_y)
    assert max_err([y1] + g1 + b1, [y0] + g0 + b0) <= 1e-10 * max(1.0, scale(g0))


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_node_cpu_path_and_compiled_custom_op_path(monkeypatch, channels_last):
    """CPU training runs moments, fold and conv as one autograd node (the C++ kernels called
    directly), eagerly and under torch.compile(fullgraph=True) (through the kernels' fake
    implementations); both equal the branch sum in float64, running statistics included."""
    module = make_repso(16, "T")
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    y = fused(copy.deepcopy(module), x.requires_grad_())
    assert type(y.grad_fn).__name__ == "_OneConvTrainCPUBackward"
    x = x.detach()
    y0, g0, b0 = run(branch_sum, copy.deepcopy(module), x, grad_y)
    y1, g1, b1 = run(fused, copy.deepcopy(module), x, grad_y)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y2, g2, b2 = run(compiled, copy.deepcopy(module), x, grad_y)
    # traced code must not query the dispatcher (a graph break, fatal under fullgraph) even when
    # nothing is cached yet: it then takes the tensor-op fold
    monkeypatch.setattr(rm, "_CPP_KERNELS_SEEN", set())
    torch._dynamo.reset()
    y3, g3, b3 = run(torch.compile(fused, backend="aot_eager", fullgraph=True), copy.deepcopy(module), x, grad_y)
    assert max_err([y3] + g3, [y0] + g0) <= 1e-10 * max(1.0, scale(g0))
    for y, g, b in ((y1, g1, b1), (y2, g2, b2)):
        assert max_err([y] + g, [y0] + g0) <= 1e-10 * max(1.0, scale(g0))
        assert max_err(b, b0) <= 1e-12 * max(1.0, scale(b0))


@pytest.mark.parametrize("shape", [(1, 4, 1, 2), (2, 4, 1, 1), (1, 4, 3, 3), (1, 4, 2, 1)], ids=str)
def test_float64_smallest_batches(shape):
    """Batch 1 and 1x1 images: wherever BatchNorm itself has more than one value per channel."""
    module = make_repso(4, "T")
    x, grad_y = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    twin = copy.deepcopy(module)
    y0, g0, b0 = run(branch_sum, module, x, grad_y)
    y1, g1, b1 = run(fused, twin, x, grad_y)
    assert max_err([y1], [y0]) <= 1e-10 * max(1.0, scale([y0]))
    assert max_err(g1, g0) <= 1e-9 * max(1.0, scale(g0))  # BN on 2 values: gradients up to ~1/eps^0.5
    assert max_err(b1, b0) <= 1e-12 * max(1.0, scale(b0))


def test_one_value_per_channel_is_an_error_as_in_batchnorm():
    module = make_repso(2, "T")
    x = torch.randn(1, 2, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        branch_sum(module, x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(module, x)


def test_momentum_none_and_eval_mode_branches():
    """Cumulative-average BatchNorms over several steps, and a module in eval mode (running statistics)."""
    module = make_repso(3, "T", momentum=None)
    twin = copy.deepcopy(module)
    for step in range(3):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64) + step
        grad_y = torch.randn_like(x)
        y0, g0, b0 = run(branch_sum, module, x, grad_y)
        y1, g1, b1 = run(fused, twin, x, grad_y)
        assert max_err([y1] + g1 + b1, [y0] + g0 + b0) <= 1e-10 * max(1.0, scale(g0 + b0))
    module.eval(), twin.eval()
    y0, g0, b0 = run(branch_sum, module, x, grad_y)
    y1, g1, b1 = run(fused, twin, x, grad_y)
    assert max_err([y1] + g1 + b1, [y0] + g0 + b0) <= 1e-10 * max(1.0, scale(g0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_low_precision_cpu_fast_path_within_pytorchs_own_error(dtype, channels_last):
    """The CPU fast path end to end (16 channels, K = 3: the one autograd node with float moments,
    the fused grad_x and the C++ conv weight gradient; NCHW through its channels_last copy), against
    the float64 branch sum, within 3x the error of PyTorch's own branch sum at the same precision."""
    module = make_repso(16, "T")
    x = torch.randn(4, 16, 9, 7, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    y_ref, g_ref, b_ref = run(branch_sum, copy.deepcopy(module), x, grad_y)
    low = module.to(dtype)
    xl = x.to(dtype)
    y_pt, g_pt, b_pt = run(branch_sum, copy.deepcopy(low), xl, grad_y)
    y_fu, g_fu, b_fu = run(fused, copy.deepcopy(low), xl, grad_y)
    ulp = torch.finfo(dtype).eps
    for ours, theirs, ref in ((y_fu, y_pt, y_ref), *zip(g_fu, g_pt, g_ref)):
        err_pt, err_fu = max_err([theirs], [ref]), max_err([ours], [ref])
        assert err_fu <= 3 * err_pt + 4 * ulp * max(1.0, scale([ref])), (err_fu, err_pt)
    assert max_err(b_fu, b_ref) <= 3 * max_err(b_pt, b_ref) + 4 * ulp * scale(b_ref)


ACTS = {"relu6": F.relu6, "relu": F.relu}


def activation_paths():
    """(name, path, the grad_fn class the output must have): the activation inside the CPU node,
    after the custom-op path (one_node=False), after the fused dw_conv3x3 op, after the branch sum
    (RepSO with one_conv_training=False)."""
    return [
        ("cpu-node", lambda m, t, a: fused_act(m, t, a), "_OneConvTrainCPUBackward"),
        ("op-path", lambda m, t, a: fused_act(m, t, a, one_node=False), None),
        ("dw-op", lambda m, t, a: fused_act(m, t, a, conv="falconnet"), None),
    ]


def fused_act(module, x, activation, conv="auto", one_node=True):
    return repso_train_forward(
        x, [b.conv.weight for b in module.branches], [b.bn for b in module.branches], module.identity_bn, conv=conv,
        one_node=one_node, activation=activation,
    )


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "small"])
def test_float64_activation_inside_the_node(activation, layout):
    """relu / relu6 applied to the one conv's output: inside the CPU node (in place, the backward's
    mask from the output), after the op paths. Each equals act(branch sum) to ~1e-10, outputs on
    both sides of 0 and 6 (fast path at 16 channels channels_last; NCHW through its copy; 3
    channels on the per-channel kernels)."""
    C = 3 if layout == "small" else 16
    module = make_repso(C, "T")
    x = torch.randn(3, C, 7, 6, dtype=torch.float64) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    act = ACTS[activation]
    y0, g0, b0 = run(lambda m, t: act(branch_sum(m, t)), copy.deepcopy(module), x, grad_y)
    assert (y0 == 0).any() and ((y0 > 0) & (y0 < 6)).any()
    assert activation == "relu" or (y0 == 6).any()
    for name, path, node in activation_paths():
        y = path(copy.deepcopy(module), x.clone().requires_grad_(), activation)
        if node is not None:
            assert type(y.grad_fn).__name__ == node, name
        y1, g1, b1 = run(lambda m, t, path=path: path(m, t, activation), copy.deepcopy(module), x, grad_y)
        assert max_err([y1] + g1, [y0] + g0) <= 1e-10 * max(1.0, scale([y0] + g0)), name
        assert max_err(b1, b0) <= 1e-12 * max(1.0, scale(b0)), name
    # the layer: RepSO(activation=...) runs it inside the node by default, after the branches with
    # one_conv_training=False; the same values and gradients
    layer = make_repso(C, "T")
    layer.activation = activation
    ref = copy.deepcopy(layer)
    ref.one_conv_training = False
    y2, g2, b2 = run(lambda m, t: m(t), layer, x, grad_y)
    y3, g3, b3 = run(lambda m, t: m(t), ref, x, grad_y)
    assert max_err([y2] + g2 + b2, [y3] + g3 + b3) <= 1e-10 * max(1.0, scale([y3] + g3))


def test_activation_inside_the_node_keeps_no_pre_activation_tensor():
    """With the activation inside the node the autograd graph keeps x and the output (shared with
    the next layer), not the conv's pre-activation output as well."""
    module = make_repso(16, "T").float()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    act_bytes = x.numel() * 4

    def big_storages(fn):
        return sum(v >= act_bytes for v in saved_storages(fn).values())

    inside = big_storages(lambda: fused_act(copy.deepcopy(module), x, "relu6"))
    after = big_storages(lambda: F.relu6(fused(copy.deepcopy(module), x)))
    assert (inside, after) == (2, 3)


def test_layer_default_picks_the_path_by_kernel_size():
    """RepSO(one_conv_training="auto"), the default: the one conv for 3x3 rows, the branch sum for
    rows with 5x5 / 7x7 branches (slower as one conv); True / False force either; anything else
    is an error naming the argument."""
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    for row, one_conv in (("T", True), ("E", False), ("F", False), ("B", True)):
        layer = RepSO(16, **TABLE3_CONFIGS[row]).double().train()
        assert layer.one_conv_training == "auto"
        used = type(layer(x).grad_fn).__name__
        assert (used == "_OneConvTrainCPUBackward") == one_conv, (row, used)
        forced = RepSO(16, one_conv_training=True, **TABLE3_CONFIGS[row]).double().train()
        assert type(forced(x).grad_fn).__name__ == "_OneConvTrainCPUBackward"
    with pytest.raises(ValueError, match="one_conv_training"):
        RepSO(16, one_conv_training="yes")


@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_autocast_bfloat16(channels_last):
    """torch.autocast("cpu", bfloat16) around the one-node CPU path's forward (the backward
    outside it): the conv runs in bf16, the backward in x's dtype; output and gradients within
    bf16 rounding of the float32 path."""
    module = make_repso(16, "T", dtype=torch.float32)
    x = torch.randn(4, 16, 9, 7) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    y32, g32, _ = run(fused, copy.deepcopy(module), x, grad_y)
    y16, g16, _ = run(fused, copy.deepcopy(module), x, grad_y, autocast=True)
    assert y16.dtype == torch.bfloat16
    # a few bf16 ulps (2^-8) of the largest value: the conv's inputs and output rounded to bf16
    assert max_err([y16], [y32]) <= 4 * 2**-8 * scale([y32])
    for a, b in zip(g16, g32):
        assert a.dtype == b.dtype and max_err([a], [b]) <= 4 * 2**-8 * max(1.0, scale([b]))


@pytest.mark.parametrize("row", ["T", "N"])  # the default, and a row with 5x5 (K = 5, not the 3x3 op)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_low_precision_within_pytorchs_own_error(monkeypatch, row, dtype, backend):
    """Against the float64 branch sum, the one-conv path's error stays within a small multiple of
    the error of PyTorch's own branch sum at the same precision (the flash-attention idiom)."""
    if backend == "triton" and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter has no bf16 matmul; the 16-bit path runs on a GPU
    use_backend(monkeypatch, backend)
    module = make_repso(8, row)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64) + 0.5
    grad_y = torch.randn_like(x)
    y_ref, g_ref, b_ref = run(branch_sum, copy.deepcopy(module), x, grad_y)
    low = module.to(dtype)
    y_pt, g_pt, b_pt = run(branch_sum, copy.deepcopy(low), x.to(dtype), grad_y)
    y_fu, g_fu, b_fu = run(fused, copy.deepcopy(low), x.to(dtype), grad_y)
    ulp = torch.finfo(dtype).eps
    for ours, theirs, ref in ((y_fu, y_pt, y_ref), *zip(g_fu, g_pt, g_ref)):
        err_pt = max_err([theirs], [ref])
        err_fu = max_err([ours], [ref])
        # 3x PyTorch's own error, plus a floor of a few output ulps where PyTorch happens to be exact
        assert err_fu <= 3 * err_pt + 4 * ulp * max(1.0, scale([ref])), (err_fu, err_pt)
    # running statistics: BatchNorm's own float32/bf16 rounding of the update
    assert max_err(b_fu, b_ref) <= 3 * max_err(b_pt, b_ref) + 4 * ulp * scale(b_ref)


def test_triton_interpreter_float32_end_to_end(monkeypatch):
    use_backend(monkeypatch, "triton")
    module = make_repso(5, "T").float()
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    y0, g0, b0 = run(branch_sum, copy.deepcopy(module), x, grad_y)
    y1, g1, b1 = run(fused, copy.deepcopy(module), x, grad_y)
    # float32 on both sides: a few hundred ulps of the largest value (BN's 1/std amplifies)
    assert max_err([y1] + g1, [y0] + g0) <= 1e-4 * max(1.0, scale([y0] + g0))
    assert max_err(b1, b0) <= 1e-5 * scale(b0)


@pytest.mark.triton
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 3, 5])
def test_triton_fold_kernels_match_reference(monkeypatch, K, x_dtype):
    """The Triton fold kernels (falconnet_kernels/triton_repso_fold.py) against their definitions:
    forward = the moments op's centring + repso_fold_ref, backward = repso_fold_backward_ref plus
    the moments backward's prepared inputs (lag matrix, constant, shift) as
    triton_repso_moments.repso_moments_backward forms them on the host. Interpreter, float64
    references; a zero-variance branch (a zero kernel) and kernels with zero taps included."""
    from falconnet_kernels import triton_repso_fold as tf
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")  # on a GPU: one tile, not every config compiled
    # the GPU's launch shapes in the interpreter too (1 or 8 channels a program), and at K = 3 for
    # float32 x the fold backward's 4-channel programs (C >= WIDE_C, 512 by default), the last partial
    monkeypatch.setattr(tf, "INTERPRETER_BLOCK_C", None)
    monkeypatch.setattr(tf, "WIDE_C", 8)
    C, B, KK, dev = 10 if K == 3 and x_dtype == torch.float32 else 6, 5, K * K, TRITON_DEVICE
    x = torch.randn(3, C, 7, 5) * 2 + 1
    sums, prods, shift = tm.forward_partials(x.to(dev), K)
    kernels = torch.randn(C, B, KK)
    kernels[:, 1, : KK // 2] = 0
    kernels[2, 3] = 0
    gamma, beta = torch.rand(C, B) + 0.5, torch.randn(C, B)
    eps = torch.tensor([1e-5, 1e-3, 1e-5, 1e-4, 1e-5], dtype=torch.float64)
    M = 3 * 7 * 5
    params = tf.Params.dense(kernels.to(dev), gamma.to(dev), beta.to(dev))
    outs = tf.fold_forward(sums, prods, shift, M, params, eps.to(dev), K, x_dtype)
    mean, cov, weight, bias, bmean, bvar = (t.cpu() for t in outs)
    if K == 3:
        # the node's form: the row kernel's compact float64 totals, read by the fold directly
        total, shift3 = tm.forward_totals3(x.to(dev))
        compact = tf.fold_forward(total, None, shift3, M, params, eps.to(dev), K, x_dtype)
        for ours, padded in zip(compact, (mean, cov, weight, bias, bmean, bvar), strict=True):
            assert torch.equal(ours.cpu(), padded)
    ref_mean, ref_cov = rm.repso_moments_ref(x.double(), K)
    # the moments: float32 tiles summed in float64 (test_moments_match_reference's bar)
    assert (mean.double() - ref_mean).abs().max() <= 4e-6 * ref_mean.abs().max()
    assert (cov.double() - ref_cov).abs().max() <= 4e-6 * ref_cov.abs().max()
    # the fold of those float32 moments, in float64, rounded once to the output dtype
    f64 = [t.double() for t in (mean, cov, kernels, gamma, beta)]
    ref = list(rm.repso_fold_ref(*f64, eps))
    # the running statistics' inputs: (B, C) rows, the variance unbiased
    ref[2], ref[3] = ref[2].t(), ref[3].t() * (M / (M - 1))
    for ours, theirs in zip((weight, bias, bmean, bvar), ref, strict=True):
        assert ours.shape == theirs.shape
        ulp = torch.finfo(ours.dtype).eps
        assert ours.dtype == (x_dtype if ours is weight or ours is bias else torch.float32)
        assert (ours.double() - theirs).abs().max() <= ulp * max(1.0, theirs.abs().max().item())
    grad_w = torch.randn(C, KK).to(x_dtype)
    grad_b = torch.randn(C).to(x_dtype)
    args = [t.to(dev) for t in (grad_w, grad_b, mean, cov)] + [params, eps.to(dev)]
    outs = tf.fold_backward(*args, K, x_dtype)
    g_k, g_gamma, g_beta, a_hi, a_lo, cst, shift_b = (t.cpu() for t in outs)
    # grad_weight and grad_bias with other strides (the node's (10, C) float64 totals, rows 0-8
    # transposed and row 9): the same values
    totals = torch.cat([grad_w.t(), grad_b[None]]).double().to(dev)
    strided = tf.fold_backward(totals[:KK].t(), totals[KK], *args[2:], K, x_dtype)
    for ours, theirs in zip(strided, outs, strict=True):
        assert torch.equal(ours, theirs)
    if K == 3:
        # the K = 3 grad_x kernel's class tables, written by the fold backward (n_pos) against the
        # host's _class_tables of the float32 lag matrix: the same float32 sums in another order
        plain = tf.fold_backward(*args, K, torch.float32)
        tables = tf.fold_backward(*args, K, x_dtype, n_pos=105)
        for ours, theirs in zip(tables[:3], plain[:3], strict=True):
            assert torch.equal(ours, theirs)
        expected = tm._class_tables(plain[3], plain[5], plain[6], 1 / 105)
        for ours, theirs in zip(tables[3:7], expected, strict=True):
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()
        assert torch.equal(tables[7], plain[6])
    g_mean, g_cov, *ref_g = rm.repso_fold_backward_ref(grad_w.double(), grad_b.double(), *f64[:4], eps)
    for ours, theirs in zip((g_k, g_gamma, g_beta), ref_g):
        assert (ours.double() - theirs).abs().max() <= 4 * 2**-24 * max(1.0, theirs.abs().max().item())
    # the moments backward's inputs, formed on the host as the op path does
    split = x_dtype != torch.float32
    g_sym = g_cov + g_cov.transpose(1, 2)
    ref_shift = torch.zeros(C, dtype=torch.float64) if split else f64[0][:, KK // 2]
    ref_cst = g_mean - (g_sym @ (f64[0] - ref_shift[:, None]).unsqueeze(-1)).squeeze(-1)
    A = tm._lag_matrix(g_sym, K, a_hi.shape[1], a_hi.shape[2])
    lag = a_hi.double() + (a_lo.double() if split else 0)
    # float32 accumulation of the lag matrix (8 branches: a few ulps); a 16-bit hi + lo pair: 2^-16
    assert (lag - A).abs().max() <= (2**-15 if split else 2**-21) * A.abs().max()
    assert (shift_b.double() - ref_shift).abs().max() <= 2**-24 * ref_shift.abs().max()
    assert cst[:, KK:].abs().max() == 0
    assert (cst[:, :KK].double() - ref_cst).abs().max() <= 2**-21 * ref_cst.abs().max()


@pytest.mark.triton
@pytest.mark.parametrize("K", [3, 5])
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_moments_backward_with_the_conv_input_gradient(monkeypatch, K, channels_last):
    """The moments backward kernel with conv=(grad_y, weight) returns the moments' grad_x plus the
    KxK depthwise conv's input gradient (interpreter, float32, against float64 references)."""
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    x = torch.randn(2, 6, 7, 5) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    mean, _ = rm.repso_moments_ref(x.double(), K)
    g_mean, g_cov = torch.randn(C, K * K, dtype=torch.float64), torch.randn(C, K * K, K * K, dtype=torch.float64)
    grad_y, weight = torch.randn_like(x), torch.randn(C, 1, K, K)
    # the op path's host-side preparation of the kernel's inputs (float32 x: no hi/lo split)
    g_sym = g_cov + g_cov.transpose(1, 2)
    shift = mean[:, K * K // 2]
    cst = torch.zeros(C, tm._pow2(K * K))
    cst[:, : K * K] = (g_mean - (g_sym @ (mean - shift[:, None]).unsqueeze(-1)).squeeze(-1)).float()
    A = tm._lag_matrix(g_sym, K, tm._pow2((2 * K - 1) ** 2), tm._pow2(K * K)).float()
    dev = TRITON_DEVICE
    gx = tm.backward_launch(x.to(dev), A.to(dev), A.to(dev), cst.to(dev), shift.float().to(dev), K,
                            conv=(grad_y.to(dev), weight.to(dev))).cpu()
    ref = rm.repso_moments_backward_ref(g_mean, g_cov, x.double(), mean, K) + torch.nn.grad.conv2d_input(
        x.shape, weight.double(), grad_y.double(), padding=K // 2, groups=C)
    assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert (gx.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 5, 9), (3, 33, 1, 1), (1, 65, 2, 17), (2, 40, 9, 2)], ids=str)
def test_triton_k3_row_kernels(monkeypatch, shape, channels_last):
    """The K = 3 row kernels (_moments3_fwd_kernel, _moments3_bwd_kernel) where rows split over
    several programs, a row over several column tiles (W = 9, 17 against tiles of 8) and the
    channels over several blocks (33-70 against 32 and 64), on 1- and 2-wide maps, in both
    layouts: the moments and grad_x (with the conv's input gradient) against float64. float32 x
    (and bf16 on a GPU): the moments within test_moments_match_reference's 4e-6 (float32 sums of
    exact products); grad_x within 1e-5 of its largest value in float32 (float32 weights and
    products), within bf16's rounding of the output (8e-3) in bf16."""
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
    for dtype in dtypes:
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        C, dev = shape[1], TRITON_DEVICE
        sums, prods, shift = tm.forward_partials(x.to(dev), 3)
        n = shape[0] * shape[2] * shape[3]
        ew = sums.double().sum(0)[:, :9].cpu() / n
        second = prods.double().sum(0)[:, :9, :9].cpu() / n
        mean = ew + shift.double().cpu()[:, None]
        cov = second - ew[:, :, None] * ew[:, None, :]
        ref_mean, ref_cov = rm.repso_moments_ref(x.double(), 3)
        assert (mean - ref_mean).abs().max() <= 4e-6 * ref_mean.abs().max()
        assert (cov - ref_cov).abs().max() <= 4e-6 * ref_cov.abs().max()

        g_mean, g_cov = torch.randn(C, 9, dtype=torch.float64), torch.randn(C, 9, 9, dtype=torch.float64)
        grad_y, weight = torch.randn_like(x), torch.randn(C, 1, 3, 3).to(dtype)
        g_sym = g_cov + g_cov.transpose(1, 2)
        centre = ref_mean[:, 4]
        cst = torch.zeros(C, 16)
        cst[:, :9] = (g_mean - (g_sym @ (ref_mean - centre[:, None]).unsqueeze(-1)).squeeze(-1)).float()
        A = tm._lag_matrix(g_sym, 3, 32, 16).float()
        gx = tm.backward_launch(x.to(dev), A.to(dev), A.to(dev), cst.to(dev), centre.float().to(dev), 3,
                                conv=(grad_y.to(dev), weight.to(dev))).cpu()
        ref = rm.repso_moments_backward_ref(g_mean, g_cov, x.double(), ref_mean, 3) + torch.nn.grad.conv2d_input(
            x.shape, weight.double(), grad_y.double(), padding=1, groups=C)
        assert gx.dtype == dtype and gx.stride() == x.stride()
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert (gx.double() - ref).abs().max() <= tol * ref.abs().max(), dtype


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kernel", ["rows", "triton", "cudnn"])
def test_triton_node_weight_gradient_kernels(monkeypatch, kernel, channels_last):
    """Each WEIGHT_GRAD choice for the node's conv weight gradient ("rows": triton_repso_moments'
    row kernel, the default; "triton": triton_dw_conv3x3's; "cudnn": convolution_backward) runs
    when chosen and gives the branch sum's result (float32); the "cudnn" case also takes the node's
    conv from F.conv2d (CONV = "cudnn"), the others from the row kernel."""
    from falconnet.layers import repso_train
    from falconnet_kernels import triton_dw_conv3x3, triton_repso_moments

    use_triton(monkeypatch)
    monkeypatch.setattr(repso_train, "WEIGHT_GRAD", kernel)
    monkeypatch.setattr(repso_train, "CONV", "cudnn" if kernel == "cudnn" else "rows")
    module = make_repso(6, "T").float().to(TRITON_DEVICE)
    x = (torch.randn(2, 6, 5, 7) * 2 + 1).to(TRITON_DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    called = []
    for owner, name in ((triton_repso_moments, "conv3_weight_grad_totals"),
                        (triton_dw_conv3x3, "dw_conv3x3_weight_grad"), (triton_repso_moments, "conv3_forward")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    y0, g0, b0 = run(branch_sum, copy.deepcopy(module), x, grad_y)
    y1, g1, b1 = run(fused, copy.deepcopy(module), x, grad_y)
    assert called == {"rows": ["conv3_forward", "conv3_weight_grad_totals"],
                      "triton": ["conv3_forward", "dw_conv3x3_weight_grad"], "cudnn": []}[kernel]
    assert max_err([y1] + g1, [y0] + g0) <= 1e-4 * max(1.0, scale([y0] + g0))
    assert max_err(b1, b0) <= 1e-5 * scale(b0)


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["_moments3_fwd_kernel", "_moments3_bwd_kernel", "_conv3_fwd_kernel",
                                    "_conv3_wgrad_kernel"])
def test_triton_row_kernels_every_tile(monkeypatch, kernel):
    """Every autotuning candidate of the K = 3 row kernels (the tests otherwise run the first):
    tiles of 7 columns (not a power of 2: a map of 9 columns leaves a partial tile) and of 2
    channels a thread (260 channels: a partial block), against float64, float32 x."""
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    tuner = getattr(tm, kernel)
    x = (torch.randn(2, 260, 3, 9, dtype=torch.float64) * 2 + 3).contiguous(memory_format=torch.channels_last)
    xf, dev, C = x.float().to(TRITON_DEVICE), TRITON_DEVICE, 260
    gy = torch.randn(x.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    ref_mean, ref_cov = rm.repso_moments_ref(x, 3)
    for config in list(tuner.configs):
        monkeypatch.setattr(tuner, "configs", [config])
        if kernel == "_moments3_fwd_kernel":
            mean, cov = (t.cpu().double() for t in tm.repso_moments_forward(xf, 3))
            err = max(((mean - ref_mean).abs().max() / ref_mean.abs().max()).item(),
                      ((cov - ref_cov).abs().max() / ref_cov.abs().max()).item())
            tol = 4e-6
        elif kernel == "_moments3_bwd_kernel":
            g_mean, g_cov = torch.randn(C, 9, dtype=torch.float64), torch.randn(C, 9, 9, dtype=torch.float64)
            out = tm.repso_moments_backward(g_mean.float().to(dev), g_cov.float().to(dev), xf, ref_mean.float().to(dev), 3)
            ref = rm.repso_moments_backward_ref(g_mean, g_cov, x, ref_mean, 3)
            err, tol = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item(), 1e-5
        elif kernel == "_conv3_fwd_kernel":
            out = tm.conv3_forward(xf, w.float().to(dev), b.float().to(dev))
            ref = F.conv2d(x, w, b, padding=1, groups=C)
            err, tol = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item(), 1e-5
        else:
            gw, gb = tm.conv3_weight_grad(gy.float().to(dev), xf)
            _, rgw, rgb = torch.ops.aten.convolution_backward(
                gy, x, w, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C, [False, True, True])
            err = max(((gw.cpu().double() - rgw).abs().max() / rgw.abs().max()).item(),
                      ((gb.cpu().double() - rgb).abs().max() / rgb.abs().max()).item())
            tol = 1e-5
        assert err <= tol, (kernel, config.kwargs, config.num_warps, err)


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 5, 9), (3, 33, 1, 1), (1, 130, 2, 17), (2, 40, 9, 2)], ids=str)
def test_triton_conv3_forward(monkeypatch, shape, channels_last):
    """triton_repso_moments.conv3_forward (RepSO's one conv on the GPU node) against F.conv2d in
    float64, each fused activation: float32 within 3x PyTorch's own float32 error plus 4 ulps of
    the largest value; bf16 (GPU only) the same against PyTorch's bf16."""
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    C = shape[1]
    for dtype in [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else []):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(C, 1, 3, 3).to(dtype), torch.randn(C).to(dtype)
        for act, fn in (("none", lambda t: t), ("relu", F.relu), ("relu6", F.relu6)):
            ref = fn(F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=C))
            theirs = fn(F.conv2d(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), padding=1, groups=C))
            ours = tm.conv3_forward(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), act).cpu()
            assert ours.dtype == dtype and ours.stride() == x.stride()
            ulp = 4 * torch.finfo(dtype).eps
            assert max_err([ours], [ref]) <= 3 * max_err([theirs.cpu()], [ref]) + ulp * scale([ref]), (dtype, act)
    with pytest.raises(ValueError, match="activation"):
        tm.conv3_forward(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), "gelu")
    with pytest.raises(ValueError, match="weight"):
        tm.conv3_forward(x.to(TRITON_DEVICE), w[:1].to(TRITON_DEVICE), b.to(TRITON_DEVICE))


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 5, 9), (3, 33, 1, 1), (1, 130, 2, 17), (2, 40, 9, 2)], ids=str)
def test_triton_conv3_weight_grad(monkeypatch, shape, channels_last):
    """triton_repso_moments.conv3_weight_grad against aten's convolution_backward in float64:
    several row splits, column tiles (W = 9, 17 against 8) and channel blocks (130 against 128),
    1- and 2-wide maps, both layouts. float32 x: within 3x PyTorch's own float32 error plus 4 ulps
    of the largest value (test_cl3_conv_weight_grad_and_fused_grad_x's bar); bf16 (GPU only) the
    same against PyTorch's bf16."""
    from falconnet_kernels import triton_repso_moments as tm

    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    C = shape[1]
    for dtype in [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else []):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
        grad_y = torch.randn(shape, dtype=torch.float64).to(dtype)
        if channels_last:
            x, grad_y = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_y))
        w = torch.randn(C, 1, 3, 3, dtype=torch.float64)

        def conv_backward(gy, xx, ww):
            return torch.ops.aten.convolution_backward(
                gy, xx, ww, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C, [False, True, True])[1:]

        ref_gw, ref_gb = conv_backward(grad_y.double(), x.double(), w)
        pt_gw, pt_gb = conv_backward(grad_y.to(TRITON_DEVICE), x.to(TRITON_DEVICE), w.to(TRITON_DEVICE, dtype))
        gw, gb = (t.cpu() for t in tm.conv3_weight_grad(grad_y.to(TRITON_DEVICE), x.to(TRITON_DEVICE)))
        assert gw.shape == (C, 1, 3, 3) and gb.shape == (C,) and gw.dtype == gb.dtype == torch.float32
        ulp = 4 * torch.finfo(dtype).eps
        for ours, theirs, ref in ((gw, pt_gw.cpu(), ref_gw), (gb, pt_gb.cpu(), ref_gb)):
            assert max_err([ours], [ref]) <= 3 * max_err([theirs], [ref]) + ulp * scale([ref]), dtype


@pytest.mark.triton
@pytest.mark.parametrize("one_node", [True, False])
@pytest.mark.parametrize("row", ["T", "N"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_training_paths_match_branch_sum(monkeypatch, one_node, row, channels_last):
    """Triton (the GPU, or the interpreter without one; float32): the one-node path
    (_OneConvTrainTriton: moments, fold kernel, conv; backward with the conv's input gradient in
    the moments backward kernel) and the custom-op path both equal the branch sum, running
    statistics included."""
    use_triton(monkeypatch)
    module = make_repso(5, row).float().to(TRITON_DEVICE)
    x = (torch.randn(2, 5, 6, 7) * 2 + 1).to(TRITON_DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)

    def path(m, inp):
        return fused(m, inp, one_node=one_node)

    y = path(copy.deepcopy(module), x.clone().requires_grad_())
    node = type(y.grad_fn).__name__ == "_OneConvTrainTritonBackward"
    assert node == one_node
    y0, g0, b0 = run(branch_sum, copy.deepcopy(module), x, grad_y)
    y1, g1, b1 = run(path, copy.deepcopy(module), x, grad_y)
    assert y1.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert g1[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    # float32 on both sides (test_triton_interpreter_float32_end_to_end's bars)
    assert max_err([y1] + g1, [y0] + g0) <= 1e-4 * max(1.0, scale([y0] + g0))
    assert max_err(b1, b0) <= 1e-5 * scale(b0)


@pytest.mark.triton
@pytest.mark.parametrize("seed", range(4))
def test_triton_node_random_configurations(monkeypatch, seed):
    """The Triton one-node path on random Table 3 rows, channel counts, odd sizes and layouts
    (channels_last, NCHW, and a non-contiguous slice of a wider tensor) against the branch sum,
    both in float32 (the GPU, or the interpreter without one)."""
    use_triton(monkeypatch)
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
    row = ROWS[pick(len(ROWS))]
    C, N, H, W = 1 + pick(20), 1 + pick(3), 2 + pick(9), 2 + pick(9)
    layout = ("channels_last", "nchw", "slice")[seed % 3]
    module = make_repso(C, row).float().to(TRITON_DEVICE)
    x = torch.randn(N, C, H, W + (3 if layout == "slice" else 0), generator=gen) * 2 + 1
    x = x.to(TRITON_DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":
        x = x[..., 1:W + 1]  # neither NCHW- nor channels_last-contiguous
    grad_y = torch.randn(x.shape, generator=gen).to(TRITON_DEVICE)

    y = fused(copy.deepcopy(module), x.detach().requires_grad_())
    assert type(y.grad_fn).__name__ == "_OneConvTrainTritonBackward", (row, C, N, H, W, layout)
    y0, g0, b0 = run(branch_sum, copy.deepcopy(module), x, grad_y)
    y1, g1, b1 = run(fused, copy.deepcopy(module), x, grad_y)
    assert max_err([y1] + g1, [y0] + g0) <= 1e-4 * max(1.0, scale([y0] + g0)), (row, C, N, H, W, layout)
    assert max_err(b1, b0) <= 1e-5 * scale(b0)


@pytest.mark.triton
def test_triton_node_autocast_backward_outside(monkeypatch):
    """The Triton one-node path (the GPU's training form) with its forward under bfloat16
    autocast and the backward outside it, as a training loop runs: float32 gradients for float32
    parameters, within bf16 rounding of the float32 step (the H100 run's training failed so in
    RefCO; this checks RepSO's node the same way, in the interpreter without a GPU)."""
    use_triton(monkeypatch)
    module = make_repso(16, "T").float().to(TRITON_DEVICE)
    x = (torch.randn(4, 16, 9, 7) * 2 + 1).to(TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = fused(copy.deepcopy(module), x.detach().requires_grad_())
    assert type(y.grad_fn).__name__ == "_OneConvTrainTritonBackward"
    y32, g32, _ = run(fused, copy.deepcopy(module), x, grad_y)
    y16, g16, _ = run(fused, copy.deepcopy(module), x, grad_y, autocast=True)
    assert y16.dtype == torch.bfloat16
    assert max_err([y16], [y32]) <= 4 * 2**-8 * scale([y32])
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == b.dtype and max_err([a], [b]) <= 4 * 2**-8 * max(1.0, scale([b]))


@pytest.mark.triton
@pytest.mark.parametrize("activation", list(ACTS))
def test_triton_node_activation_inside(monkeypatch, activation):
    """The Triton one-node path with relu / relu6 applied inside it (float32; the GPU, or the
    interpreter without one) against act(branch sum), outputs on both sides of 0 and 6."""
    use_triton(monkeypatch)
    module = make_repso(6, "T").float().to(TRITON_DEVICE)
    x = (torch.randn(2, 6, 7, 5) * 3 + 1).to(TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(x)
    act = ACTS[activation]
    y = fused_act(copy.deepcopy(module), x.clone().requires_grad_(), activation)
    assert type(y.grad_fn).__name__ == "_OneConvTrainTritonBackward"
    y0, g0, b0 = run(lambda m, t: act(branch_sum(m, t)), copy.deepcopy(module), x, grad_y)
    assert (y0 == 0).any() and ((y0 > 0) & (y0 < 6)).any()
    y1, g1, b1 = run(lambda m, t: fused_act(m, t, activation), copy.deepcopy(module), x, grad_y)
    # float32 on both sides (test_triton_interpreter_float32_end_to_end's bars)
    assert max_err([y1] + g1, [y0] + g0) <= 1e-4 * max(1.0, scale([y0] + g0))
    assert max_err(b1, b0) <= 1e-5 * scale(b0)


class _LaunchCounter(TorchDispatchMode):
    """The kernels a piece of code launches: aten ops other than views and allocations, and Triton
    kernel launches (compiled or interpreted), by name, in order."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "unbind", "select", "slice", "reshape", "expand", "as_strided",
            "permute", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "alias", "detach",
            "unsqueeze", "squeeze", "split", "split_with_sizes", "lift_fresh", "is_same_size", "sym_size"}

    def __init__(self, monkeypatch):
        super().__init__()
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        self.names, self.depth = [], 0
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._wrap(cls.run))

    def _wrap(self, run):
        def counted(fn, *args, **kwargs):
            if self.depth == 0:
                self.names.append("triton." + fn.fn.__name__)
            self.depth += 1  # the interpreter runs aten ops of its own inside a launch
            try:
                return run(fn, *args, **kwargs)
            finally:
                self.depth -= 1
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.depth == 0 and name not in self.FREE:
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    def take(self) -> list:
        names, self.names = self.names, []
        return sorted(names)


def _count_step(monkeypatch, module, device, one_buffer: bool = True) -> tuple[list, list, str]:
    """(forward's launches, backward's launches, the output's grad_fn name) of one training step of
    module on a 2 x 16 x 7 x 7 channels_last x, after one step outside the count (compiles on a
    GPU); with one_buffer, checks that every parameter's gradient is a slice of one buffer."""
    x = torch.randn(2, 16, 7, 7).to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_y = torch.randn_like(x)
    module(x).backward(grad_y)
    module.zero_grad(set_to_none=True)
    x.grad = None
    counter = _LaunchCounter(monkeypatch)
    with counter:
        y = module(x)
        forward = counter.take()
        y.backward(grad_y)
        backward = counter.take()
    params = parameters(module)
    assert len(params) >= 14 and all(p.grad is not None for p in params)
    if one_buffer:
        assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 1
    return forward, backward, type(y.grad_fn).__name__


@pytest.mark.triton
def test_triton_node_launches(monkeypatch):
    """What one training step of a RepSO layer launches on the Triton node at K = 3: forward the
    parameters' concatenation, the moments kernel and its float64 sum, the fold, the conv, and one
    foreach op each for the BatchNorms' counters and their running statistics; backward the
    weight-gradient kernel and its sum, the fold backward and the grad_x kernel. The gradients of
    every parameter are slices of the one buffer the fold backward fills (no copies, no
    zero-filled gradients for the node's statistics outputs). At ~2-3 us a launch on a GPU these
    are a large part of the 7x7 layer's time (benchmarks/results/2026-11-26-h100-2/NOTES.md)."""
    use_triton(monkeypatch)
    forward, backward, node = _count_step(monkeypatch, make_repso(16, "T").float().to(TRITON_DEVICE), TRITON_DEVICE)
    assert node == "_OneConvTrainTritonBackward"
    assert forward == sorted(["cat", "triton._moments3_fwd_kernel", "sum", "triton._fold_fwd_kernel",
                              "triton._conv3_fwd_kernel", "_foreach_add_", "_foreach_lerp_"])
    assert backward == sorted(["triton._conv3_wgrad_kernel", "sum", "triton._fold_bwd_kernel",
                               "triton._moments3_bwd_kernel"])


def test_cpu_node_ops(monkeypatch):
    """The CPU node's ops in one training step (channels_last, K = 3): forward the C++ moments,
    fold (reading the branch parameters as they are) and conv, the unbiased variance's scaling and
    two foreach ops for the running statistics; backward the C++ weight gradient, fold backward
    (which writes each parameter's gradient: no copies, no concatenation, no scatter) and grad_x.
    Before the flat parameters: ~6 more ops forward and ~23 backward (~60 us of a 64@8 layer's
    ~470 us step at batch 2 on one thread, 2026-11-26); with them, a concatenation and a gather each
    way (~0.5 ms of a 1024@7 layer's ~11 ms step at batch 16, 2 threads, 2026-11-27)."""
    if not cpp_built():
        pytest.fail("the C++ extension is not built")
    module = make_repso(16, "T").float()
    forward, backward, node = _count_step(monkeypatch, module, "cpu", one_buffer=False)
    assert node == "_OneConvTrainCPUBackward"
    assert forward == sorted(["repso_moments_forward", "repso_fold_forward_params", "dw_conv3x3_forward", "mul",
                              "_foreach_add_", "_foreach_lerp_"])
    assert backward == sorted(["repso_conv_weight_grad", "repso_fold_backward_params", "repso_train_backward_x"])
    assert all(p.grad.is_contiguous() and p.grad.shape == p.shape for p in parameters(module))


@pytest.mark.cuda
@pytest.mark.parametrize("row", ["T", "N"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_cuda_triton_one_node_against_op_path(monkeypatch, row, dtype):
    """On the GPU the training case runs as one node (_OneConvTrainTriton); it and the custom-op
    path (one_node=False) are both within 3x PyTorch's own branch-sum error of the float64 sum.
    float16 with a small-std channel: the backward's lag matrix grows as 1/std^3 and overflowed
    float16 when it was split into float16 parts (it takes the float32 route now)."""
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    module = make_repso(32, row).cuda()
    x = (torch.randn(4, 32, 14, 13, dtype=torch.float64) + 0.5).cuda()
    x[:, 3] = 0.01 * x[:, 3]  # a channel of std ~0.01
    grad_y = torch.randn_like(x) * 50  # a loss-scaled gradient
    y_ref, g_ref, b_ref = run(branch_sum, copy.deepcopy(module), x, grad_y)
    low = module.to(dtype)
    xl = x.to(dtype).contiguous(memory_format=torch.channels_last)
    y_pt, g_pt, b_pt = run(branch_sum, copy.deepcopy(low), xl, grad_y)
    y = fused(copy.deepcopy(low), xl.clone().requires_grad_())
    assert type(y.grad_fn).__name__ == "_OneConvTrainTritonBackward"

    def ops(m, inp):
        return fused(m, inp, one_node=False)

    floor = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}[dtype]
    for path in (fused, ops):
        y_fu, g_fu, b_fu = run(path, copy.deepcopy(low), xl, grad_y)
        for ours, theirs, ref in ((y_fu, y_pt, y_ref), *zip(g_fu, g_pt, g_ref)):
            assert max_err([ours], [ref]) <= 3 * max_err([theirs], [ref]) + floor * max(1.0, scale([ref]))
        assert max_err(b_fu, b_ref) <= 3 * max_err(b_pt, b_ref) + 1e-5 * scale(b_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("row", ["T", "N"])
def test_cuda_bfloat16_channels_last(row):
    module = make_repso(32, row).cuda()
    x = (torch.randn(4, 32, 14, 14, dtype=torch.float64) + 0.5).cuda()
    grad_y = torch.randn_like(x)
    y_ref, g_ref, _ = run(branch_sum, copy.deepcopy(module), x, grad_y)
    low = module.to(torch.bfloat16)
    xl = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y_pt, g_pt, _ = run(branch_sum, copy.deepcopy(low), xl, grad_y)
    y_fu, g_fu, _ = run(fused, copy.deepcopy(low), xl, grad_y)
    for ours, theirs, ref in ((y_fu, y_pt, y_ref), *zip(g_fu, g_pt, g_ref)):
        assert max_err([ours], [ref]) <= 3 * max_err([theirs], [ref]) + 2**-6 * max(1.0, scale([ref]))



@pytest.mark.cuda
@pytest.mark.parametrize("K", [1, 3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_moments_triton(monkeypatch, K, dtype, channels_last):
    # the first fitting tile config, untimed: autotuning would compile every fitting config for each
    # of these 16 cases (~3 minutes); test_cuda_bfloat16_channels_last covers the autotuned path
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    x = (torch.randn(3, 40, 9, 11, dtype=torch.float64) * 2 + 5).cuda()
    xl = x.to(dtype)
    if channels_last:
        xl = xl.contiguous(memory_format=torch.channels_last)
    mean, cov = rm.repso_moments(xl, K)
    ref_mean, ref_cov = rm.repso_moments_ref(xl.double(), K)
    # float32 tiles on tensor cores (16-bit x, exact products) or in ieee float32: ~32 ulps
    assert (mean.double() - ref_mean).abs().max() <= 4e-6 * ref_mean.abs().max()
    assert (cov.double() - ref_cov).abs().max() <= 4e-6 * ref_cov.abs().max()
    g_mean, g_cov = torch.randn_like(ref_mean), torch.randn_like(ref_cov)
    gx = torch.ops.falconnet.repso_moments_backward(g_mean.float(), g_cov.float(), xl, mean, K)
    ref_gx = rm.repso_moments_backward_ref(g_mean, g_cov, xl.double(), ref_mean, K)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # grad_x is rounded to x's dtype
    assert (gx.double() - ref_gx).abs().max() <= tol * ref_gx.abs().max()


def test_repso_one_conv_steps_aside_for_syncbatchnorm(monkeypatch):
    """Under torch.distributed a SyncBatchNorm reduces its statistics across processes; the one
    conv folds this process's batch only, so the branch sum (SyncBatchNorm's own forward) runs."""
    from falconnet.layers import repso as repso_module
    from falconnet.layers.repso import RepSO

    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(RepSO(8).double().train())
    calls = []
    monkeypatch.setattr(repso_module, "repso_train_forward", lambda x, *a, **k: calls.append(1) or x)
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "forward", torch.nn.BatchNorm2d.forward)  # no process group here
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    synced(x)
    assert calls == [1]  # not distributed: nothing to synchronize, the one conv runs
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    synced(x)
    assert calls == [1]


@pytest.mark.parametrize("path", ["cpu-node-channels_last", "cpu-node-nchw", "triton-node"])
def test_one_conv_nodes_double_backward(monkeypatch, path):
    """A backward with create_graph=True through a one-conv node recomputes its gradients with
    PyTorch ops, so a gradient penalty's gradient through RepSO (for the layer after it, for
    RepSO's own branch weights and BatchNorm parameters) equals the branch form's; the kernels'
    first-order results would have cut those terms silently. float64 on the CPU node, float32 on
    the Triton node (the interpreter here)."""
    if path == "triton-node":
        use_triton(monkeypatch)
    dtype = torch.float32 if path == "triton-node" else torch.float64
    device = TRITON_DEVICE if path == "triton-node" else "cpu"
    torch.manual_seed(0)
    module = make_repso(16, "T", dtype=dtype).to(device)
    module.activation = "relu6"
    after = torch.nn.Conv2d(16, 8, 1).to(device=device, dtype=dtype)
    x = (torch.randn(2, 16, 6, 5, dtype=dtype) * 2).to(device)
    if path != "cpu-node-nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def penalty(layer):
        y = after(layer(x))
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return y, torch.autograd.grad(g.square().sum(), [after.weight] + parameters(layer))

    node = copy.deepcopy(module)
    branches = copy.deepcopy(module)
    branches.one_conv_training = False
    y1, second1 = penalty(node)
    y0, second0 = penalty(branches)
    expected = "_OneConvTrainTritonBackward" if path == "triton-node" else "_OneConvTrainCPUBackward"
    assert type(node(x).grad_fn).__name__ == expected
    # float32 on both sides on the Triton node: the two forms' own rounding (measured 1.2e-7 of
    # the largest second-order value; the bar leaves 100x)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert max_err([y1], [y0]) <= tol * max(1.0, scale([y0]))
    assert max_err(second1, second0) <= tol * max(1.0, scale(second0)), (max_err(second1, second0), scale(second0))
    assert scale(second0[:1]) > 0
