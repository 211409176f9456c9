"""Build registry models for training, and rebuild them (train-form or deployed) from checkpoints.

A checkpoint stores the model's registry name, its constructor kwargs and its number of classes,
never pickled code: the model is rebuilt with ``falconnet.create_model`` and, for a deployed
checkpoint, re-parameterized before its weights are loaded (re-parameterization is deterministic
in structure, so the state dict keys line up).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_compatible, load_checkpoint


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    import falconnet

    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(list_models())}")
    return falconnet.create_model(name, num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    import falconnet

    return list(falconnet.list_models())


def reparameterize(model: nn.Module) -> nn.Module:
    """The deployed copy of a train-form model (the original is left in eval mode, unchanged)."""
    import falconnet

    model.eval()
    return falconnet.reparameterize_model(model, inplace=False).eval()


def model_from_checkpoint(ckpt: dict, path: str = "<checkpoint>") -> tuple[nn.Module, bool]:
    """(model in eval mode with the checkpoint's weights, whether it is the deployed form)."""
    torch.manual_seed(0)  # construction draws random init that the state dict then overwrites
    model = create_model(ckpt["model_name"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    deployed = bool(ckpt.get("deployed", False))
    if deployed:
        model = reparameterize(model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        form = "deployed" if deployed else "train-form"
        raise CheckpointError(
            f"checkpoint {path!r}: its weights do not fit a {form} {ckpt['model_name']!r} with "
            f"{ckpt['num_classes']} classes and kwargs {ckpt.get('model_kwargs', {})}: {exc}"
        ) from exc
    return model.eval(), deployed


def load_model(path: str, expect_model: str | None = None, expect_classes: int | None = None) -> tuple[nn.Module, bool, dict]:
    """Load a train-form or deployed checkpoint; check it against the expected model and classes."""
    ckpt = load_checkpoint(path)
    if expect_model is not None or expect_classes is not None:
        check_compatible(
            ckpt,
            path,
            expect_model if expect_model is not None else ckpt["model_name"],
            expect_classes if expect_classes is not None else ckpt["num_classes"],
        )
    model, deployed = model_from_checkpoint(ckpt, path)
    return model, deployed, ckpt


def deployed_checkpoint(ckpt: dict, deployed_model: nn.Module) -> dict:
    """The deployed counterpart of a training checkpoint: same metadata, folded weights, no optimizer."""
    keep = ("model_name", "model_kwargs", "num_classes", "classes", "config", "mean", "std", "epoch", "metrics")
    out = {k: ckpt[k] for k in keep if k in ckpt}
    out["deployed"] = True
    out["format_version"] = ckpt.get("format_version", 1)
    out["model"] = {k: v.detach().cpu() for k, v in deployed_model.state_dict().items()}
    return out
