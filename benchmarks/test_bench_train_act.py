"""Training forward+backward of BatchNorm / RepSO followed by ReLU6, with the activation applied
after the layer (autograd keeps the pre-activation tensor for its mask) or inside the layer's
autograd node (in place on the node's fresh output, the mask taken from the output it shares with
the next layer), at the hidden widths of SPEC section 6, channels_last; CPU float32 batch 16, GPU
bfloat16 batch 128.

- bn_act_train: nn.BatchNorm2d then F.relu6 (the definition); the same with relu6 in place (what
  ConvBN ran before: under autograd an in-place relu6 saves a clone of its input); ConvBN's
  training node (falconnet.layers.conv_bn.batch_norm_act; CPU only, the GPU keeps cuDNN's BN).
- repso_act_train: RepSO's one-conv node then F.relu6; relu6 inside the node
  (repso_train_forward(..., activation="relu6"), what RepSO(activation="relu6") runs).

Bytes: 2 activation-sized passes forward (read x, write y) and 3 backward (read grad_y and x,
write grad_x) are the floor of any BN + activation; extra_info.saved_bytes is what autograd keeps.

    pytest benchmarks/test_bench_train_act.py --benchmark-group-by=group,param:shape
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import BATCH, DTYPE, DW_SHAPES, cuda_sync_timer, peak_cuda_bytes, run_benchmark, saved_bytes

from falconnet.layers.conv_bn import batch_norm_act
from falconnet.layers.repso import RepSO
from falconnet.layers.repso_train import repso_train_forward

BN_IMPLS = {
    "bn-then-relu6": lambda bn, x: F.relu6(bn(x)),
    "bn-relu6-inplace": lambda bn, x: F.relu6(bn(x), inplace=True),
    "bn-relu6-node": lambda bn, x: batch_norm_act(bn, x, "relu6"),
}


def _repso(activation: str):
    def path(layer: RepSO, x: torch.Tensor) -> torch.Tensor:
        y = repso_train_forward(x, [b.conv.weight for b in layer.branches], [b.bn for b in layer.branches],
                                layer.identity_bn, activation=activation)
        return y if activation == "relu6" else F.relu6(y)
    return path


REPSO_IMPLS = {"node-then-relu6": _repso("none"), "relu6-in-node": _repso("relu6")}


def _time(benchmark, device, fn, forward, x, info):
    if device == "cuda":
        fn()
        info["peak_bytes"] = peak_cuda_bytes(fn)
    info["saved_bytes"] = saved_bytes(forward, x)
    run_benchmark(benchmark, fn, device, info, rounds=None if device == "cuda" else 9)


def _input(C: int, H: int, device: str):
    N, dtype = BATCH[device], DTYPE[device]
    x = torch.randn(N, C, H, H, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
    gy = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=dtype))
    return x.requires_grad_(True), gy


def _info(op: str, impl: str, device: str, x: torch.Tensor, C: int, H: int) -> dict:
    act_bytes = x.numel() * x.element_size()
    return {"op": op, "pass": "fwd+bwd", "impl": impl, "device": device,
            "dtype": str(x.dtype).replace("torch.", ""), "layout": "channels_last", "batch": x.shape[0],
            "shape": f"{C}@{H}", "bytes_min": 5 * act_bytes, "flops": 0}


@pytest.mark.benchmark(group="bn_act_train", timer=cuda_sync_timer)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"{c}@{h}" for c, h in DW_SHAPES])
@pytest.mark.parametrize("impl", list(BN_IMPLS))
def test_bn_act_train(benchmark, device, impl, shape):
    if impl == "bn-relu6-node" and device != "cpu":
        pytest.skip("the node is the CPU path; on a GPU batch_norm_act is bn-relu6-inplace's fallback")
    C, H = shape
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(C).to(device=device, dtype=DTYPE[device]).train()
    x, gy = _input(C, H, device)
    params = [x, bn.weight, bn.bias]
    path = BN_IMPLS[impl]

    def fn():
        return torch.autograd.grad(path(bn, x), params, gy)

    _time(benchmark, device, fn, lambda: path(bn, x), x, _info("bn_act_train", impl, device, x, C, H))


@pytest.mark.benchmark(group="repso_act_train", timer=cuda_sync_timer)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=[f"{c}@{h}" for c, h in DW_SHAPES])
@pytest.mark.parametrize("impl", list(REPSO_IMPLS))
def test_repso_act_train(benchmark, device, impl, shape):
    C, H = shape
    torch.manual_seed(0)
    layer = RepSO(C).to(device=device, dtype=DTYPE[device]).train()
    x, gy = _input(C, H, device)
    params = [x] + list(layer.parameters())
    path = REPSO_IMPLS[impl]

    def fn():
        return torch.autograd.grad(path(layer, x), params, gy)

    _time(benchmark, device, fn, lambda: path(layer, x), x, _info("repso_act_train", impl, device, x, C, H))
