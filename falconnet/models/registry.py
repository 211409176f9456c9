"""The model registry: create_model(name, num_classes=1000, **kwargs), list_models().

Each entry is LightNet with one Table 1 block type and the defaults settled by counting against
Table 1 (docs/design.md). When timm is importable the same names are registered with timm.
"""
from __future__ import annotations

import sys

import torch.nn as nn

from .lightnet import LightNet

# Settled by counting (docs/design.md): head 1024, ReLU6; expansion per block as below.
_HEAD_WIDTH = 1024

# name -> LightNet keyword arguments
MODEL_CONFIGS: dict[str, dict] = {
    "lightnet_dsc": dict(block="dsc", block_kwargs=dict(expansion=4)),
    "lightnet_rdsc": dict(block="rdsc", block_kwargs=dict(expansion=4)),
    "lightnet_shufflev1": dict(block="shufflev1", block_kwargs=dict(expansion=3, groups=4)),
    # e = 7: the integer with the smallest worst column; no reading of the unit reaches 15% on
    # both columns (Table 1's MACs per parameter for this row is below any LightNet-shaped one)
    "lightnet_shufflev2": dict(block="shufflev2", block_kwargs=dict(expansion=7)),
    "lightnet_irb": dict(block="irb", block_kwargs=dict(expansion=4)),
    "lightnet_sandglass": dict(block="sandglass", block_kwargs=dict(expansion=5)),
    "lightnet_hbo": dict(block="hbo", block_kwargs=dict(expansion=6)),
    "lightnet_fasternet": dict(block="fasternet", block_kwargs=dict(expansion=4)),
    "lightnet_repso": dict(block="repso", block_kwargs=dict(expansion=4)),
    # FalconNet: RepSO blocks everywhere, both PW-Convs of the stage-3 blocks as RefCO (r = 1,
    # 3 branches); Table 1's -28% params / -37% MACs against lightnet_repso decided it.
    "falconnet": dict(
        block="repso",
        stage_blocks=("repso", "repso", "falcon", "repso"),
        stage_block_kwargs=(None, None, dict(refco=dict(r=1, branches=3)), None),
        block_kwargs=dict(expansion=4),
    ),
}


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODEL_CONFIGS)


def model_config(name: str) -> dict:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return {"head_width": _HEAD_WIDTH, **MODEL_CONFIGS[name]}


def create_model(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a registry model. kwargs override LightNet's arguments (activation, head_width,
    drop_rate, in_chans, block_kwargs, ...); block_kwargs are merged into the entry's own."""
    if pretrained:
        raise ValueError("no pretrained weights are published for FalconNet models (pretrained must be False)")
    cfg = model_config(name)
    if "block_kwargs" in kwargs:
        kwargs["block_kwargs"] = {**cfg.get("block_kwargs", {}), **(kwargs["block_kwargs"] or {})}
    return LightNet(num_classes=num_classes, **{**cfg, **kwargs})


def _register_with_timm() -> None:
    try:
        from timm.models import register_model
    except Exception:  # timm is optional
        return
    module = sys.modules[__name__]
    for name in MODEL_CONFIGS:

        def entry(pretrained: bool = False, _name: str = name, **kwargs) -> nn.Module:
            # timm passes its pretrained-config bookkeeping along; LightNet has no use for it
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
                kwargs.pop(key, None)
            return create_model(_name, pretrained=pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = __name__
        setattr(module, name, entry)
        try:
            register_model(entry)
        except Exception:  # already registered (module re-imported): keep timm's entry
            pass


_register_with_timm()
