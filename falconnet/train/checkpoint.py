"""Checkpoints: atomic writes, RNG state capture, and the compatibility checks made on load.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only (NumPy's RNG state is stored as lists for that reason).

Atomicity: the bytes go to a temporary file in the destination's own directory (same file
system, so the rename is atomic), are flushed and fsync'ed, and only then ``os.replace`` puts
the file in place. A crash at any point leaves either the old file or the new one, never a torn
one; a failed write removes its temporary file.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another model or number of classes."""


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through ``write(f)`` so that ``path`` is either untouched or complete."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # the rename itself is durable only once the directory entry is on disk (POSIX)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise CheckpointError(f"{path!r} is not a falconnet checkpoint (expected a dict with 'model_name' and 'model')")
    return ckpt


def check_compatible(ckpt: dict, path: str, model_name: str, num_classes: int, model_kwargs: dict | None = None) -> None:
    """Raise CheckpointError when ``ckpt`` was made for another model, preset or number of classes."""
    if ckpt["model_name"] != model_name:
        raise CheckpointError(f"checkpoint {path!r} holds model {ckpt['model_name']!r}, expected {model_name!r}")
    if ckpt["num_classes"] != num_classes:
        raise CheckpointError(
            f"checkpoint {path!r} was trained for {ckpt['num_classes']} classes, expected {num_classes}"
        )
    if model_kwargs is not None and dict(ckpt.get("model_kwargs", {})) != dict(model_kwargs):
        raise CheckpointError(
            f"checkpoint {path!r} holds {model_name!r} built with {ckpt.get('model_kwargs')}, expected {model_kwargs}"
        )


# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
