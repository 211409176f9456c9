"""Re-parameterization of every registry model: eval-mode outputs before and after agree, on
random inputs with randomized BatchNorm statistics.

float64: the folding is exact algebra, so 1e-10 relative. float32: the deployed model's error
against the float64 training model must stay within a small multiple of the float32 training
model's own error against it (PyTorch's error at the same precision), and below 2e-5 of the
output's scale (the issue's "about 1e-5").
"""
import copy

import pytest
import torch

import falconnet
from falconnet.layers import ConvBN, RefCO, RepSO, SFConv2d


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("name", falconnet.list_models())
def test_reparameterize_model_is_exact(name):
    model = falconnet.create_model(name, num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = model64(x.double())
        train32 = model(x)
        deployed = falconnet.reparameterize_model(model)
        deployed64 = falconnet.reparameterize_model(model64)
        dep32 = deployed(x)
        dep64 = deployed64(x.double())
    assert rel_err(dep64, ref) < 1e-10
    assert rel_err(dep32, ref) <= 4 * rel_err(train32, ref) + 1e-6
    assert rel_err(dep32, train32) < 2e-5
    # the deployed form: no BatchNorm left, RepSO one DW conv, RefCO one SFConv2d with bias
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    for m in deployed.modules():
        if isinstance(m, RepSO):
            assert m.deployed and len(m.branches) == 0 and m.reparam_conv.bias is not None
            assert m.reparam_conv.kernel_size == (3, 3)
        if isinstance(m, RefCO):
            assert isinstance(m.sf, SFConv2d) and m.sf.bias is not None
    # inplace=False left the training model as it was
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_deployed_falconnet_block_calls_fused_ops_with_fused_epilogues():
    model = falconnet.reparameterize_model(falconnet.create_model("falconnet", num_classes=10).eval())
    block = model.stages[2][1]
    assert block.co1.sf.activation == "relu6" and block.co1.sf.bias is not None
    assert block.so.activation == "relu6" and block.so.reparam_conv.kernel_size == (3, 3)
    assert block.co2.sf.activation == "none" and block.shortcut


def test_reparameterize_twice_is_harmless():
    model = falconnet.create_model("falconnet", num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        once = falconnet.reparameterize_model(model)
        y1 = once(x)
        for m in once.modules():
            if hasattr(m, "reparameterize"):
                m.reparameterize()
        twice = falconnet.reparameterize_model(once)
        assert torch.equal(twice(x), y1)


def test_reparameterize_model_in_training_mode_raises():
    model = falconnet.create_model("lightnet_irb", num_classes=10)
    with pytest.raises(RuntimeError, match="eval mode.*model.eval"):
        falconnet.reparameterize_model(model)


def test_inplace_reparameterization_and_conv_bn_fold():
    layer = ConvBN(4, 8, 3, stride=2, activation="relu").double().eval()
    randomize_bn(layer)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        out = falconnet.reparameterize_model(layer, inplace=True)
        assert out is layer and layer.bn is None and layer.conv.bias is not None
        torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)


def test_deployed_model_still_trains_backward():
    deployed = falconnet.reparameterize_model(falconnet.create_model("falconnet", num_classes=10).eval())
    deployed.train()
    deployed(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in deployed.parameters())
