import gc
import json
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to benchmark on (default: cuda when a GPU is visible, else cpu)",
    )
    parser.addoption(
        "--malloc-tuning",
        action="store_true",
        help="raise glibc's mmap/trim thresholds first, as every falconnet command does "
        "(falconnet/malloc_tuning.py); recorded in the machine info",
    )


def pytest_configure(config):
    if config.getoption("--malloc-tuning"):
        from falconnet import malloc_tuning

        malloc_tuning.apply()


@pytest.fixture(scope="session")
def device(request) -> str:
    chosen = request.config.getoption("--bench-device")
    if chosen is None:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    if chosen == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but no GPU is visible")
    return chosen


def pytest_benchmark_update_machine_info(config, machine_info):
    from common import environment

    from falconnet import malloc_tuning

    machine_info["falconnet"] = environment()
    machine_info["falconnet"]["malloc_tuning"] = malloc_tuning.state()


@pytest.fixture(autouse=True)
def _stream_result(request):
    """With FALCONNET_BENCH_STREAM set, each timed case is appended to that file as one JSON line
    (name, stats, extra_info) as soon as it finishes: pytest-benchmark writes its JSON only at the
    end of a run, so a run cut off by its time limit loses every case (the GPU run of 2026-11-26
    lost two groups so). scripts/gpu_check.sh rebuilds a JSON from the lines if needed
    (falconnet bench reads either)."""
    yield
    if torch.cuda.is_initialized():
        # give the case's memory back before the next one: the H100 run of 2026-11-26 (second)
        # failed four cases with out-of-memory errors while 57 GB sat reserved but unallocated
        # (the seven-branch FalconNet step's blocks and earlier cases' CUDA-graph pools)
        gc.collect()
        torch.cuda.empty_cache()
    path = os.environ.get("FALCONNET_BENCH_STREAM")
    fixture = request.node.funcargs.get("benchmark") if path else None
    metadata = getattr(fixture, "stats", None)
    if metadata is None or getattr(metadata, "stats", None) is None:
        return
    st = metadata.stats
    row = {"name": request.node.name, "fullname": request.node.nodeid, "extra_info": dict(fixture.extra_info),
           "stats": {k: getattr(st, k) for k in ("min", "max", "mean", "median", "iqr", "stddev", "rounds")}}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
