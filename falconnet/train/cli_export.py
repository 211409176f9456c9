"""`falconnet export`: a deployed model to ONNX (checked with onnxruntime) and TorchScript.

A training checkpoint is re-parameterized first. Both files use standard operators only (the
fused ops are decomposed, see export.py), so they load without this package.
"""
from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a deployed checkpoint (deployed.pt) or a training one (re-parameterized first)")
    parser.add_argument("-o", "--output", default=None, help="output path without extension (default <checkpoint folder>/model)")
    parser.add_argument("--format", nargs="+", default=["onnx", "torchscript"], choices=("onnx", "torchscript"), help="formats to write (default both)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's training size); the batch size stays dynamic")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="allowed max |diff| of the exported model's logits, relative to the largest logit (default 1e-4: float32 re-association)")


def run(args) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .export import export_all
    from .modelspec import load_model, reparameterize

    try:
        model, deployed, ckpt = load_model(args.checkpoint)
    except (CheckpointError, ValueError) as exc:
        print(f"falconnet export: error: {exc}", file=sys.stderr)
        return 2
    if not deployed:
        model = reparameterize(model)
    img_size = args.img_size or ckpt.get("config", {}).get("img_size", 224)
    prefix = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "model")
    results = export_all(model, img_size, prefix, formats=tuple(args.format), opset=args.opset)
    with torch.no_grad():
        scale = max(1.0, model(torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))).abs().max().item())
    ok = True
    for fmt, r in results.items():
        good = r["max_abs_diff"] <= args.rtol * scale
        ok = ok and good
        print(f"{fmt:<12} {r['path']}: max |diff| vs PyTorch {r['max_abs_diff']:.2e} (logit scale {scale:.1f}) {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1
