"""Deploy and export: ONNX through onnxruntime and TorchScript reproduce the PyTorch model; the CLI commands."""
from __future__ import annotations

import onnx
import torch
from test_train_fixtures import StandIn, install, reparameterize_model

from falconnet.train.checkpoint import atomic_save
from falconnet.train.export import export_all, export_program
from falconnet.train.recipe import TrainConfig
from falconnet.train.trainer import train


def _deployed(num_classes=10):
    model = StandIn(num_classes)
    model.train()
    model(torch.randn(32, 3, 16, 16))
    return reparameterize_model(model.eval())


def test_onnx_and_torchscript_round_trip(tmp_path):
    deployed = _deployed()
    program = export_program(deployed, torch.randn(2, 3, 16, 16))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("falconnet" in t for t in targets)  # only standard operators remain
    results = export_all(deployed, 16, str(tmp_path / "model"))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert "Conv" in ops
    # float32 with another operator order: a few ulp of logits of size ~1 (PyTorch's own rounding)
    assert results["onnx"]["max_abs_diff"] < 1e-5
    assert results["torchscript"]["max_abs_diff"] < 1e-5
    import onnxruntime as ort  # and another batch size than the exported example: the batch axis is dynamic

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, deployed(x), rtol=1e-5, atol=1e-5)


def test_real_falconnet_exports_with_a_dynamic_batch(tmp_path):
    import falconnet

    torch.set_num_threads(1)
    model = falconnet.create_model("falconnet", num_classes=10)
    with torch.no_grad():  # eval-mode statistics that are not the identity, so the folds matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    deployed = falconnet.reparameterize_model(model.eval())
    results = export_all(deployed, 32, str(tmp_path / "falconnet"))
    with torch.no_grad():
        scale = deployed(torch.randn(3, 3, 32, 32)).abs().max().item()
    # the exported files are checked at batch 3 after tracing at batch 2; float32 re-association
    # through ~60 layers stays far below 1e-4 of the logits' size (deploy.LOGIT_RTOL)
    assert results["onnx"]["max_abs_diff"] <= 1e-4 * max(1.0, scale)
    assert results["torchscript"]["max_abs_diff"] <= 1e-4 * max(1.0, scale)


def test_eval_reparam_export_commands(tmp_path, monkeypatch, capsys):
    install(monkeypatch)
    from falconnet.cli import main

    cfg = TrainConfig(model="standin", dataset="digits", img_size=16, epochs=1, warmup_epochs=0, batch_size=64,
                      workers=0, device="cpu", hflip=False)
    train(cfg, str(tmp_path), progress=False, log=lambda s: None)
    assert main(["eval", str(tmp_path / "best.pt"), "--json"]) == 0
    trained = capsys.readouterr().out
    assert main(["reparam", str(tmp_path / "best.pt"), "-o", str(tmp_path / "deployed.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "deployed.pt"), "--json"]) == 0
    deployed = capsys.readouterr().out
    import json

    a, b = json.loads(trained), json.loads(deployed)
    assert b["deployed"] and not a["deployed"] and a["top1"] == b["top1"] and a["count"] == 360
    assert main(["export", str(tmp_path / "deployed.pt"), "-o", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.ts").exists()
    capsys.readouterr()

    # a checkpoint of another number of classes than the dataset
    ckpt = torch.load(tmp_path / "deployed.pt", weights_only=True)
    other = _deployed(num_classes=3)
    ckpt.update(num_classes=3, model={k: v for k, v in other.state_dict().items()})
    atomic_save(ckpt, str(tmp_path / "three.pt"))
    assert main(["eval", str(tmp_path / "three.pt")]) == 2
    assert "3 classes but digits/val has 10" in capsys.readouterr().err
    # weights that do not fit the recorded model
    ckpt.update(num_classes=10)
    atomic_save(ckpt, str(tmp_path / "bad.pt"))
    assert main(["eval", str(tmp_path / "bad.pt")]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert main(["reparam", str(tmp_path / "deployed.pt")]) == 2
    assert "already deployed" in capsys.readouterr().err
