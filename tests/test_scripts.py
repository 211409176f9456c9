"""The GPU scripts' CPU-side behaviour (what CI can check of them without a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_profile_lists_its_cases():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile.py"), "--list"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 31 and any(line.startswith("sf_conv fwd 1024->256@7") for line in out)
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
    for name, _, fn in gpu_profile.cases(device="cpu", dtype=torch.float32, N=2):
        if not name.startswith("repso node"):  # Triton only: test_repso_node_parts_agree below
            fn()


def test_repso_node_parts_agree():
    """The RepSO node pieces that the benchmark times and gpu_profile.py profiles
    (benchmarks/common.repso_node_parts) run, under the Triton interpreter, and the row kernels'
    conv and weight gradient equal cuDNN's / ATen's pieces beside them (float32: tolerance 1e-4
    relative, sums of 50 products in two orders)."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from common import repso_node_parts
x, f = repso_node_parts(16, 5, 2, torch.float32, "cpu")
for name in ("moments", "fold", "fold-bwd", "grad-x"):
    f[name]()
rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
conv_err = rel(f["conv-rows"](), f["conv"]())
gw, gb = f["conv-wgrad"]()[1:]
totals = f["conv-wgrad-rows"]()
wgrad_err = max(rel(totals[:9].t().float(), gw.view(16, 9)), rel(totals[9].float(), gb))
print(conv_err, wgrad_err)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    conv_err, wgrad_err = map(float, run.stdout.split())
    assert conv_err < 1e-4 and wgrad_err < 1e-4
