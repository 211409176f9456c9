"""Large-allocation tuning for glibc's malloc, which every `falconnet` command applies at start.

glibc serves blocks above its mmap threshold (128 KiB at first, adapting up to 32 MiB) with fresh
mmap'd pages and hands large freed blocks back to the kernel, so a CNN's multi-MB activations are
page-faulted in again on their first write at every step (the kernels then spend a fifth of their
time in the page-fault handler: see benchmarks/results/2026-11-26-cpu-2/NOTES.md). Raising the
mmap and trim thresholds keeps freed blocks in the heap for the next step. Measured on the 2-core
dev machine: deployed FalconNet inference ~1.4x (batch 8 at 224 px: 33.9 -> 24.2 ms by the
environment variables below; 39.7 -> 28.4 ms median over alternating processes with this
module, benchmarks/results/2026-11-26-cpu-3/); a training step at 64 px, whose activations are
small, no change beyond the noise.
The cost: a process keeps its peak heap instead of returning freed memory to the system.

It is what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` do when set before a process starts,
done at run time through mallopt(3). Library users who import falconnet get nothing changed;
they can call apply() themselves, or set those variables.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# 1 GiB: above any activation of the models here; glibc builds that cap the mmap threshold refuse
# it, and then the largest value they take, 32 MiB, is used
_THRESHOLDS = (1 << 30, 32 << 20)

_state: str | None = None


def apply() -> str:
    """Raise glibc's mmap and trim thresholds (once per process); returns what happened:
    "mallopt" (done), "env" (the user set MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES malloc thresholds
    already: left alone), "off" (FALCONNET_MALLOC_TUNING=0) or "unsupported" (not glibc). With
    another allocator preloaded (jemalloc, tcmalloc) glibc's setting is simply unused."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("FALCONNET_MALLOC_TUNING", "1") == "0":
        _state = "off"
    elif _user_set():
        _state = "env"
    else:
        _state = "mallopt" if _mallopt() else "unsupported"
    return _state


def _user_set() -> bool:
    """The thresholds were set for this process already: MALLOC_*_THRESHOLD_ or glibc tunables."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables)


def state() -> str:
    """What apply() did in this process ("not applied" if it was not called)."""
    return _state or "not applied"


def _mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's, without searching for it
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for value in _THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, value) == 1:
            return mallopt(_M_TRIM_THRESHOLD, value) == 1
    return False
