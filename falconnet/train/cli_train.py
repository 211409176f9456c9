"""`falconnet train`: train a registry model; with no arguments, FalconNet on the scikit-learn digits.

After training, the best checkpoint is re-parameterized, the deployed model is shown to classify
the validation split exactly as the trained one does, and it is exported to ONNX and TorchScript.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .data import DATASETS
from .recipe import DATASET_RECIPES, PAPER_RECIPE, TrainConfig, recipe_defaults


def _bool_flag(parser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action="store_true", default=None, help=help_text)
    parser.add_argument(f"--no-{name}", dest=name.replace("-", "_"), action="store_false", help=f"the opposite of --{name}")


def add_arguments(parser) -> None:
    digits = DATASET_RECIPES["digits"]
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="registry model name (see `falconnet summary`); default falconnet")
    g.add_argument("--preset", default=None, help="an ablation by name: table2-A..table2-T (Meta Basic Block rows) or table3-A..table3-T (RepSO branch rows); sets the model")
    g.add_argument("--model-kwargs", default=None, metavar="JSON", help='extra model constructor arguments as a JSON object, e.g. \'{"drop_rate": 0.2}\'')

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="dataset (default digits: scikit-learn's handwritten digits, no download)")
    g.add_argument("--data-dir", default=None, help="folder holding the dataset (cifar: the one with cifar-10-batches-py/ or cifar-100-python/; tinyimagenet: the one with tiny-imagenet-200/; imagefolder: the one with train/<class>/ and val/<class>/)")
    g.add_argument("--download", action="store_true", help="download CIFAR through torchvision into --data-dir first (run it once in a single process, not under torchrun)")
    g.add_argument("--load-size", type=int, default=None, help="imagefolder only: size images are decoded to before augmentation (default --img-size)")
    g.add_argument("--num-classes", type=int, default=None, help="expected number of classes (default: the dataset's); a mismatch is an error")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for image files; threads for decoding (default 4)")
    g.add_argument("--gpu-data", action="store_true", help="hold the whole uint8 dataset on the GPU and crop/flip/resize there in batches")

    g = parser.add_argument_group("recipe (defaults: the paper's; digits defaults in brackets, see docs/training.md)")
    g.add_argument("--epochs", type=int, default=None, help=f"epochs (default {PAPER_RECIPE['epochs']} [digits {digits['epochs']}])")
    g.add_argument("--warmup-epochs", type=int, default=None, help=f"linear warm-up epochs before the cosine schedule (default {PAPER_RECIPE['warmup_epochs']} [digits {digits['warmup_epochs']}])")
    g.add_argument("--batch-size", type=int, default=None, help=f"global batch size, split over processes (default {PAPER_RECIPE['batch_size']} [digits {digits['batch_size']}])")
    g.add_argument("--eval-batch-size", type=int, default=None, help="per-process evaluation batch size (default: the training batch per process)")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate of SGD (default {PAPER_RECIPE['lr']} [digits {digits['lr']}])")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default {PAPER_RECIPE['momentum']})")
    g.add_argument("--wd", type=float, default=None, help=f"weight decay (default {PAPER_RECIPE['wd']})")
    g.add_argument("--img-size", type=int, default=None, help=f"training and evaluation image size (default {PAPER_RECIPE['img_size']} [digits {digits['img_size']}])")
    _bool_flag(g, "hflip", "random horizontal flip (default on [digits off: a mirrored digit is another glyph])")
    _bool_flag(g, "crop", "random crop with zero padding of 1/8 of the image size (default on)")
    g.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (default 0, as in the paper)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default 0)")

    g = parser.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda or cuda:<index> (default auto)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="autocast precision (default auto: bf16 on GPU, none on CPU)")
    g.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"), help="channels_last memory format (default auto: on, on GPU and CPU alike; never slower for FalconNet on the CPU in our measurements)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1: OpenMP threads on shared cores slow CPU training 10-20x; use the core count on a quiet machine; 0 keeps PyTorch's default)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes (torchrun runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="run folder (default runs/<name>)")
    g.add_argument("--name", default=None, help="run name under runs/ (default <model or preset>-<dataset>, numbered -2, -3, ... when taken)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT", help="continue a run: from CHECKPOINT, or from <out-dir>/last.pt when given without a value; pass the same settings as the first run")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that already holds a run")
    _bool_flag(g, "deploy", "after training, re-parameterize the best checkpoint, check it against the trained model on the val split and save deployed.pt (default on)")
    _bool_flag(g, "export", "also export the deployed model to ONNX (checked with onnxruntime) and TorchScript (default on)")


def _config_from_args(args) -> TrainConfig:
    from .presets import resolve_preset

    model, model_kwargs = args.model or "falconnet", {}
    if args.preset is not None:
        model, model_kwargs = resolve_preset(args.preset)
        if args.model is not None and args.model != model:
            raise ValueError(f"--preset {args.preset} sets the model to {model!r}; drop --model {args.model}")
    if args.model_kwargs:
        try:
            extra = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs must be a JSON object: {exc}") from exc
        if not isinstance(extra, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        model_kwargs = {**model_kwargs, **extra}
    defaults = recipe_defaults(args.dataset)

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    cfg = TrainConfig(
        model=model, model_kwargs=model_kwargs, preset=args.preset, dataset=args.dataset, data_dir=args.data_dir,
        load_size=args.load_size, num_classes=args.num_classes,
        epochs=pick("epochs"), warmup_epochs=pick("warmup_epochs"), batch_size=pick("batch_size"),
        eval_batch_size=args.eval_batch_size, lr=pick("lr"), momentum=pick("momentum"), wd=pick("wd"),
        img_size=pick("img_size"), hflip=pick("hflip"), crop=pick("crop"), label_smoothing=pick("label_smoothing"),
        seed=args.seed, amp=args.amp, channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn,
        gpu_data=args.gpu_data, workers=args.workers, device=args.device, threads=args.threads,
    )
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0 or cfg.lr <= 0 or cfg.wd < 0:
        raise ValueError("--warmup-epochs and --wd must be >= 0 and --lr > 0")
    return cfg


def _out_dir(args, cfg: TrainConfig) -> str:
    if args.out_dir:
        return args.out_dir
    base = os.path.join("runs", args.name or f"{cfg.preset or cfg.model}-{cfg.dataset}")
    if args.resume or args.overwrite or args.name:
        return base
    candidate, n = base, 1
    while os.path.exists(os.path.join(candidate, "last.pt")):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def run(args) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .presets import PresetError
    from .trainer import TrainError, train

    deploy = True if args.deploy is None else args.deploy
    export = deploy if args.export is None else args.export
    if export and not deploy:
        print("falconnet train: error: --export needs the deployed model; drop --no-deploy or add --no-export", file=sys.stderr)
        return 2
    try:
        cfg = _config_from_args(args)
        out_dir = _out_dir(args, cfg)
        resume = os.path.join(out_dir, "last.pt") if args.resume == "auto" else args.resume
        if args.dataset != "digits" and args.data_dir is None:
            raise DatasetError(f"--dataset {args.dataset} needs --data-dir (see --help for the expected layout)")
        if args.download:
            from .data import load_split

            if cfg.dataset not in ("cifar10", "cifar100"):
                raise DatasetError(f"--download fetches cifar10 and cifar100 only, not {cfg.dataset}")

            load_split(cfg.dataset, "train", cfg.data_dir, download=True)
            load_split(cfg.dataset, "val", cfg.data_dir, download=True)
        result = train(cfg, out_dir, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (DatasetError, CheckpointError, PresetError, TrainError, ValueError) as exc:
        print(f"falconnet train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {"out_dir": out_dir, "best_val_top1": result.best_top1, "best_epoch": result.best_epoch,
               "train_wall_s": round(result.wall_s, 1)}
    if result.history:
        summary["last_val_top1"] = result.history[-1]["val_top1"]
    ok = True
    if deploy:
        ok = _deploy_and_export(cfg, out_dir, summary, export)
    _print_summary(summary)
    return 0 if ok else 1


def _deploy_and_export(cfg: TrainConfig, out_dir: str, summary: dict, export: bool) -> bool:
    from .checkpoint import atomic_save
    from .data import load_split
    from .deploy import compare_models
    from .distributed import choose_device
    from .export import export_all
    from .modelspec import deployed_checkpoint, load_model, reparameterize

    t0 = time.time()
    best = os.path.join(out_dir, "best.pt")
    train_model, _, ckpt = load_model(best)
    deployed = reparameterize(train_model)
    val = load_split(cfg.dataset, "val", cfg.data_dir, cfg.load_size or cfg.img_size, workers=cfg.workers or 1)
    device = choose_device(cfg.device, 0)
    check = compare_models(train_model, deployed, val, cfg.img_size, ckpt["mean"], ckpt["std"], device,
                           cfg.eval_batch_size or cfg.batch_size)
    summary["deploy_check"] = check
    atomic_save(deployed_checkpoint(ckpt, deployed.cpu()), os.path.join(out_dir, "deployed.pt"))
    summary["deployed"] = os.path.join(out_dir, "deployed.pt")
    ok = check["agree"]
    if export:
        try:
            results = export_all(deployed.cpu(), cfg.img_size, os.path.join(out_dir, "model"))
        except Exception as exc:  # the checkpoints are saved; report the export failure, exit nonzero
            print(f"falconnet train: export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            summary["deploy_export_s"] = round(time.time() - t0, 1)
            return False
        scale = check["logit_scale"]
        for fmt, r in results.items():
            r["ok"] = r["max_abs_diff"] <= 1e-4 * scale  # float32 re-association only (see deploy.LOGIT_RTOL)
            ok = ok and r["ok"]
        summary["export"] = results
    summary["deploy_export_s"] = round(time.time() - t0, 1)
    return ok


def _print_summary(s: dict) -> None:
    print("\n=== falconnet train: summary ===")
    print(f"run folder        {s['out_dir']}  (last.pt, best.pt, log.jsonl, curves.png)")
    print(f"best val top-1    {100 * s['best_val_top1']:.2f}% (epoch {s['best_epoch']}); last epoch {100 * s.get('last_val_top1', 0):.2f}%")
    print(f"training time     {s['train_wall_s']:.1f} s")
    c = s.get("deploy_check")
    if c:
        verdict = "identical predictions" if c["agree"] else "MISMATCH"
        print(f"deployed model    top-1 {100 * c['deployed_top1']:.2f}% vs trained {100 * c['train_top1']:.2f}% on {c['count']} val images: "
              f"{verdict}; max |logit diff| {c['max_abs_logit_diff']:.2e} (logits up to {c['logit_scale']:.1f}) -> {s['deployed']}")
    for fmt, r in s.get("export", {}).items():
        checker = "onnxruntime" if fmt == "onnx" else "torch.jit.load"
        print(f"{fmt:<17} {r['path']}: {checker} vs PyTorch max |diff| {r['max_abs_diff']:.2e} {'ok' if r['ok'] else 'MISMATCH'}")
    if "deploy_export_s" in s:
        print(f"deploy + export   {s['deploy_export_s']:.1f} s")
