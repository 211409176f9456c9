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


_FAILURE_LOG: str | None = None


def pytest_configure(config):
    # pytest-xdist (`-n auto`): each worker gets its share of the cores. At torch's default (every
    # core per process) two workers on two cores oversubscribed them, and OpenMP's waiting threads
    # made runs of small parallel regions ~20x slower (test_reparam's ShuffleNet models: 3 s -> 76 s).
    # tests/test_threads.py runs the kernels at several threads.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
    # xdist's controller receives every worker's reports too: only the process that ran a test writes
    global _FAILURE_LOG
    controller = not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))
    _FAILURE_LOG = None if controller else os.environ.get("FALCONNET_TEST_FAILURES")


def pytest_runtest_logreport(report):
    """With FALCONNET_TEST_FAILURES set (scripts/gpu_check.sh sets it), each failure's report is
    appended to that file as it happens: a run cut off by its time limit (or a worker that dies)
    never reaches pytest's summary, and the GPU run of 2026-11-26 lost three failures' reasons so."""
    if _FAILURE_LOG and report.failed:
        with open(_FAILURE_LOG, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts from seed 0 and leaves torch's thread count as it found it (some tests
    run at one thread: the next test in their worker must not inherit that)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
