"""`falconnet eval`: top-1 and top-5 accuracy of a train-form or deployed checkpoint on a dataset split."""
from __future__ import annotations

import json
import sys

from .data import DATASETS, SPLITS


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (last.pt, best.pt) or a deployed one (deployed.pt)")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: the checkpoint's)")
    parser.add_argument("--split", default="val", choices=SPLITS, help="split to evaluate (default val; CIFAR's val is its test set)")
    parser.add_argument("--img-size", type=int, default=None, help="evaluation image size (default: the checkpoint's training size)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default auto)")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast precision on GPU (default none: float32)")
    parser.add_argument("--reparam", action="store_true", help="re-parameterize a training checkpoint before evaluating it")
    parser.add_argument("--workers", type=int, default=4, help="decoding workers for image files (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as for train; 0 keeps PyTorch's default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .data import DatasetError, load_split
    from .distributed import choose_device
    from .modelspec import load_model, reparameterize
    from .trainer import evaluate, set_cpu_threads

    set_cpu_threads(args.threads)
    try:
        model, deployed, ckpt = load_model(args.checkpoint)
        config = ckpt.get("config", {})
        dataset = args.dataset or config.get("dataset")
        if dataset is None:
            raise CheckpointError(f"{args.checkpoint!r} does not record its dataset; pass --dataset")
        data_dir = args.data_dir or config.get("data_dir")
        img_size = args.img_size or config.get("img_size", 224)
        split = load_split(dataset, args.split, data_dir, config.get("load_size") or img_size, workers=args.workers)
        if split.num_classes != ckpt["num_classes"]:
            raise CheckpointError(
                f"checkpoint {args.checkpoint!r} has {ckpt['num_classes']} classes but {dataset}/{args.split} has {split.num_classes}"
            )
        if args.reparam and not deployed:
            model, deployed = reparameterize(model), True
        device = choose_device(args.device, 0)
        result = evaluate(model.to(device), split, img_size, torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]),
                          device, args.batch_size, amp=args.amp if device.type == "cuda" else "none", workers=args.workers)
    except (CheckpointError, DatasetError, ValueError) as exc:
        print(f"falconnet eval: error: {exc}", file=sys.stderr)
        return 2
    result.update(checkpoint=args.checkpoint, model=ckpt["model_name"], deployed=deployed, dataset=dataset,
                  split=args.split, img_size=img_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        form = "deployed" if deployed else "train-form"
        print(f"{ckpt['model_name']} ({form}) on {dataset}/{args.split} at {img_size}px: "
              f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  loss {result['loss']:.4f}  ({result['count']} images)")
    return 0
