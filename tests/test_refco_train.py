"""RefCO's fused training form (falconnet/layers/refco_train.py: one or two SF-Conv calls with every
BatchNorm folded from its statistics) against the branch form it replaces (fused_training=False):
outputs, every gradient, running statistics, in float64 to ~1e-10 and in float32 / bfloat16
within the branch form's own error against float64."""
from __future__ import annotations

import copy

import pytest
import torch

from falconnet.layers import refco_train
from falconnet.layers.refco import RefCO
from falconnet.layers.refco_train import (
    _ChannelMoments,
    _FullMoments,
    _GroupMoments,
    _HiddenCovariance,
    fused_path_applies,
)

# (C_in, C_out, r, k, branches): FalconNet's widening stage-3 RefCO, odd group counts, r = 2, one
# branch; the stage-2 statistics come from the hidden covariance where the hidden width C_in/r is
# under branches * C_out, else from the SF-Conv call over every branch (the last three here)
CONFIGS = [(128, 512, 1, 16, 3), (48, 24, 1, 6, 3), (12, 10, 1, 2, 2), (24, 36, 2, 6, 1), (40, 20, 2, 4, 3),
           (64, 16, 1, 4, 3), (36, 12, 1, 6, 2), (32, 8, 2, 8, 1)]


def hidden_covariance_path(config) -> bool:
    C_in, C_out, r, k, M = config
    return C_in // r < M * C_out


def test_configs_cover_both_statistics_paths():
    assert {hidden_covariance_path(c) for c in CONFIGS} == {True, False}
ACTS = ["none", "relu6", "gelu"]  # gelu: not fused into the op's epilogue, applied after


def make_refco(C_in, C_out, r, k, M, dtype=torch.float64, activation="none", momentum=0.1) -> RefCO:
    module = RefCO(C_in, C_out, branches=M, r=r, k=k, activation=activation).to(dtype).train()
    with torch.no_grad():
        for bn in (module.bn1, module.bn2):
            bn.momentum = momentum
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    return module


def branch_twin(module: RefCO) -> RefCO:
    twin = copy.deepcopy(module)
    twin.fused_training = False
    return twin


def params(module: RefCO) -> list:
    return [module.weight1, module.weight2, module.bn1.weight, module.bn1.bias, module.bn2.weight, module.bn2.bias]


def run(module, x, residual, grad, autocast=False):
    """(y, grads of x, residual and every parameter, running statistics). With autocast, the
    forward runs under bfloat16 autocast and the backward outside it, as a training loop does
    (on a GPU the backward runs on autograd's device thread, where autocast is never on)."""
    x = x.detach().requires_grad_()
    res = None if residual is None else residual.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = module(x, res)
    inputs = [x] + ([res] if res is not None else []) + params(module)
    grads = torch.autograd.grad(y, inputs, grad)
    stats = [module.bn1.running_mean, module.bn1.running_var, module.bn2.running_mean, module.bn2.running_var]
    return y, grads, [s.clone() for s in stats]


def compare(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for i, (ga, gb) in enumerate(zip(a[1], b[1], strict=True)):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")
    for i, (sa, sb) in enumerate(zip(a[2], b[2], strict=True)):
        torch.testing.assert_close(sa, sb, rtol=rtol, atol=atol, msg=lambda m, i=i: f"running statistic {i}: {m}")


def make_input(shape, layout):
    """(N, C, H, W) float64 with a mean far from 0 (x * 2 + 3: the statistics must not cancel),
    NCHW, channels_last, or a non-contiguous slice of a wider tensor."""
    N, C, H, W = shape
    if layout == "sliced":
        return (torch.randn(N, C, H, W + 3, dtype=torch.float64) * 2 + 3)[..., 2:-1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return (torch.randn(N, C, H, W, dtype=torch.float64) * 2 + 3).contiguous(memory_format=fmt)


# where the fused form's batch statistics come from (refco_train.STATS): the per-group forms, or
# x's full covariance
STATS = ["groups", "gram"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "{}->{} r{} k{} M{}".format(*c))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("stats", STATS)
def test_fused_equals_branches_float64(monkeypatch, config, layout, act, stats):
    monkeypatch.setattr(refco_train, "STATS", stats)
    C_in, C_out, r, k, M = config
    fused = make_refco(*config, activation=act)
    branches = branch_twin(fused)
    x = make_input((3, C_in, 5, 7), layout)
    assert x.is_contiguous() == (layout == "nchw")
    residual = torch.randn(3, C_out, 5, 7, dtype=torch.float64) if act != "gelu" else None
    grad = torch.randn(3, C_out, 5, 7, dtype=torch.float64)
    out_f, out_b = run(fused, x, residual, grad), run(branches, x, residual, grad)
    compare(out_f, out_b, rtol=1e-10, atol=1e-10)
    if layout == "channels_last":
        assert out_f[0].is_contiguous(memory_format=torch.channels_last)
    assert fused.bn1.num_batches_tracked.item() == branches.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("modes", [("eval", "eval"), ("train", "eval"), ("eval", "train")])
@pytest.mark.parametrize("stats", STATS)
def test_mixed_batchnorm_modes_float64(monkeypatch, modes, stats):
    """Each BatchNorm uses batch or running statistics as its own mode says."""
    monkeypatch.setattr(refco_train, "STATS", stats)
    fused = make_refco(24, 36, 1, 6, 3, activation="relu")
    fused.bn1.train(modes[0] == "train")
    fused.bn2.train(modes[1] == "train")
    branches = branch_twin(fused)
    x = torch.randn(2, 24, 6, 5, dtype=torch.float64) + 1
    grad = torch.randn(2, 36, 6, 5, dtype=torch.float64)
    compare(run(fused, x, None, grad), run(branches, x, None, grad), rtol=1e-10, atol=1e-10)


def test_momentum_none_and_batch_one_float64():
    """Cumulative running averages (momentum=None) over three steps, batch 1 (3x3 positions)."""
    fused = make_refco(16, 32, 1, 4, 2, momentum=None)
    branches = branch_twin(fused)
    for step in range(3):
        x = torch.randn(1, 16, 3, 3, dtype=torch.float64) - step
        grad = torch.randn(1, 32, 3, 3, dtype=torch.float64)
        compare(run(fused, x, None, grad), run(branches, x, None, grad), rtol=1e-10, atol=1e-10)
    assert fused.bn2.num_batches_tracked.item() == 3


def test_without_batchnorm_float64():
    fused = RefCO(24, 36, branches=3, k=6, bn=False).double()
    branches = branch_twin(fused)
    x = torch.randn(2, 24, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(x), branches(x), rtol=1e-12, atol=1e-12)


def test_empty_batch_in_eval_mode():
    fused = make_refco(24, 36, 1, 6, 3).eval()
    y = fused(torch.randn(0, 24, 4, 5, dtype=torch.float64))
    assert y.shape == (0, 36, 4, 5)


def relative_errors(out, exact) -> list[float]:
    """Max abs error of each tensor over its reference's max abs value. bn1's beta gradient is 0
    in exact arithmetic (bn2 re-centres whatever shift it adds), so every gradient is measured
    against at least 1e-4 of the largest gradient's scale."""
    grad_scale = max(g.abs().max().item() for g in exact[1])
    floors = [0.0, 1e-4 * grad_scale, 0.0]
    return [max((a.double().cpu() - b).abs().max().item() / max(b.abs().max().item(), floor) for a, b in zip(o, e, strict=True))
            for o, e, floor in zip(([out[0]], out[1], out[2]), ([exact[0]], exact[1], exact[2]), floors, strict=True)]


def assert_within_branch_error(config, x, grad, dtype, device="cpu", floor=1e-6, autocast=False):
    """The fused form and the branch form of one RefCO, both in `dtype` on `device` (under
    bfloat16 autocast if asked), against the float64 branch form: the fused form's relative
    error in the output, every gradient and the running statistics is at most twice the branch
    form's plus `floor` (both round every stage; neither is the reference)."""
    reference = branch_twin(make_refco(*config, activation="relu6"))
    low_branches = copy.deepcopy(reference).to(device=device, dtype=dtype)
    low_fused = copy.deepcopy(low_branches)
    low_fused.fused_training = True
    exact = run(reference, x, None, grad)
    xl, gl = x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)
    fused_err = relative_errors(run(low_fused, xl, None, gl, autocast), exact)
    branch_err = relative_errors(run(low_branches, xl, None, gl, autocast), exact)
    for what, f, b in zip(("output", "gradients", "running statistics"), fused_err, branch_err, strict=True):
        assert f <= 2 * b + floor, f"{what}: fused {f:.2e} vs branch form {b:.2e}"


@pytest.mark.parametrize("config", [(64, 128, 1, 8, 3), (128, 32, 1, 4, 3)], ids=["hidden-cov", "z-stats"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast-bfloat16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stats", STATS)
def test_fused_error_within_branch_error(monkeypatch, config, dtype, layout, stats):
    """Against the float64 branch form, the fused form in float32 / bfloat16 / float32 under
    bfloat16 autocast errs no more than twice the branch form does in the same setting (plus
    1e-6): both round every stage; neither is the reference. Output, every gradient and the
    running statistics."""
    monkeypatch.setattr(refco_train, "STATS", stats)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    autocast = dtype.startswith("autocast")
    C_in, C_out = config[:2]
    x = (torch.randn(4, C_in, 9, 11, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
    grad = torch.randn(4, C_out, 9, 11, dtype=torch.float64)
    assert_within_branch_error(config, x, grad, torch.float32 if autocast else getattr(torch, dtype), autocast=autocast)


@pytest.mark.parametrize("C,k", [(6, 3), (6, 2), (40, 4), (36, 18)])  # 1 block of 2-3 groups, 5 blocks of 2, k > 16
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_moments_gradcheck(C, k, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, C, 3, 4, dtype=torch.float64) + 2).contiguous(memory_format=fmt).requires_grad_()
    mean, cov = _GroupMoments.apply(x, k, torch.float64)
    xg = x.detach().transpose(0, 1).reshape(C // k, k, -1)
    torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(cov, torch.stack([torch.cov(g, correction=0) for g in xg]))
    assert torch.autograd.gradcheck(lambda t: _GroupMoments.apply(t, k, torch.float64), (x,))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("chunks", ["one", "per-image"])
def test_full_moments_gradcheck(monkeypatch, layout, chunks):
    """_FullMoments against torch.cov over every pixel, float64, a mean far from 0; gradcheck
    through both outputs; with the channels_last Gram matrix in one GEMM (the CPU) or in partials
    over image chunks (a GPU's _gram_chunks)."""
    if chunks == "per-image":
        monkeypatch.setattr(refco_train, "_gram_chunks", lambda N, C, gpu: N)
    x = make_input((3, 6, 3, 4), layout).requires_grad_()
    mean, cov = _FullMoments.apply(x, torch.float64)
    flat = x.detach().transpose(0, 1).reshape(6, -1)  # (C, every pixel)
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(cov, torch.cov(flat, correction=0))
    assert torch.autograd.gradcheck(lambda t: _FullMoments.apply(t, torch.float64), (x,))
    if layout == "channels_last":  # the gradient keeps x's layout
        (grad,) = torch.autograd.grad(_FullMoments.apply(x, torch.float64)[1].sum(), x)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gram_16bit_gpu_path_emulated(monkeypatch, layout):
    """The GPU's 16-bit path of _FullMoments (x into the GEMMs as it is, float32 output, g in two
    16-bit parts in the backward) run on the CPU with out_dtype matmuls emulated in float32 (the
    same values: 16-bit products are exact in float32): bfloat16 fused form within twice the
    bfloat16 branch form's error against float64, at a widening and a narrowing shape."""
    monkeypatch.setattr(refco_train, "STATS", "gram")
    monkeypatch.setattr(refco_train, "_raw16", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    calls = []
    monkeypatch.setattr(refco_train, "_mm32", lambda a, b: calls.append("mm") or a.float() @ b.float())
    monkeypatch.setattr(refco_train, "_bmm32", lambda a, b: calls.append("bmm") or torch.bmm(a.float(), b.float()))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for config in [(64, 128, 1, 8, 3), (128, 32, 1, 4, 3)]:
        x = (torch.randn(4, config[0], 9, 11, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
        grad = torch.randn(4, config[1], 9, 11, dtype=torch.float64)
        assert_within_branch_error(config, x, grad, torch.bfloat16)
    # forward: one batched GEMM; backward (channels_last): two, g's high and low parts
    assert calls == (["bmm", "mm", "mm"] * 2 if layout == "channels_last" else ["bmm"] * 2)


def test_gram_chunks():
    """Partial Gram matrices: one on the CPU; on a GPU one an image while their float32 partials
    fit 64 MB, else the largest divisor of the batch that fits (or one)."""
    assert refco_train._gram_chunks(128, 1024, False) == 1
    assert refco_train._gram_chunks(128, 32, True) == 128
    assert refco_train._gram_chunks(128, 1024, True) == 16
    assert refco_train._gram_chunks(6, 1024, True) == 6
    assert refco_train._gram_chunks(7, 4096, True) == 1


def test_out_dtype_matmul_fallback(monkeypatch):
    """Where torch's out_dtype matmuls are refused (a CPU tensor here: CUDA only), _bmm32 / _mm32
    warn once and multiply float32 copies: the same values."""
    monkeypatch.setattr(refco_train, "_OUT_DTYPE_MATMUL", [True])
    a, b = torch.randn(3, 4, 5).bfloat16(), torch.randn(3, 5, 2).bfloat16()
    with pytest.warns(UserWarning, match="out_dtype"):
        out = refco_train._bmm32(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, torch.bmm(a.float(), b.float()))
    assert refco_train._mm32(a[0], b[0]).dtype == torch.float32  # no second warning: the flag is cleared
    assert refco_train._OUT_DTYPE_MATMUL == [False]


@pytest.mark.parametrize("shape,gram", [((32, 128), True), ((64, 256), True), ((128, 512), True), ((256, 1024), False),
                                        ((128, 32), False), ((1024, 256), False)], ids=str)
def test_cpu_statistics_choice(monkeypatch, shape, gram):
    """STATS = "auto" on the CPU takes x's full covariance at the widening shapes where it measured
    faster (refco_train._gram_cheaper) and the per-group forms elsewhere; the forward says which
    by the moments it calls."""
    called = []
    for cls in (_FullMoments, _GroupMoments):
        monkeypatch.setattr(cls, "apply", lambda *a, _f=cls.apply, _n=cls.__name__: called.append(_n) or _f(*a))
    layer = RefCO(*shape, branches=3, r=1).train()
    layer(torch.randn(2, shape[0], 3, 3))
    assert called == (["_FullMoments"] if gram else ["_GroupMoments"])


def test_moments_stay_float32_under_autocast():
    """BatchNorm keeps its statistics in float32 under autocast; so do the folded ones (a
    bfloat16 Gram would carry ~3e-3 relative error into every variance)."""
    x = torch.randn(4, 32, 6, 6, dtype=torch.float64) + 1
    exact = _GroupMoments.apply(x, 8, torch.float64)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cov = _GroupMoments.apply(x.float(), 8, torch.float32)[1]
    assert cov.dtype == torch.float32
    torch.testing.assert_close(cov.double(), exact, rtol=1e-5, atol=1e-6)
    w1 = torch.randn(4, 6, 8, dtype=torch.float64)
    exact = _HiddenCovariance.apply(x, x.mean((0, 2, 3)), w1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cov = _HiddenCovariance.apply(x.float(), x.float().mean((0, 2, 3)), w1.float())
    assert cov.dtype == torch.float32
    torch.testing.assert_close(cov.double(), exact, rtol=1e-5, atol=1e-5)
    exact = _FullMoments.apply(x, torch.float64)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cov = _FullMoments.apply(x.float(), torch.float32)[1]
    assert cov.dtype == torch.float32
    torch.testing.assert_close(cov.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("C,k,c_h", [(12, 4, 2), (40, 4, 4), (36, 18, 3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_hidden_covariance_gradcheck(C, k, c_h, layout):
    """Against the hidden values formed one pixel at a time; gradcheck perturbs x with its mean
    recomputed (the function takes the mean as a constant: no gradient flows through it)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    G = C // k
    x = (torch.randn(2, C, 3, 4, dtype=torch.float64) + 1).contiguous(memory_format=fmt).requires_grad_()
    w1 = torch.randn(G, c_h, k, dtype=torch.float64, requires_grad=True)
    cov = _HiddenCovariance.apply(x, x.detach().mean((0, 2, 3)), w1)
    xg = x.detach().permute(0, 2, 3, 1).reshape(-1, G, k)
    hidden = torch.einsum("pgi,gji->pjg", xg - xg.mean(0), w1.detach())
    torch.testing.assert_close(cov, torch.einsum("pjg,pjh->jgh", hidden, hidden) / hidden.shape[0])
    assert torch.autograd.gradcheck(lambda a, b: _HiddenCovariance.apply(a, a.mean((0, 2, 3)).detach(), b), (x, w1))


def test_channel_moments_gradcheck():
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_ChannelMoments.apply, (z,))


def test_falls_back_to_the_branches(monkeypatch):
    fused = make_refco(12, 10, 1, 2, 2)
    # float16 on the CPU, given or through autocast: no kernel takes it; the branch form runs
    assert not fused_path_applies(torch.randn(2, 12, 3, 3, dtype=torch.float16), (fused.bn1, fused.bn2))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fused_path_applies(torch.randn(2, 12, 3, 3), (fused.bn1, fused.bn2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_path_applies(torch.randn(2, 12, 3, 3), (fused.bn1, fused.bn2))
    # one value per channel in training: BatchNorm's own error, from the branch form
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 12, 1, 1, dtype=torch.float64))
    # SyncBatchNorm under torch.distributed: cross-process statistics, which the fold lacks
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    assert fused_path_applies(x, (synced.bn1, synced.bn2))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert not fused_path_applies(x, (synced.bn1, synced.bn2))
    assert fused_path_applies(x, (fused.bn1, fused.bn2))


def test_option_is_checked():
    with pytest.raises(ValueError, match="fused_training must be True or False"):
        RefCO(8, 8, fused_training="auto")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [(128, 512, 1, 16, 3), (512, 128, 1, 8, 3)], ids=["widening", "narrowing"])
@pytest.mark.parametrize("stats", STATS)
def test_cuda_fused_matches_cpu_float64(monkeypatch, dtype, config, stats):
    """On the GPU (whatever backend the ops pick) against the float64 branch form on the CPU,
    within twice the GPU branch form's own error (true float32 convs: cuDNN's TF32 default
    would set the branch form's error, not the kernels'), with either statistics form ("gram",
    the GPU's default, takes bfloat16 x into its GEMMs as it is)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(refco_train, "STATS", stats)
    C_in, C_out = config[:2]
    x = torch.randn(8, C_in, 14, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, C_out, 14, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_within_branch_error(config, x, grad, dtype, device="cuda", floor=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_training_compiles_fullgraph(layout):
    """torch.compile(fullgraph=True) traces the fused form (the ops' fake kernels, the two
    moment functions) and gives the eager results, running statistics included."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager = make_refco(48, 24, 1, 6, 3, activation="relu6")
    traced = copy.deepcopy(eager)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 48, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    residual = torch.randn(2, 24, 5, 6, dtype=torch.float64)
    grad = torch.randn(2, 24, 5, 6, dtype=torch.float64)
    out_e = run(eager, x, residual, grad)
    xc, rc = x.detach().requires_grad_(), residual.detach().requires_grad_()
    y = compiled(xc, rc)
    grads = torch.autograd.grad(y, [xc, rc] + params(traced), grad)
    stats = [traced.bn1.running_mean, traced.bn1.running_var, traced.bn2.running_mean, traced.bn2.running_var]
    compare(out_e, (y, grads, stats), rtol=1e-10, atol=1e-10)


def test_falconnet_model_trains_the_same_in_either_form():
    """The registry's FalconNet (RefCO in stage 3, with the residual passed into the second
    RefCO) in float64: logits and every parameter gradient of one training step agree."""
    from falconnet.models import create_model

    torch.manual_seed(0)
    fused = create_model("falconnet", num_classes=10).double().train()
    branches = copy.deepcopy(fused)
    refcos = [m for m in branches.modules() if isinstance(m, RefCO)]
    assert refcos and all(m.fused_training for m in refcos)
    for m in refcos:
        m.fused_training = False
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([1, 4, 7])
    out = []
    for model in (fused, branches):
        logits = model(x)
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), list(model.parameters()))
        out.append((logits, grads))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-9, atol=1e-9)
    for (name, _), ga, gb in zip(fused.named_parameters(), out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_falconnet_step_under_autocast_with_backward_outside_it():
    """A training step as the trainer takes it: the registry's FalconNet (RepSO, RefCO, ConvBN in
    their training forms) forward under bfloat16 autocast, the backward after the context exits
    (the GPU run of 2026-11-26 failed so: RefCO's batch-major bmm node got a bfloat16 gradient for
    float32 operands). Every parameter gets a finite float32 gradient. (Their distance from the
    float32 step's is no check: at random init that distance is ~0.8-0.9 of the gradient's norm
    for the pure-PyTorch branch forms too, bfloat16 rounding amplified through small-batch
    BatchNorms.)"""
    from falconnet.models import create_model

    torch.manual_seed(0)
    model = create_model("falconnet", num_classes=10).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 4]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_running_stats_float64(mode):
    """BatchNorms built with track_running_stats=False use batch statistics in eval mode too."""
    fused = make_refco(24, 36, 1, 6, 2)
    fused.bn1 = torch.nn.BatchNorm2d(fused.bn1.num_features, track_running_stats=False).double()
    fused.bn2 = torch.nn.BatchNorm2d(fused.bn2.num_features, track_running_stats=False).double()
    fused.train(mode == "train")
    branches = branch_twin(fused)
    x = torch.randn(2, 24, 4, 5, dtype=torch.float64) + 2
    grad = torch.randn(2, 36, 4, 5, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), branches(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(ya, [xa] + params(fused), grad)
    gb = torch.autograd.grad(yb, [xb] + params(branches), grad)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
@pytest.mark.parametrize("config", [(32, 64, 1, 8, 3), (64, 16, 1, 4, 3)], ids=["hidden-cov", "z-stats"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("form", ["gemm", "two-stage"])
def test_fused_on_the_triton_kernels(monkeypatch, config, layout, form):
    """The fused form with the SF-Conv op on its Triton backend (the GPU default; on CPU tensors in
    the interpreter without a GPU) in either of its forms (the composed GEMM, the default for
    16-bit x, routed here for float32; or the two-stage kernel), float32 with true-float32 convs, against the float64 branch form: within
    twice the float32 branch form's own error (plus 1e-6)."""
    from falconnet_kernels import _backend, triton_sf_gemm

    monkeypatch.setenv("FALCONNET_BACKEND", "triton")
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")  # on a GPU: one tile, not every config compiled
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # CPU tensors take the C++ kernels whatever the variable says: route them
        monkeypatch.setattr(_backend, "select", lambda op, dev, pass_="forward": "triton")
    calls = []
    from falconnet_kernels import triton_sf_conv

    monkeypatch.setattr(triton_sf_gemm, "COMPOSED", triton_sf_gemm.COMPOSED if form == "gemm" else set())
    monkeypatch.setattr(triton_sf_gemm, "COMPOSED_DTYPES", (torch.float32,))  # float32: the default's 16-bit route
    module = triton_sf_gemm if form == "gemm" else triton_sf_conv
    real = module.sf_conv_forward
    monkeypatch.setattr(module, "sf_conv_forward", lambda *a: calls.append(1) or real(*a))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, config[0], 5, 6, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt)
    grad = torch.randn(2, config[1], 5, 6, dtype=torch.float64)
    assert_within_branch_error(config, x, grad, torch.float32, device=device)
    assert calls, f"the Triton SF-Conv kernel ({form}) did not run"


def test_falconnet_info_names_the_training_forms(capsys, monkeypatch):
    from falconnet import cli

    assert cli.main(["info", "--json"]) == 0
    import json

    training = json.loads(capsys.readouterr().out)["training"]
    assert set(training) == {"RepSO", "RefCO", "ConvBN"}
    assert "one conv" in training["RepSO"] and "fused" in training["RefCO"] and "STATS='auto'" in training["RefCO"]
    assert cli.main(["info"]) == 0
    assert "training forms" in capsys.readouterr().out
    # on a GPU with Triton: the RepSO node's kernel choices, as set
    from falconnet import info
    from falconnet.layers import repso_train

    assert "the conv 'rows', its weight gradient 'rows'" in info.training_paths({"gpu": "x", "triton": True})["RepSO"]
    monkeypatch.setattr(repso_train, "WEIGHT_GRAD", "cudnn")
    assert "its weight gradient 'cudnn'" in info.training_paths({"gpu": "x", "triton": True})["RepSO"]


def test_double_backward_says_to_use_the_branch_form():
    """The fused form's statistics nodes have no double backward: a backward with create_graph=True
    raises an error naming the remedy; RefCO(fused_training=False) then gives a gradient penalty's
    gradient (its convs and the SF-Conv op recompute through PyTorch ops), nonzero and finite."""
    from falconnet.layers.refco import RefCO

    torch.manual_seed(0)
    layer = RefCO(16, 32, branches=3, r=1, k=4, activation="relu6").double().train()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match=r"fused_training=False"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    layer.fused_training = False
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    second = torch.autograd.grad(g.square().sum(), list(layer.parameters()), allow_unused=True)
    used = [s for s in second if s is not None]
    assert used and all(torch.isfinite(s).all() for s in used) and max(s.abs().max() for s in used) > 0
