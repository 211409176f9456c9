"""Layers: SFConv2d (against its dense weight and a direct loop over SPEC section 4), the k rule
and parameter count, RefCO's branch semantics, RepSO's branch structure and Table 3 configs,
the Meta blocks (Table 2) and every Table 1 block, and their bad-input errors.

Tolerances: float64 comparisons of the same math in a different order sit at ~1e-15 relative;
1e-10 leaves room for accumulation without hiding a wrong index.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from falconnet.layers import (
    BLOCKS,
    TABLE2_CONFIGS,
    TABLE3_CONFIGS,
    MetaLightBlock,
    RefCO,
    RepSO,
    SFConv2d,
    choose_k,
    make_block,
    sf_conv_params,
    table2_block,
    table3_config,
)

F64 = torch.float64


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def sf_conv_loop(x, w1, w2, bias=None, residual=None, activation="none"):
    """SPEC section 4 term by term, one pixel at a time: the definition, not a fast path."""
    G, c_h, k = w1.shape
    m = w2.shape[1]
    N, C_in, H, W = x.shape
    y = torch.zeros(N, c_h * m, H, W, dtype=x.dtype)
    for n in range(N):
        for p in range(H):
            for q in range(W):
                hidden = [[sum(w1[g, j, i] * x[n, g * k + i, p, q] for i in range(k)) for j in range(c_h)] for g in range(G)]
                for j in range(c_h):
                    for t in range(m):
                        y[n, j * m + t, p, q] = sum(w2[j, t, g] * hidden[g][j] for g in range(G))
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    y = {"none": y, "relu": F.relu(y), "relu6": F.relu6(y)}[activation]
    return y if residual is None else y + residual


# ------------------------------------------------------------------------------------------
# SFConv2d


@pytest.mark.parametrize("c_in,c_out,r,k", [(6, 6, 1, 3), (8, 12, 2, 4), (12, 4, 1, 2), (9, 3, 3, 3)])
def test_sf_conv_matches_spec_loop(c_in, c_out, r, k):
    layer = SFConv2d(c_in, c_out, r=r, k=k, bias=True, activation="relu6").double()
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    assert layer.weight1.shape == (c_in // k, k // r, k)
    assert layer.weight2.shape == (k // r, c_out // (k // r), c_in // k)
    x = torch.randn(2, c_in, 3, 2, dtype=F64) * 3
    res = torch.randn(2, c_out, 3, 2, dtype=F64)
    expected = sf_conv_loop(x, layer.weight1, layer.weight2, layer.bias, res, "relu6")
    torch.testing.assert_close(layer(x, residual=res), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c_in,c_out,r", [(32, 128, 1), (128, 32, 1), (64, 64, 2), (48, 96, 4)])
def test_sf_conv_matches_dense_weight(c_in, c_out, r):
    layer = SFConv2d(c_in, c_out, r=r).double()
    x = torch.randn(2, c_in, 5, 4, dtype=F64)
    dense = layer.dense_weight()
    assert dense.shape == (c_out, c_in)
    torch.testing.assert_close(layer(x), F.conv2d(x, dense[:, :, None, None]), rtol=1e-10, atol=1e-10)
    # gradients through the op's backward equal the dense conv's gradients
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    g = torch.randn(2, c_out, 5, 4, dtype=F64)
    (layer(x1) * g).sum().backward()
    (F.conv2d(x2, layer.dense_weight()[:, :, None, None]) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c_in,c_out,r,k", [(128, 512, 1, 16), (512, 128, 1, 8), (64, 64, 2, 8), (48, 96, 4, 12), (6, 6, 1, 3)])
def test_sf_conv_parameter_count(c_in, c_out, r, k):
    layer = SFConv2d(c_in, c_out, r=r, k=k)
    assert sum(p.numel() for p in layer.parameters()) == c_in * k // r + c_in * c_out // k
    assert sf_conv_params(c_in, c_out, r, k) == c_in * k // r + c_in * c_out // k
    assert sum(p.numel() for p in SFConv2d(c_in, c_out, r=r, k=k, bias=True).parameters()) == sf_conv_params(c_in, c_out, r, k) + c_out


@pytest.mark.parametrize("c_in,c_out,r", [(128, 512, 1), (512, 128, 1), (64, 256, 2), (96, 32, 1), (256, 1024, 4), (30, 45, 1)])
def test_choose_k_is_the_valid_k_nearest_sqrt(c_in, c_out, r):
    k = choose_k(c_in, c_out, r)
    valid = [v for v in range(1, c_in + 1) if c_in % v == 0 and v % r == 0 and c_out % (v // r) == 0]
    assert k in valid
    target = math.sqrt(r * c_out)
    assert abs(k - target) == min(abs(v - target) for v in valid)
    SFConv2d(c_in, c_out, r=r)  # the chosen k builds


def test_choose_k_breaks_ties_by_fewer_parameters():
    # C_in = 9, C_out = 36, r = 1: target sqrt(36) = 6, valid k = 1, 3, 9; 3 and 9 are both 3 away.
    # k = 9 has fewer parameters (9*9 + 9*36/9 = 117 against 9*3 + 9*36/3 = 135), so it wins.
    assert sf_conv_params(9, 36, 1, 9) < sf_conv_params(9, 36, 1, 3)
    assert choose_k(9, 36, 1) == 9
    # C_in = 16, C_out = 72, r = 2: target 12, valid 8 and 16 tie; 16 has fewer parameters (200 < 208)
    assert choose_k(16, 72, 2) == 16


def test_sf_conv_init_gives_xavier_scale_to_the_dense_equivalent():
    torch.manual_seed(1)
    layer = SFConv2d(256, 256)
    var = layer.dense_weight().var().item()
    # 65536 entries: the sample variance is within a few percent of the population value
    assert var == pytest.approx(2 / (256 + 256), rel=0.05)


@pytest.mark.parametrize(
    "c_in,c_out,r,k,constraint",
    [
        (10, 8, 1, 4, "k to divide C_in"),
        (12, 8, 3, 4, "r to divide k"),
        (12, 10, 1, 4, "c_h = k/r to divide C_out"),
    ],
)
def test_sf_conv_bad_config_names_the_constraint(c_in, c_out, r, k, constraint):
    with pytest.raises(ValueError, match=re.escape(constraint)):
        SFConv2d(c_in, c_out, r=r, k=k)
    with pytest.raises(ValueError, match=re.escape(constraint)):
        RefCO(c_in, c_out, r=r, k=k)


def test_sf_conv_wrong_input_channels():
    with pytest.raises(ValueError, match="channels"):
        SFConv2d(8, 8)(torch.randn(1, 6, 2, 2))


# ------------------------------------------------------------------------------------------
# RefCO


def refco_branchwise(x, refco):
    """RefCO's training form branch by branch with explicit per-branch BatchNorms (batch statistics)."""
    M, G, c_h = refco.num_branches, refco.groups, refco.hidden
    hidden = 0
    for b in range(M):
        h = torch.einsum("ngihw,gji->ngjhw", x.view(x.shape[0], G, refco.k, *x.shape[2:]), refco.weight1[b])
        h = h.reshape(x.shape[0], G * c_h, *x.shape[2:])
        sl = slice(b * G * c_h, (b + 1) * G * c_h)
        bn = refco.bn1
        hidden = hidden + F.batch_norm(h, None, None, bn.weight[sl], bn.bias[sl], training=True, eps=bn.eps)
    y = 0
    for b in range(M):
        yb = torch.einsum("ngjhw,jtg->njthw", hidden.view(x.shape[0], G, c_h, *x.shape[2:]), refco.weight2[b])
        yb = yb.reshape(x.shape[0], refco.out_channels, *x.shape[2:])
        sl = slice(b * refco.out_channels, (b + 1) * refco.out_channels)
        bn = refco.bn2
        y = y + F.batch_norm(yb, None, None, bn.weight[sl], bn.bias[sl], training=True, eps=bn.eps)
    return y


def test_refco_training_form_is_m_branches_with_their_own_bn():
    refco = RefCO(24, 48, branches=3, k=6).double().train()
    randomize_bn(refco)
    x = torch.randn(4, 24, 3, 3, dtype=F64)
    torch.testing.assert_close(refco(x), refco_branchwise(x, refco), rtol=1e-10, atol=1e-10)


def test_refco_without_bn_is_the_sum_of_sf_convs():
    refco = RefCO(16, 32, branches=2, bn=False).double()
    x = torch.randn(2, 16, 3, 3, dtype=F64)
    w1, w2 = refco.weight1.sum(0), refco.weight2.sum(0)
    # stage sums: H = sum_b W1_b x, y = sum_b W2_b H
    from falconnet_kernels import sf_conv_ref

    torch.testing.assert_close(refco(x), sf_conv_ref(x, w1, w2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_refco_reparameterizes_to_one_sf_conv(dtype, tol):
    refco = RefCO(32, 64, branches=3, r=2, activation="relu6").to(dtype).eval()
    randomize_bn(refco)
    x = torch.randn(2, 32, 4, 4, dtype=dtype)
    res = torch.randn(2, 64, 4, 4, dtype=dtype)
    with torch.no_grad():
        before = refco(x, residual=res)
        refco.reparameterize()
        refco.reparameterize()  # harmless
        after = refco(x, residual=res)
    assert isinstance(refco.sf, SFConv2d) and refco.sf.bias is not None and refco.sf.activation == "relu6"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in refco.modules())
    assert sum(p.numel() for p in refco.parameters()) == sf_conv_params(32, 64, 2, refco.k) + 64
    torch.testing.assert_close(after, before, rtol=tol, atol=tol * before.abs().max().item())


# ------------------------------------------------------------------------------------------
# RepSO


def test_repso_branch_structure_contract():
    so = RepSO(8)
    sizes = sorted(tuple(b.conv.kernel_size) for b in so.branches)
    assert sizes == sorted([(3, 3)] * 3 + [(1, 3), (3, 1), (1, 1)])
    for b in so.branches:
        kh, kw = b.conv.kernel_size
        assert b.conv.weight.shape == (8, 1, kh, kw)
        assert b.conv.bias is None and b.conv.groups == 8 and b.conv.padding == (kh // 2, kw // 2)
        assert isinstance(b.bn, torch.nn.BatchNorm2d)
    assert isinstance(so.identity_bn, torch.nn.BatchNorm2d)
    x = torch.randn(2, 8, 5, 5)
    expected = sum(b.bn(b.conv(x)) for b in so.branches) + so.identity_bn(x)
    torch.testing.assert_close(so._train_forward(x), expected)


def test_table3_columns_reading():
    # row T is the paper's seven-branch RepSO; row C the single 3x3 (= IRB)
    assert table3_config("T") == dict(identity=True, n1x1=1, n1x3=1, n3x1=1, n3x3=3, extra={})
    assert table3_config("C") == dict(identity=False, n1x1=0, n1x3=0, n3x1=0, n3x3=1, extra={})
    assert table3_config("E")["extra"] == {(5, 5): 1} and table3_config("F")["extra"] == {(7, 7): 1}
    assert len(TABLE3_CONFIGS) == 20
    with pytest.raises(ValueError, match="Table 3 row"):
        table3_config("Z")


@pytest.mark.parametrize("row", sorted(TABLE3_CONFIGS))
def test_table3_rows_run_and_fold_exactly(row):
    so = RepSO(6, activation="relu6", **TABLE3_CONFIGS[row]).double().eval()
    randomize_bn(so)
    x = torch.randn(2, 6, 7, 7, dtype=F64)
    with torch.no_grad():
        before = so(x)
        so.reparameterize()
        so.reparameterize()
        after = so(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    if row != "A":
        assert so.reparam_conv.weight.shape == (6, 1, *so.kernel_size) and len(so.branches) == 0


def test_repso_stride2_folds_and_identity_needs_stride1():
    so = RepSO(4, stride=2, identity=False).double().eval()
    randomize_bn(so)
    x = torch.randn(1, 4, 7, 6, dtype=F64)
    with torch.no_grad():
        before = so(x)
        so.reparameterize()
        torch.testing.assert_close(so(x), before, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="identity"):
        RepSO(4, stride=2)


def test_repso_float32_fold_within_pytorch_float32_error():
    so = RepSO(16, activation="relu6").eval()
    randomize_bn(so)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = so.double()(x.double())
        so.float()
        train32 = so(x)
        so.reparameterize()
        dep32 = so(x)
    err_train = (train32.double() - ref).abs().max().item()
    err_dep = (dep32.double() - ref).abs().max().item()
    assert err_dep <= 4 * err_train + 1e-6
    assert err_dep / ref.abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------
# Meta blocks and Table 1 blocks


@pytest.mark.parametrize("row", sorted(TABLE2_CONFIGS))
def test_table2_rows_construct_and_run(row):
    block = table2_block(row, 16)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_meta_basic_block_bad_operator():
    with pytest.raises(ValueError, match="so2 must be one of"):
        table2_block("A", 8, so2="lstm")
    with pytest.raises(ValueError, match="Table 2 row"):
        table2_block("Z", 8)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_table1_blocks_keep_shape(name):
    block = make_block(name, 32)
    x = torch.randn(2, 32, 7, 7)
    assert block(x).shape == x.shape


def test_deployed_falcon_block_runs_on_fused_ops_only():
    block = MetaLightBlock(32, spatial="repso", channel="refco").eval()
    randomize_bn(block)
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        before = block(x)
        for m in list(block.modules()):
            if hasattr(m, "reparameterize"):
                m.reparameterize()
        with FlopCounterMode(display=False) as counter:
            after = block(x)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert ops == {"falconnet.sf_conv", "falconnet.dw_conv3x3"}, ops
    assert block.co1.sf.activation == "relu6" and block.so.activation == "relu6" and block.co2.sf.activation == "none"
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_unknown_block_and_activation():
    with pytest.raises(ValueError, match="unknown block type"):
        make_block("resnet", 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        make_block("irb", 8, activation="tanh")


def test_conv_bn_inplace_activation_and_residual_match_out_of_place():
    """ConvBN applies relu / relu6 in place on its fresh output and adds the residual in place when
    autograd does not record it: values equal the out-of-place definition, gradients too."""
    import torch.nn.functional as F

    from falconnet.layers.conv_bn import ConvBN

    torch.manual_seed(0)
    for activation in ("relu", "relu6", "silu"):
        layer = ConvBN(8, 8, 1, activation=activation).double().train()
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
        act = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu}[activation]
        ref = act(layer.bn(layer.conv(x))) + r
        out = layer(x, residual=r)
        assert torch.allclose(out, ref, rtol=0, atol=1e-12)
        g = torch.randn_like(out)
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12)
                   for a, b in zip(torch.autograd.grad(out, [x, r], g), torch.autograd.grad(ref, [x, r], g)))
        layer.eval()
        with torch.no_grad():
            expect = act(layer.bn(layer.conv(x))) + r
            assert torch.allclose(layer(x, residual=r), expect, rtol=0, atol=1e-12)


def test_add_residual_keeps_the_out_of_place_rules():
    """In place only when it gives what y + residual gives: same dtype and shape, autograd off."""
    from falconnet.layers.activation import add_residual

    y, r = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3)
    assert add_residual(y, r).dtype == torch.float32  # promotion, as y + r
    y1, r2 = torch.ones(1, 3), torch.ones(2, 3)
    assert add_residual(y1, r2).shape == (2, 3)  # broadcasting, as y + r
    y = torch.ones(2, 3)
    out = add_residual(y, torch.ones(2, 3))
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, torch.full((2, 3), 2.0))


BN_VARIANTS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]


def conv_bn_pair(activation: str, kw: dict, dtype, twin_dtype=None):
    """A training ConvBN with the BatchNorm variant kw, and a deep copy (in twin_dtype) to run the
    definition on: nn.BatchNorm2d then the activation."""
    import copy

    from falconnet.layers.conv_bn import ConvBN

    layer = ConvBN(5, 7, 3, activation=activation).to(dtype).train()
    layer.bn = torch.nn.BatchNorm2d(7, **kw).to(dtype)
    if layer.bn.affine:
        with torch.no_grad():
            layer.bn.weight.uniform_(0.5, 1.5)
            layer.bn.bias.normal_()
    return layer, copy.deepcopy(layer).to(twin_dtype or dtype)


def conv_bn_input(dtype, channels_last: bool) -> torch.Tensor:
    """Values on both sides of 0 and 6 after the BatchNorm, a mean far from zero, exact zeros."""
    x = (torch.randn(3, 5, 6, 7) * 4 + 3).to(dtype)
    x[0, :, 0, 0] = 0
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()


def conv_bn_step(layer, x, g, definition: bool):
    import torch.nn.functional as F

    fn = {"relu6": F.relu6, "relu": F.relu, "none": lambda t: t}[layer.activation]
    y = fn(layer.bn(layer.conv(x))) if definition else layer(x)
    assert definition or type(y.grad_fn).__name__ == "_BatchNormActBackward"
    return [y, *torch.autograd.grad(y, [x, *layer.parameters()], g.to(y.dtype))], list(layer.buffers())


@pytest.mark.parametrize("case", ["nchw-float32", "nchw-float64", "bfloat16", "channels_last-backend-torch"])
def test_conv_bn_training_node_native_path_is_bitwise_batchnorm_then_activation(monkeypatch, case):
    """Inputs the C++ kernels do not take (NCHW, bfloat16; or FALCONNET_BACKEND=torch) run the node
    on torch's native_batch_norm: the kernels nn.BatchNorm2d + F.relu6 run (the mask from the
    output selects the same elements as from the input), so outputs, every gradient, the running
    statistics and num_batches_tracked are bitwise equal, for affine / non-affine, tracked /
    untracked and momentum None (cumulative average) BatchNorms, over two steps."""
    if case == "channels_last-backend-torch":
        monkeypatch.setenv("FALCONNET_BACKEND", "torch")
    dtype = {"nchw-float64": torch.float64, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    torch.manual_seed(0)
    for activation in ("relu6", "relu", "none"):
        for kw in BN_VARIANTS:
            for channels_last in ([False, True] if case == "bfloat16" else [case.startswith("channels_last")]):
                layer, twin = conv_bn_pair(activation, kw, dtype)
                x = conv_bn_input(dtype, channels_last)
                for _step in range(2):
                    g = torch.randn(x.shape[0], 7, *x.shape[2:])
                    ours, ours_buf = conv_bn_step(layer, x, g, definition=False)
                    ref, ref_buf = conv_bn_step(twin, x, g, definition=True)
                    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True)), (activation, kw)
                    assert all(torch.equal(a, b) for a, b in zip(ours_buf, ref_buf, strict=True)), (activation, kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_bn_training_node_cpp_kernels(dtype):
    """float32/float64 channels_last input runs the node on csrc/cpu/bn_act.cpp: against the
    definition in float64 (nn.BatchNorm2d then the activation), float64 to ~1e-12, float32 within
    3x the error of PyTorch's own float32 BatchNorm + activation plus a few ulp, outputs, every
    gradient and the running statistics, over two steps of every BatchNorm variant."""
    from falconnet.layers.conv_bn import _cpp_kernels

    torch.manual_seed(0)
    assert _cpp_kernels(conv_bn_input(dtype, channels_last=True)), "csrc/cpu/bn_act.cpp is not built"
    ulp = torch.finfo(dtype).eps
    for activation in ("relu6", "relu", "none"):
        for kw in BN_VARIANTS:
            layer, ref64 = conv_bn_pair(activation, kw, dtype, torch.float64)
            torch_twin = conv_bn_pair(activation, kw, dtype)[1]
            torch_twin.load_state_dict(layer.state_dict())
            x = conv_bn_input(dtype, channels_last=True)
            for _step in range(2):
                g = torch.randn(x.shape[0], 7, *x.shape[2:])
                ours, ours_buf = conv_bn_step(layer, x, g, definition=False)
                ref, ref_buf = conv_bn_step(ref64, x.detach().double().requires_grad_(), g, definition=True)
                theirs, theirs_buf = conv_bn_step(torch_twin, x, g, definition=True)
                for a, b, t in zip(ours + ours_buf, ref + ref_buf, theirs + theirs_buf, strict=True):
                    size = max(1.0, b.abs().max().item())
                    err, err_torch = (a.double() - b).abs().max().item(), (t.double() - b).abs().max().item()
                    if dtype == torch.float64:
                        assert err <= 1e-12 * size, (activation, kw, err)
                    else:
                        assert err <= 3 * err_torch + 8 * ulp * size, (activation, kw, err, err_torch)


def test_conv_bn_training_node_keeps_less_and_steps_aside():
    """The node keeps x and the output, not the pre-activation tensor (HEAD's in-place relu6 under
    autograd saved a clone of it); it steps aside for SyncBatchNorm, eval-mode BatchNorm, no grad,
    CPU autocast and one value per channel (nn.BatchNorm2d's own error)."""
    import torch.nn.functional as F
    from saved_storages import saved_storages

    from falconnet.layers.conv_bn import ConvBN

    torch.manual_seed(0)
    layer = ConvBN(8, 16, 1, activation="relu6").train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    act_bytes = 2 * 16 * 6 * 6 * 4
    node = saved_storages(lambda: layer(x))
    unfused = saved_storages(lambda: F.relu6(layer.bn(layer.conv(x))))
    # x, conv output, output (+ the small conv weight and batch statistics) vs one activation more
    assert sum(v >= act_bytes for v in unfused.values()) - sum(v >= act_bytes for v in node.values()) == 1

    layer.bn = torch.nn.SyncBatchNorm(16)
    assert type(layer(x).grad_fn).__name__ != "_BatchNormActBackward"
    layer = ConvBN(8, 16, 1, activation="relu6").train()
    layer.bn.eval()
    assert type(layer(x).grad_fn).__name__ == "HardtanhBackward0"
    layer.bn.train()
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer(x).grad_fn).__name__ != "_BatchNormActBackward"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 8, 1, 1))


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_bn_training_node_double_backward(channels_last):
    """A backward with create_graph=True through the training node (C++ kernels for channels_last,
    native_batch_norm otherwise) gives gradients that differentiate again exactly as through
    nn.BatchNorm2d + F.relu6 (ConvBN(fused_training=False)): a gradient penalty's gradient for
    the conv weight and the BatchNorm's parameters, float64."""
    import copy

    from falconnet.layers.conv_bn import ConvBN

    torch.manual_seed(0)
    fused = ConvBN(4, 16, 1, activation="relu6").double().train()
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 2.0)
        fused.bn.bias.normal_()
    plain = copy.deepcopy(fused)
    plain.fused_training = False
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def penalty(layer):
        y = layer(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return y, torch.autograd.grad(g.square().sum(), list(layer.parameters()))

    y_fused, second_fused = penalty(fused)
    y_plain, second_plain = penalty(plain)
    assert type(y_fused.grad_fn).__name__ == "_BatchNormActBackward"
    assert type(y_plain.grad_fn).__name__ == "HardtanhBackward0"
    torch.testing.assert_close(y_fused, y_plain, rtol=0, atol=1e-12)
    for a, b in zip(second_fused, second_plain, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fused_training must be True or False"):
        ConvBN(4, 8, fused_training="yes")
