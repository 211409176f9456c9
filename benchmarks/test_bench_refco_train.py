"""RefCO training forward+backward (3 branches, r = 1, FalconNet's setting): the fused form
(falconnet/layers/refco_train.py: one or two SF-Conv calls, every BatchNorm folded from its statistics)
vs the branch form (grouped convs, BatchNorms over M x the channels, branch sums, shuffle copy),
with the dense 1x1 conv + BatchNorm that RefCO replaces beside them, at the 8 point-wise shapes of
SPEC section 6. channels_last; GPU: bfloat16, batch 128; CPU: float32, batch 16, 2 threads.

Then a whole FalconNet training step (RepSO on its default one-conv path) with RefCO in either
form: at 224 px, batch 16 on the CPU (128 on the GPU; RefCO sits in stage 3, at 14x14 there), and
on the CPU also at CIFAR's 32 px with batch 256 (stage 3 at 2x2).

    pytest benchmarks/test_bench_refco_train.py --benchmark-group-by=param:shape
"""
from __future__ import annotations

import pytest
import torch
from common import (
    BATCH,
    DTYPE,
    PW_SHAPES,
    cuda_sync_timer,
    falconnet_train_step,
    peak_cuda_bytes,
    run_benchmark,
    saved_bytes,
)

from falconnet.layers import refco_train
from falconnet.layers.refco import RefCO

# refco-fused: the default statistics route (refco_train.STATS = "auto": x's full covariance on a
# GPU and at the CPU's widening shapes); refco-fused-groups: the per-group forms everywhere
IMPLS = ["dense-convbn", "refco-branches", "refco-fused", "refco-fused-groups"]


def make_layer(impl: str, C_in: int, C_out: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if impl == "dense-convbn":
        layer = torch.nn.Sequential(torch.nn.Conv2d(C_in, C_out, 1, bias=False), torch.nn.BatchNorm2d(C_out))
    else:
        layer = RefCO(C_in, C_out, branches=3, r=1, fused_training=impl.startswith("refco-fused"))
    return layer.to(device=device, dtype=dtype, memory_format=torch.channels_last).train()


@pytest.mark.benchmark(group="refco_train", timer=cuda_sync_timer)
@pytest.mark.parametrize("shape", PW_SHAPES, ids=[f"{a}->{b}@{h}" for a, b, h in PW_SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_refco_train(benchmark, monkeypatch, device, impl, shape):
    if impl == "refco-fused-groups":
        monkeypatch.setattr(refco_train, "STATS", "groups")
    C_in, C_out, H = shape
    N, dtype = BATCH[device], DTYPE[device]
    torch.manual_seed(0)
    layer = make_layer(impl, C_in, C_out, device, dtype)
    x = torch.randn(N, C_in, H, H, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    gy = torch.randn(N, C_out, H, H, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    params = [x] + list(layer.parameters())

    def fn():
        return torch.autograd.grad(layer(x), params, gy)

    info = {"op": "refco_train", "pass": "fwd+bwd", "impl": impl, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last", "batch": N,
            "shape": f"{C_in}->{C_out}@{H}", "cpu_threads": torch.get_num_threads(), "stats": refco_train.STATS}
    if device == "cuda":
        fn()
        info["peak_bytes"] = peak_cuda_bytes(fn)
    info["saved_bytes"] = saved_bytes(lambda: layer(x), x)
    run_benchmark(benchmark, fn, device, info, rounds=50 if device == "cuda" else 5)


# (batch, image size): the paper's recipe (224 px) and CIFAR at its own 32 px with the recipe's
# batch 256, where stage 3 runs at 2x2 (CPU); the GPU runs the recipe only
MODEL_STEPS = {"cuda": [(128, 224)], "cpu": [(16, 224), (256, 32)]}


@pytest.mark.benchmark(group="falconnet_train_step_refco", timer=cuda_sync_timer)
@pytest.mark.parametrize("step", [0, 1], ids=["recipe", "cifar32"])
@pytest.mark.parametrize("impl", ["refco-branches", "refco-fused"])
def test_falconnet_train_step_refco(benchmark, device, impl, step):
    if step >= len(MODEL_STEPS[device]):
        pytest.skip(f"not measured on {device}")

    def configure(model):
        for module in model.modules():
            if isinstance(module, RefCO):  # the layer's own flag, as training uses it
                module.fused_training = impl == "refco-fused"

    N, size = MODEL_STEPS[device][step]
    falconnet_train_step(benchmark, device, N, size, configure,
                         {"op": "falconnet_train_step_refco", "impl": impl, "shape": f"{N}x{size}px"},
                         rounds=10 if device == "cuda" else 3)
