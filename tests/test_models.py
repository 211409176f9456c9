"""Registry models: forward and backward on a small batch, the registry's names and errors,
the activation flag, the optional timm registration (with a stand-in timm), the package face."""
import sys
import types

import pytest
import torch

import falconnet
from falconnet.models import registry
from grad_step import rel_error, step_grads

REQUIRED = {
    "lightnet_dsc", "lightnet_rdsc", "lightnet_shufflev1", "lightnet_shufflev2", "lightnet_irb",
    "lightnet_sandglass", "lightnet_hbo", "lightnet_fasternet", "lightnet_repso", "falconnet",
}


def test_list_models_has_every_table1_row():
    assert REQUIRED <= set(falconnet.list_models())
    assert falconnet.list_models() == sorted(falconnet.list_models())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_forward_backward(name):
    model = falconnet.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 10)
    y.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*falconnet.*lightnet_irb"):
        falconnet.create_model("resnet50")


def test_wrong_input_channel_count():
    model = falconnet.create_model("lightnet_irb", num_classes=10)
    with pytest.raises(ValueError, match=r"input of shape \(N, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    gray = falconnet.create_model("lightnet_irb", num_classes=10, in_chans=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_activation_flag_and_overrides():
    model = falconnet.create_model("falconnet", num_classes=5, activation="gelu", head_width=64)
    assert model.head.activation == "gelu" and model.classifier.in_features == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="activation must be one of"):
        falconnet.create_model("lightnet_irb", activation="tanh")
    # block_kwargs merge into the entry's own
    model = falconnet.create_model("lightnet_shufflev1", block_kwargs=dict(groups=2))
    assert model.stages[0][0].groups == 2 and model.stages[0][0].gconv1.conv.out_channels == 96
    with pytest.raises(ValueError, match="pretrained"):
        falconnet.create_model("falconnet", pretrained=True)


def test_falconnet_uses_refco_in_stage3_only():
    from falconnet.layers import RefCO, RepSO

    model = falconnet.create_model("falconnet")
    refco_stages = [i for i, s in enumerate(model.stages) if any(isinstance(m, RefCO) for m in s.modules())]
    assert refco_stages == [2]
    assert all(any(isinstance(m, RepSO) for m in s.modules()) for s in model.stages)


def test_head_api():
    model = falconnet.create_model("lightnet_irb", num_classes=10, head_width=64).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3


def test_xavier_init():
    model = falconnet.create_model("lightnet_irb", num_classes=100)
    w = model.classifier.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_timm_registration_with_a_stand_in_timm(monkeypatch):
    registered = {}
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_models.register_model = lambda fn: registered.setdefault(fn.__name__, fn)
    timm.models = timm_models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm_models)
    registry._register_with_timm()
    assert set(registered) == set(falconnet.list_models())
    # timm calls entry points with its own bookkeeping keywords
    model = registered["lightnet_irb"](pretrained=False, pretrained_cfg=None, num_classes=7)
    assert model.classifier.out_features == 7


def test_package_exports():
    for name in ("create_model", "list_models", "reparameterize_model", "layers", "LightNet", "kernels_info"):
        assert hasattr(falconnet, name)
    assert set(falconnet.kernels_info()["active"]) == {"sf_conv", "dw_conv3x3"}


@pytest.mark.triton
def test_gpu_training_path(monkeypatch):
    """A FalconNet training step on the GPU's paths: every op on its Triton backend (the composed
    GEMM SF-Conv, routed for float32 too; the dw stencils), RepSO's Triton one-node path, nn.BatchNorm2d (no CPU BN node).
    On a GPU for real; without one, on CPU tensors in the Triton interpreter (a small FalconNet:
    ~40 s a step there). float32: the gradients (all at once) within 4x the CPU path's own
    float32 error of the float64 step (+1e-6); measured 8.0e-4 against 6.3e-4 (small-batch
    BatchNorms amplify float32 rounding ~1000x), where a wrong gradient anywhere gives ~1. Under bfloat16 autocast with the backward outside it, as training
    runs (where the H100 run of 2026-11-26 failed in RefCO): finite float32 gradients."""
    import copy

    from falconnet.layers import conv_bn
    from falconnet_kernels import _backend, triton_sf_gemm

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    monkeypatch.setenv("FALCONNET_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = registry.create_model("falconnet", num_classes=10, depths=(1, 1, 1, 1), widths=(16, 32, 64, 64),
                                  head_width=64).train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([1, 4])

    exact = step_grads(copy.deepcopy(model).double(), x.double(), target)
    cpu32 = step_grads(copy.deepcopy(model), x, target)  # the CPU's own paths (C++ kernels, BN node)

    monkeypatch.setenv("FALCONNET_BACKEND", "triton")
    # the composed GEMM for float32 too (by default 16-bit only): the float32 step checks its numerics
    monkeypatch.setattr(triton_sf_gemm, "COMPOSED_DTYPES", (torch.float32, torch.bfloat16, torch.float16))
    if not gpu:  # CPU tensors take the C++ kernels and the CPU nodes: route them as a GPU would
        monkeypatch.setattr(_backend, "select", lambda op, dev, pass_="forward": "triton")
        monkeypatch.setattr(conv_bn, "_use_bn_act_node", lambda *a, **k: False)
    from falconnet.layers import repso_train

    used = []
    real = repso_train._OneConvTrainTriton.apply
    monkeypatch.setattr(repso_train._OneConvTrainTriton, "apply", staticmethod(lambda *a: used.append(1) or real(*a)))
    gpu_model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    gpu32 = step_grads(copy.deepcopy(gpu_model), x.to(device), target)
    assert used, "RepSO's Triton one-node path did not run"

    cpu_err, gpu_err = rel_error(cpu32, exact), rel_error(gpu32, exact)
    assert gpu_err <= 4 * cpu_err + 1e-6, f"GPU path {gpu_err:.2e} vs the CPU path's {cpu_err:.2e}"

    grads = step_grads(copy.deepcopy(gpu_model), x.to(device), target, autocast=True)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
