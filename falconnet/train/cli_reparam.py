"""`falconnet reparam`: a training checkpoint -> a deployed (re-parameterized) checkpoint.

The deployed model is checked against the trained one on random input before anything is written.
"""
from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (last.pt or best.pt)")
    parser.add_argument("-o", "--output", default=None, help="deployed checkpoint to write (default deployed.pt beside the input)")
    parser.add_argument("--img-size", type=int, default=None, help="input size of the random-input check (default: the checkpoint's training size)")


def run(args) -> int:
    from .checkpoint import CheckpointError, atomic_save
    from .deploy import compare_on_random
    from .modelspec import deployed_checkpoint, load_model, reparameterize

    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "deployed.pt")
    try:
        model, deployed, ckpt = load_model(args.checkpoint)
        if deployed:
            raise CheckpointError(f"{args.checkpoint!r} is already deployed")
        if os.path.abspath(output) == os.path.abspath(args.checkpoint):
            raise ValueError("--output must differ from the input checkpoint")
        folded = reparameterize(model)
        img_size = args.img_size or ckpt.get("config", {}).get("img_size", 224)
        check = compare_on_random(model, folded, img_size)
    except (CheckpointError, ValueError) as exc:
        print(f"falconnet reparam: error: {exc}", file=sys.stderr)
        return 2
    if not check["agree"]:
        print(f"falconnet reparam: error: the deployed model's logits differ by {check['max_abs_logit_diff']:.3e} "
              f"(scale {check['logit_scale']:.1f}); nothing written", file=sys.stderr)
        return 1
    atomic_save(deployed_checkpoint(ckpt, folded), output)
    n_train = sum(p.numel() for p in model.parameters())
    n_deploy = sum(p.numel() for p in folded.parameters())
    print(f"{ckpt['model_name']}: {n_train / 1e6:.3f}M -> {n_deploy / 1e6:.3f}M parameters; "
          f"max |logit diff| on random {img_size}px input {check['max_abs_logit_diff']:.2e}; wrote {output}")
    return 0
