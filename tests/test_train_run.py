"""Training runs on the real digits data: accuracy rises, resume is exact, bad input fails cleanly."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_train_fixtures import install

from falconnet.train.checkpoint import CheckpointError
from falconnet.train.recipe import TrainConfig, build_optimizer, lr_factor
from falconnet.train.trainer import TrainError, train


@pytest.fixture
def standin(monkeypatch):
    install(monkeypatch)
    torch.set_num_threads(1)  # two shared cores; also makes CPU reductions run in one fixed order


def tiny(**overrides) -> TrainConfig:
    base = dict(model="standin", dataset="digits", img_size=16, epochs=3, warmup_epochs=1, batch_size=64, lr=0.2,
                hflip=False, workers=0, device="cpu")
    return TrainConfig(**{**base, **overrides})


class Crash(Exception):
    pass


def test_training_raises_accuracy_and_writes_the_run(standin, tmp_path):
    result = train(tiny(epochs=6, lr=0.5), str(tmp_path), progress=False, log=lambda s: None)
    first, last = result.history[0], result.history[-1]
    # chance is 10%; the stand-in (2k parameters, one block) measured 78% after 6 epochs
    assert last["val_top1"] > 0.6 and last["val_top1"] > first["val_top1"] + 0.3
    assert last["train_loss"] < first["train_loss"]
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "config.json", "curves.png", "last.pt", "log.jsonl"]
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["val_images"] == 360
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_interrupted_then_resumed_equals_uninterrupted(standin, tmp_path):
    cfg = tiny(epochs=3)
    straight = train(cfg, str(tmp_path / "a"), progress=False, log=lambda s: None)

    def crash(epoch, step):
        if epoch == 1 and step == 7:  # mid-way through the second epoch
            raise Crash()

    with pytest.raises(Crash):
        train(tiny(epochs=3), str(tmp_path / "b"), progress=False, log=lambda s: None, on_step=crash)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train(tiny(epochs=3), str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"), progress=False,
                    log=lambda s: None)
    assert straight.final_state.keys() == resumed.final_state.keys()
    for name, value in straight.final_state.items():
        assert torch.equal(value, resumed.final_state[name]), name  # bit-for-bit
    assert [h["val_top1"] for h in straight.history] == [h["val_top1"] for h in resumed.history]


def test_bad_inputs_fail_before_overwriting(standin, tmp_path):
    out = str(tmp_path)
    train(tiny(epochs=1), out, progress=False, log=lambda s: None)
    saved = open(tmp_path / "last.pt", "rb").read()
    with pytest.raises(TrainError, match="already holds a run"):
        train(tiny(epochs=1), out, progress=False, log=lambda s: None)
    with pytest.raises(CheckpointError, match="holds model 'standin', expected 'other'"):
        train(tiny(model="other", epochs=2), out, resume=os.path.join(out, "last.pt"), progress=False)
    with pytest.raises(CheckpointError, match="built with"):
        train(tiny(epochs=2, model_kwargs={"width": 8}), out, resume=os.path.join(out, "last.pt"), progress=False)
    with pytest.raises(TrainError, match="has 10 classes"):
        train(tiny(num_classes=100), out, overwrite=True, progress=False)
    with pytest.raises(TrainError, match="training loss is nan"):  # a diverging run must not replace a good one
        train(tiny(epochs=1, lr=1e30), out, overwrite=True, progress=False, log=lambda s: None)
    assert open(tmp_path / "last.pt", "rb").read() == saved


def test_optimizer_is_fused_sgd_with_the_loop_update():
    """The recipe's SGD runs torch's fused kernel where every parameter allows it (CPU or CUDA,
    floating point) and, at a fixed learning rate, updates exactly as the per-tensor loop does
    (momentum, weight decay, channels_last parameters); an integer parameter (not trainable by
    SGD anyway) keeps the loop."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    model = model.to(memory_format=torch.channels_last)
    cfg = TrainConfig(lr=0.1, momentum=0.9, wd=4e-5)
    twin = copy.deepcopy(model)
    fused, loop = build_optimizer(model, cfg), torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9,
                                                               weight_decay=4e-5, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    model.register_parameter("count", torch.nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False))
    assert not build_optimizer(model, cfg).defaults["fused"]


def test_schedule_is_linear_warmup_then_cosine():
    steps, epochs, warmup = 10, 300, 5
    assert lr_factor(0, steps, epochs, warmup) == pytest.approx(1 / 50)
    assert lr_factor(49, steps, epochs, warmup) == pytest.approx(1.0)
    assert lr_factor(50, steps, epochs, warmup) == pytest.approx(1.0)
    mid = 50 + (3000 - 50) // 2
    assert lr_factor(mid, steps, epochs, warmup) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(2999, steps, epochs, warmup) == pytest.approx(0.0, abs=1e-5)


def test_cli_errors(capsys, tmp_path):
    from falconnet.cli import main

    assert main(["train", "--preset", "table9-Z", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'table9-Z'" in err and "table2-E" in err and "table3-T" in err
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", "tinyimagenet", "--data-dir", str(tmp_path)]) == 2
    assert "tiny-imagenet-200" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_run_refuses_to_clobber_and_resumes(standin, tmp_path, capsys):
    from falconnet.cli import main

    args = ["train", "--model", "standin", "--img-size", "16", "--epochs", "1", "--warmup-epochs", "0",
            "--out-dir", str(tmp_path), "--no-deploy", "--no-progress"]
    assert main(args) == 0
    saved = open(tmp_path / "last.pt", "rb").read()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 2
    assert "already completed 1 of 1 epochs" in capsys.readouterr().err
    assert open(tmp_path / "last.pt", "rb").read() == saved


def test_presets_build_the_table_rows():
    import falconnet
    from falconnet.layers import BLOCKS
    from falconnet.train.presets import PresetError, resolve_preset

    name, kwargs = resolve_preset("table3-T")  # row T is the default RepSO: the same model
    assert name == "lightnet_repso"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(falconnet.create_model(name, num_classes=10, **kwargs)) == count(falconnet.create_model("lightnet_repso", num_classes=10))
    name, kwargs = resolve_preset("table3-C")  # one 3x3 branch: fewer parameters than T's seven
    assert count(falconnet.create_model(name, num_classes=10, **kwargs)) < count(falconnet.create_model("lightnet_repso", num_classes=10))
    assert "meta_basic" in BLOCKS
    name, kwargs = resolve_preset("table2-E")  # row E (identity, DW, identity; e=4) is the IRB block
    irb = count(falconnet.create_model("lightnet_irb", num_classes=10))
    assert count(falconnet.create_model(name, num_classes=10, **kwargs)) == irb
    name, kwargs = resolve_preset("table2-A")  # row A: no learnable spatial operator at all
    assert count(falconnet.create_model(name, num_classes=10, **kwargs)) < irb
    with pytest.raises(PresetError, match="table3-T"):
        resolve_preset("table4-A")


def test_imagefolder_trains_from_files_and_from_memory(standin, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, level in (("dark", 40), ("light", 215)):  # two classes a model can tell apart
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 20, size=(12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    common = dict(dataset="imagefolder", data_dir=str(tmp_path / "data"), load_size=16, epochs=1, batch_size=8)
    lazy = train(tiny(**common, workers=1), str(tmp_path / "files"), progress=False, log=lambda s: None)
    held = train(tiny(**common, gpu_data=True), str(tmp_path / "memory"), progress=False, log=lambda s: None)
    for result in (lazy, held):
        assert result.history[0]["train_images"] == 16 and result.history[0]["val_images"] == 6
    # the same images and the same batches, decoded in a worker or held in memory: same weights
    for name, value in lazy.final_state.items():
        assert torch.equal(value, held.final_state[name]), name
