"""Whole models, inference: deployed FalconNet on the fused ops vs the same model on the PyTorch
reference path, the deployed LightNet-IRB, and torchvision's ResNet-18 and MobileNetV2 (the
SPEC section 6 reference points). GPU: bfloat16 channels_last, batch 256, 224x224.
CPU: float32 channels_last, batch 8, 224x224. Throughput = batch / median time."""
from __future__ import annotations

import pytest
import torch
from common import cuda_sync_timer, run_benchmark

import falconnet

MODELS = ["falconnet", "falconnet@torch", "lightnet_irb", "resnet18", "mobilenet_v2"]
BATCH = {"cuda": 256, "cpu": 8}


def build(name: str, device: str, dtype):
    base = name.split("@")[0]
    if base in ("resnet18", "mobilenet_v2"):
        import torchvision

        model = getattr(torchvision.models, base)(num_classes=1000)
    else:
        model = falconnet.reparameterize_model(falconnet.create_model(base, num_classes=1000).eval())
    return model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)


@pytest.mark.benchmark(group="models", timer=cuda_sync_timer)
@pytest.mark.parametrize("name", MODELS)
def test_model_inference(benchmark, device, name):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    N = BATCH[device]
    model = build(name, device, dtype)
    x = torch.randn(N, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def fn():
        with torch.no_grad():
            return model(x)

    info = {"op": "model", "pass": "inference", "impl": name, "device": device, "batch": N,
            "dtype": str(dtype).replace("torch.", ""), "shape": "224", "bytes_min": 0, "flops": 0}
    backend = "torch" if name.endswith("@torch") else None
    run_benchmark(benchmark, fn, device, info, backend=backend, rounds=30 if device == "cuda" else 3)
    benchmark.extra_info["images_per_s"] = N / benchmark.stats.stats.median
