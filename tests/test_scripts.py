"""The GPU scripts' CPU-side behaviour (what CI can check of them without a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_profile_lists_its_cases():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile.py"), "--list"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 19 and any(line.startswith("sf_conv fwd 1024->256@7") for line in out)
    only = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile.py"), "--list", "-k", "cuDNN"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert only and all("cuDNN" in line for line in only)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_profile_says_it_needs_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile.py")], capture_output=True, text=True)
    assert run.returncode == 2 and "no GPU visible" in run.stderr


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_gpu_profile_cases_run_on_the_cpu():
    """Every case's function runs (CPU tensors, float32, batch 2: the C++ kernels), so a GPU run
    cannot fail on the script's own Python."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_profile
    finally:
        sys.path.pop(0)
    for _, _, fn in gpu_profile.cases(device="cpu", dtype=torch.float32, N=2):
        fn()
