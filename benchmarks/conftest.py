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
