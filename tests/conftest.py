"""Test-wide setup.

Without a GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be
set before triton decorates any kernel, so it is set here, before the tests import anything.
Tests marked `cuda` skip when no GPU is visible (they run in scripts/gpu_check.sh).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
