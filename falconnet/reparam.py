"""Whole-model re-parameterization (timm convention): every module with `reparameterize()`
converts itself in place; `reparameterize_model` walks the model.

After it: RepSO -> one depthwise conv with bias (fused dw_conv3x3 when 3x3), RefCO -> one
SFConv2d with bias, every conv+BN pair (stem, blocks, subsampling, head) -> one conv with bias.
"""
from __future__ import annotations

import copy

import torch.nn as nn


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deployed form of `model` (a copy unless inplace=True).

    The BatchNorm folding uses running statistics, i.e. eval-mode behaviour, so the model must be
    in eval mode: call model.eval() first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize_model expects an nn.Module, got {type(model).__name__}")
    if model.training:
        raise RuntimeError(
            "reparameterize_model needs a model in eval mode (BatchNorm is folded with its running "
            "statistics, which only eval mode uses): call model.eval() first"
        )
    if not inplace:
        model = copy.deepcopy(model)
    # Collect first: reparameterize() replaces submodules, which must not happen mid-iteration.
    for module in [m for m in model.modules() if hasattr(m, "reparameterize")]:
        module.reparameterize()
    return model
