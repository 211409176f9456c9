"""Re-parameterize a trained model and show that the deployed model classifies exactly as it did.

The check compares the two models on a whole split, in float32 and with TF32 off (on a GPU), so
the only differences are float32 rounding in a different order of operations.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .trainer import evaluate

# Folding a BN into a conv and summing branches re-associates float32 sums; through a network of
# ~20 folded layers the logits move by about 1e-6..1e-5 relative to their size. 1e-4 relative is
# a bound with margin that a wrong fold (an error of order the BN shift itself) cannot meet.
LOGIT_RTOL = 1e-4


@contextlib.contextmanager
def exact_float32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compare_models(
    train_model: nn.Module, deployed_model: nn.Module, split, img_size: int, mean, std, device: torch.device,
    batch_size: int = 256,
) -> dict:
    """Top-1/top-5 of both models on ``split`` and how far their logits are apart."""
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    with exact_float32():
        a = evaluate(train_model.to(device).eval(), split, img_size, mean_t, std_t, device, batch_size, return_logits=True)
        b = evaluate(deployed_model.to(device).eval(), split, img_size, mean_t, std_t, device, batch_size, return_logits=True)
    diff = (a["logits"] - b["logits"]).abs().max().item() if a["logits"].numel() else 0.0
    scale = max(1.0, a["logits"].abs().max().item() if a["logits"].numel() else 1.0)
    disagree = int((a["logits"].argmax(1) != b["logits"].argmax(1)).sum())
    return {
        "train_top1": a["top1"],
        "train_top5": a["top5"],
        "deployed_top1": b["top1"],
        "deployed_top5": b["top5"],
        "max_abs_logit_diff": diff,
        "logit_scale": scale,
        "prediction_disagreements": disagree,
        "count": a["count"],
        "agree": disagree == 0 and a["top1"] == b["top1"] and diff <= LOGIT_RTOL * scale,
    }


@torch.no_grad()
def compare_on_random(train_model: nn.Module, deployed_model: nn.Module, img_size: int, batch: int = 4, seed: int = 0) -> dict:
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    a = train_model.cpu().eval()(x)
    b = deployed_model.cpu().eval()(x)
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "agree": diff <= LOGIT_RTOL * scale}
