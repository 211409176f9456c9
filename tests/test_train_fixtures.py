"""A small stand-in model for the training tests, and a check that its own folding is exact.

It uses both fused ops (sf_conv in training and deployed form, dw_conv3x3 when deployed) and a
BatchNorm that re-parameterization folds, so the pipeline's deploy and export paths see what a
real FalconNet gives them, at a size that trains in a second. ``install`` registers it as
"standin" beside the real registry (tests pass it to the code under test by name).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import falconnet_kernels as fk


class StandIn(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.dw = nn.Conv2d(width, width, 3, 1, 1, groups=width)
        self.w1 = nn.Parameter(torch.randn(4, 2, width // 4) * 0.5)
        self.w2 = nn.Parameter(torch.randn(2, width // 2, 4) * 0.5)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        self.deployed = False

    def forward(self, x):
        x = self.stem(x)
        if self.deployed:
            x = fk.dw_conv3x3(x, self.dw.weight, self.dw.bias, 1, "relu")
            x = fk.sf_conv(x, self.w1, self.w2, self.b, x, "relu6")
        else:
            x = F.relu(self.dw(x))
            x = F.relu6(self.bn(fk.sf_conv(x, self.w1, self.w2, None, None, "none"))) + x
        return self.fc(x.mean((2, 3)))


def create_model(name, num_classes=1000, **kwargs):
    return StandIn(num_classes, **kwargs)


def reparameterize_model(model, inplace=False):
    if model.training:
        raise RuntimeError("reparameterize_model needs a model in eval mode")
    m = model if inplace else copy.deepcopy(model)
    scale = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
    with torch.no_grad():
        m.w2.mul_(scale.view(m.w2.shape[0], m.w2.shape[1], 1))  # output channel j*m+t scales w2[j, t, :]
    m.b = nn.Parameter((m.bn.bias - m.bn.running_mean * scale).detach())
    del m.bn
    m.deployed = True
    return m


def install(monkeypatch) -> None:
    """Route falconnet's registry calls for "standin" to the stand-in; other names to the real one."""
    import falconnet

    real_create = getattr(falconnet, "create_model", None)
    real_reparam = getattr(falconnet, "reparameterize_model", None)
    real_list = getattr(falconnet, "list_models", lambda: [])

    def create(name, num_classes=1000, **kwargs):
        if name == "standin":
            return create_model(name, num_classes, **kwargs)
        if real_create is None:
            raise KeyError(name)
        return real_create(name, num_classes=num_classes, **kwargs)

    def reparam(model, inplace=False):
        if isinstance(model, StandIn):
            return reparameterize_model(model, inplace)
        return real_reparam(model, inplace=inplace)

    monkeypatch.setattr(falconnet, "create_model", create, raising=False)
    monkeypatch.setattr(falconnet, "reparameterize_model", reparam, raising=False)
    monkeypatch.setattr(falconnet, "list_models", lambda: ["standin", *real_list()], raising=False)


def install_globally() -> None:
    """install() for a spawned process, where there is no monkeypatch fixture."""
    install(pytest.MonkeyPatch())


def test_standin_fold_is_exact():
    model = StandIn(7)
    model.train()
    model(torch.randn(16, 3, 16, 16))  # give BN non-trivial running statistics
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    folded = reparameterize_model(model)
    # float32 BN folding: PyTorch's own rounding, a few ulp of the logits
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        reparameterize_model(model.train())
