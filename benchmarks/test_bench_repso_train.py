"""RepSO training forward+backward: the exact one-conv path (falconnet/layers/repso_train.py) vs the
seven-branch PyTorch path, side by side, at the hidden widths of SPEC section 6 (default branches:
three 3x3, 1x3, 3x1, 1x1, identity), channels_last on both devices (issue 5's target). GPU: bfloat16
batch 128. CPU: float32 batch 16, once with torch.set_num_threads(1) and once with 2 (the `threads`
parameter; both paths of one shape and thread count run back to back in one session), 9 rounds
each: compare the medians (pytest-benchmark's "Median" column), which a shared machine disturbs
less than the minimum.

Peak memory (extra_info): on GPU, torch.cuda.max_memory_allocated over one step minus what was
allocated before it; on CPU, the bytes of the distinct storages autograd saves for the backward
(saved_tensors_hooks) plus the output: the activations a training step keeps alive between
forward and backward, which is what the seven-branch path multiplies.

    pytest benchmarks/test_bench_repso_train.py -k repso_train --benchmark-group-by=param:shape,param:threads
"""
from __future__ import annotations

import pytest
import torch
from common import (
    BATCH,
    DTYPE,
    DW_SHAPES,
    cuda_sync_timer,
    falconnet_train_step,
    peak_cuda_bytes,
    repso_node_parts,
    run_benchmark,
    saved_bytes,
)

from falconnet.layers.repso import RepSO
from falconnet.layers.repso_train import repso_train_forward


def make_layer(C: int, device: str, dtype: torch.dtype) -> RepSO:
    return RepSO(C).to(device=device, dtype=dtype).train()


def seven_branch(layer: RepSO, x: torch.Tensor) -> torch.Tensor:
    return sum(b.bn(b.conv(x)) for b in layer.branches) + layer.identity_bn(x)


def one_conv(layer: RepSO, x: torch.Tensor) -> torch.Tensor:
    return repso_train_forward(x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn)


def one_conv_dw_op(layer: RepSO, x: torch.Tensor) -> torch.Tensor:
    """The one conv on falconnet_kernels.dw_conv3x3 instead of cuDNN (the default, F.conv2d)."""
    return repso_train_forward(
        x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn, conv="falconnet"
    )


def one_conv_ops(layer: RepSO, x: torch.Tensor) -> torch.Tensor:
    """The one conv through the custom ops one by one (repso_moments, the fold, the conv), not the
    one-node path the default takes (what torch.compile runs)."""
    return repso_train_forward(
        x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches], layer.identity_bn, one_node=False
    )


IMPLS = {"seven-branch": seven_branch, "one-conv": one_conv, "one-conv-ops": one_conv_ops,
         "one-conv-dw-op": one_conv_dw_op}


@pytest.fixture
def threads(request, device):
    """torch.set_num_threads for one CPU case (restored afterwards); the GPU cases run once."""
    n = request.param
    if device == "cuda" and n != 1:
        pytest.skip("CPU thread counts only")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


@pytest.mark.benchmark(group="repso_train", timer=cuda_sync_timer)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"{c}@{h}" for c, h in DW_SHAPES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_repso_train(benchmark, device, impl, shape, threads):
    if impl in ("one-conv-dw-op", "one-conv-ops") and device != "cuda":
        pytest.skip("GPU only: the extension's CPU dw_conv3x3 is slower than oneDNN, and the CPU op path was "
                    "measured before (docs/repso_training.md)")
    C, H = shape
    N, dtype = BATCH[device], DTYPE[device]
    torch.manual_seed(0)
    layer = make_layer(C, device, dtype)
    # inputs drawn on the CPU: a failed CUDA-graph capture in an earlier case leaves the CUDA
    # generator unusable ("Offset increment outside graph capture"), which must not fail this one
    x = torch.randn(N, C, H, H, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    gy = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=dtype))  # x's layout
    params = [x] + [p for p in layer.parameters()]
    path = IMPLS[impl]

    def fn():
        return torch.autograd.grad(path(layer, x), params, gy)

    info = {
        "op": "repso_train", "pass": "fwd+bwd", "impl": impl, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last",
        "batch": N, "shape": f"{C}@{H}", "branches": "3x3 x3, 1x3, 3x1, 1x1, identity",
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        fn()
        info["peak_bytes"] = peak_cuda_bytes(fn)
    info["saved_bytes"] = saved_bytes(lambda: path(layer, x), x)
    paired = None
    if device == "cpu" and impl != "seven-branch":  # also timed alternately with the seven branches

        def paired():
            return torch.autograd.grad(seven_branch(layer, x), params, gy)

    run_benchmark(benchmark, fn, device, info, rounds=None if device == "cuda" else 9, paired=paired)


# A whole training step (forward, cross-entropy, backward) of the registry's FalconNet, with
# RepSO's training forward as the seven-branch sum or as the one conv (RepSO.one_conv_training).
# channels_last; GPU: bf16, batch 128 at 224; CPU: float32, batch 16 at 64x64.
MODEL_STEP = {"cuda": (128, 224), "cpu": (16, 64)}


@pytest.mark.benchmark(group="falconnet_train_step", timer=cuda_sync_timer)
@pytest.mark.parametrize("impl", ["seven-branch", "one-conv"])
def test_falconnet_train_step(benchmark, device, impl):
    def configure(model):
        for module in model.modules():
            if isinstance(module, RepSO):  # the layer's own flag, as training uses it
                module.one_conv_training = impl == "one-conv"

    N, size = MODEL_STEP[device]
    falconnet_train_step(benchmark, device, N, size, configure, {"op": "falconnet_train_step", "impl": impl},
                         rounds=20 if device == "cuda" else 3)


# The GPU one-node path (_OneConvTrainTriton) piece by piece (common.repso_node_parts), so one run
# says where its time goes. bytes_min: the activation-sized tensors each piece must read and write
# (the fold kernels move only KBs).
NODE_PARTS = {"moments": 1, "fold": 0, "conv": 2, "conv-rows": 2, "conv-wgrad": 2, "conv-wgrad-triton": 2, "conv-wgrad-rows": 2,
              "fold-bwd": 0, "grad-x": 3}


@pytest.mark.benchmark(group="repso_node_parts", timer=cuda_sync_timer)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"{c}@{h}" for c, h in DW_SHAPES])
@pytest.mark.parametrize("part", list(NODE_PARTS))
def test_repso_node_parts(benchmark, device, part, shape):
    if device != "cuda":
        pytest.skip("the Triton one-node path's pieces: GPU only")
    C, H = shape
    N, dtype = BATCH[device], DTYPE[device]
    x, fns = repso_node_parts(C, H, N, dtype, device)
    info = {"op": "repso_node_part", "pass": "fwd+bwd pieces", "impl": part, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last", "batch": N, "shape": f"{C}@{H}",
            "bytes_min": NODE_PARTS[part] * x.numel() * x.element_size()}
    fns[part]()  # compile / autotune outside the timed graph
    run_benchmark(benchmark, fns[part], device, info, rounds=50)
