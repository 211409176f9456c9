"""What an autograd graph keeps for its backward (shared by the tests of the training nodes)."""
from __future__ import annotations

import torch


def saved_storages(forward) -> dict[int, int]:
    """Run forward(); {storage address: bytes} of every tensor autograd saved for the backward,
    and of the output (once, when it is saved too)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return seen
