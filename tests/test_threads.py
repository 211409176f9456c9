"""The C++ CPU kernels split their work across threads (at::parallel_for: pixel ranges, channel
blocks, per-thread partial sums reduced at the end). Under pytest-xdist each worker runs with one
thread (tests/conftest.py: two workers on two cores would otherwise oversubscribe them), so this
file runs a whole FalconNet training step, every C++ kernel on its CPU path (SF-Conv, RefCO,
RepSO's one-conv node, dw_conv3x3, the BN-act node), at 1 and at 3 threads (an odd count: uneven
splits) in both layouts, and checks the gradients against a float64 step."""
from __future__ import annotations

import copy

import pytest
import torch

from falconnet.models import registry
from grad_step import rel_error, step_grads


@pytest.mark.parametrize("channels_last", [True, False])
def test_threaded_kernels_match_one_thread(channels_last):
    torch.manual_seed(0)
    model = registry.create_model("falconnet", num_classes=10, depths=(1, 1, 1, 1), widths=(16, 32, 64, 64),
                                  head_width=64).train()
    x = torch.randn(3, 3, 36, 36)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.tensor([1, 4, 7])
    exact = step_grads(copy.deepcopy(model).double(), x.double(), target)
    torch.set_num_threads(1)  # conftest's autouse fixture restores the count afterwards
    one = step_grads(copy.deepcopy(model), x, target)
    torch.set_num_threads(3)
    three = step_grads(copy.deepcopy(model), x, target)
    one_err, three_err = rel_error(one, exact), rel_error(three, exact)
    # float32 rounding differs with the split (other summation orders); a wrongly split or
    # dropped partial sum gives an error of order 1
    assert three_err <= 4 * one_err + 1e-6, f"3 threads {three_err:.2e} vs 1 thread {one_err:.2e}"
