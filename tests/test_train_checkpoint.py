"""Atomic checkpoint files, RNG state round trips, and the checks made when a checkpoint is loaded."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from falconnet.train import checkpoint as ck


def test_crash_mid_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ck.atomic_save({"model_name": "m", "model": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = open(path, "rb").read()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # half-written bytes, then the process "dies"
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"model_name": "m", "model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.load_checkpoint(path)["epoch"] == 1


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = ck.capture_rng_state()
    ck.atomic_save({"rng": [state]}, str(tmp_path / "rng.pt"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = torch.load(str(tmp_path / "rng.pt"), weights_only=True)["rng"][0]
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    ck.restore_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_errors_name_what_was_expected(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ck.CheckpointError, match="not a falconnet checkpoint"):
        ck.load_checkpoint(str(tmp_path / "foreign.pt"))
    ckpt = {"model_name": "falconnet", "num_classes": 10, "model_kwargs": {}, "model": {}}
    with pytest.raises(ck.CheckpointError, match="holds model 'falconnet', expected 'lightnet_irb'"):
        ck.check_compatible(ckpt, "x.pt", "lightnet_irb", 10)
    with pytest.raises(ck.CheckpointError, match="trained for 10 classes, expected 100"):
        ck.check_compatible(ckpt, "x.pt", "falconnet", 100)
