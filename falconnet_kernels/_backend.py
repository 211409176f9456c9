"""Which implementation runs each op: the compiled extension, Triton, or the PyTorch reference.

On a CPU tensor the C++ kernels run when the extension is built, else the reference. On a CUDA
tensor the default per op is the faster of CUDA C++ and Triton as measured (README, "Kernels"),
falling back to whichever is available. FALCONNET_BACKEND=cuda|triton|torch forces one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

OPS = ("sf_conv", "dw_conv3x3")
FORCEABLE = ("cuda", "triton", "torch")

# The faster backend per op and pass on CUDA devices, as measured side by side on an H100
# (bf16, channels_last, batch 128; benchmarks/results/2026-11-26-h100/NOTES.md):
#   sf_conv forward geomean vs cuDNN 1x1: triton 0.79x (its composed-GEMM form, triton_sf_gemm;
#   two-stage kernel 0.59x), cuda 0.43x; fwd+bwd: triton 0.66x (two-stage 0.39x), cuda 0.37x
#   dw_conv3x3 forward vs cuDNN depthwise: cuda 1.28x, triton 1.31x (a tie; on the H200 at
#   1ebf1b9 cuda 1.56x, triton 1.18x); fwd+bwd: triton 0.88x, cuda 0.20x
CUDA_DEFAULT = {
    ("sf_conv", "forward"): "triton",
    ("sf_conv", "backward"): "triton",
    ("dw_conv3x3", "forward"): "cuda",
    ("dw_conv3x3", "backward"): "triton",
}

_ext_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.falconnet_C.*)
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _ext_error = str(exc)
    warnings.warn(
        "falconnet_kernels: the compiled extension is not built, so the ops run on the pure-PyTorch "
        f"reference path ({exc}). Build it with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )


def extension_built() -> bool:
    return _ext_error is None


@functools.lru_cache(maxsize=None)  # asked on every op call (~2 us uncached); registrations are fixed at import
def _has_kernel(op: str, key: str) -> bool:
    if _ext_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"falconnet_C::{op}_forward", key)


def cpp_available(op: str) -> bool:
    return _has_kernel(op, "CPU")


def cuda_available(op: str) -> bool:
    return _has_kernel(op, "CUDA")


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return triton.__version__


@contextlib.contextmanager
def forcing(name: str | None):
    """FALCONNET_BACKEND set to name (unset for None) for the duration; the ops read it at every
    call. The benchmarks and scripts/gpu_profile.py time each backend with it."""
    old = os.environ.get("FALCONNET_BACKEND")
    if name is None:
        os.environ.pop("FALCONNET_BACKEND", None)
    else:
        os.environ["FALCONNET_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FALCONNET_BACKEND", None)
        else:
            os.environ["FALCONNET_BACKEND"] = old


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the Triton kernels run as numpy on the CPU (the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_autotune_enabled() -> bool:
    """Whether the Triton kernels time their candidate configs: not under the interpreter, nor with
    FALCONNET_TRITON_AUTOTUNE=0 (the GPU tests set it: every config compiles anew for every shape)."""
    return not triton_interpreting() and os.environ.get("FALCONNET_TRITON_AUTOTUNE", "1") != "0"


def forced_backend() -> str | None:
    value = os.environ.get("FALCONNET_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in FORCEABLE:
        raise ValueError(f"FALCONNET_BACKEND must be one of {FORCEABLE} (or unset), got {value!r}")
    return value


def select(op: str, device: torch.device, pass_: str = "forward") -> str:
    """The backend that runs `op`'s `pass_` ('forward' or 'backward') on `device`:
    'cpp', 'cuda', 'triton' or 'torch'."""
    forced = forced_backend()
    if device.type == "cpu":
        if forced == "torch" or not cpp_available(op):
            return "torch"
        return "cpp"
    if device.type == "cuda":
        if forced == "torch":
            return "torch"
        if forced == "cuda":
            if not cuda_available(op):
                raise RuntimeError(
                    "FALCONNET_BACKEND=cuda, but the CUDA kernels are not built "
                    f"({_ext_error or 'built without CUDA'}); rebuild with a GPU visible or FORCE_CUDA=1"
                )
            return "cuda"
        if forced == "triton":
            if triton_version() is None:
                raise RuntimeError("FALCONNET_BACKEND=triton, but triton cannot be imported")
            return "triton"
        preferred = CUDA_DEFAULT[(op, pass_)]
        for name in (preferred, "cuda" if preferred == "triton" else "triton"):
            if name == "cuda" and cuda_available(op):
                return "cuda"
            if name == "triton" and triton_version() is not None:
                return "triton"
        return "torch"
    return "torch"


def _described(op: str, backend: str, pass_: str) -> str:
    """backend, naming the Triton SF-Conv form that FalconNet's shapes take (triton_sf_gemm.COMPOSED)."""
    if op == "sf_conv" and backend == "triton":
        from . import triton_sf_gemm

        if triton_sf_gemm.routed(256, 1024, pass_, torch.bfloat16):
            return "triton (composed GEMM for 16-bit x, two-stage for float32)"
        return "triton (two-stage)"
    return backend


def info() -> dict:
    """What is built and what runs: the data behind `falconnet info` and kernels_info()."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    active = {op: {"cpu": select(op, torch.device("cpu"))} for op in OPS}
    if gpu is not None:
        for op in OPS:
            fwd, bwd = (_described(op, select(op, torch.device("cuda"), p), p) for p in ("forward", "backward"))
            active[op]["cuda"] = fwd if fwd == bwd else f"{fwd} (forward), {bwd} (backward)"
    return {
        "extension_built": extension_built(),
        "extension_error": _ext_error,
        "cpu_kernels": {op: cpp_available(op) for op in OPS},
        "cuda_kernels": {op: cuda_available(op) for op in OPS},
        "triton": triton_version(),
        "gpu": gpu,
        "forced_backend": os.environ.get("FALCONNET_BACKEND") or None,
        "active": active,
        "torch": torch.__version__,
    }
