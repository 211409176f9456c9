"""DistributedDataParallel with 2 gloo processes on the CPU: sharding, reduced metrics, equal weights."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from test_train_fixtures import install_globally

    from falconnet.train.recipe import TrainConfig
    from falconnet.train.trainer import train

    install_globally()
    cfg = TrainConfig(model="standin", dataset="digits", img_size=16, epochs=2, warmup_epochs=1, batch_size=64,
                      lr=0.2, hflip=False, workers=0, device="cpu")
    result = train(cfg, out_dir, progress=False, log=lambda s: None)
    torch.save({"state": result.final_state, "history": result.history}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name  # DDP keeps the replicas identical
    for row0, row1 in zip(r0["history"], r1["history"]):
        assert row0["val_top1"] == row1["val_top1"] and row0["train_loss"] == row1["train_loss"]  # reduced, not local
        # each of 2 ranks takes 1437 // 2 = 718 shuffled images, 718 // 32 = 22 batches of 32
        assert row0["train_images"] == 2 * 22 * 32
        assert row0["val_images"] == 360  # every val image counted exactly once across ranks
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")) == ["best.pt", "last.pt", "rank0.pt", "rank1.pt"]
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["rng"]) == 2  # both ranks' RNG state
