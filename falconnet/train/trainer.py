"""The training loop: data feeding, one epoch, evaluation, checkpoints and the per-epoch log.

Reproducibility: the model is initialised from ``seed``; each epoch's shuffle comes from
DistributedSampler(seed, epoch) and each epoch's augmentation from a generator seeded with
(seed, epoch, rank). Checkpoints are taken at epoch ends and hold every other source of state
(model, optimizer, scheduler, grad scaler, the python / numpy / torch / cuda RNG of every rank),
so a run killed in epoch e and resumed from the end of epoch e-1 ends with the same weights as a
run that was never interrupted (bit-for-bit on the CPU; on a GPU as far as its kernels are
deterministic).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist_utils
from .augment import eval_transform, train_transform
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
)
from .data import ImageSplit, channel_stats, load_split
from .modelspec import create_model
from .recipe import TrainConfig, build_optimizer, build_scheduler


class TrainError(RuntimeError):
    """The run cannot start or continue (the message says why); nothing saved was overwritten."""


LAST, BEST, LOG, CURVES, CONFIG = "last.pt", "best.pt", "log.jsonl", "curves.png", "config.json"


@dataclass
class TrainResult:
    out_dir: str
    history: list = field(default_factory=list)
    best_top1: float = 0.0
    best_epoch: int = 0
    wall_s: float = 0.0
    final_state: dict | None = None  # the raw model's state dict after the last epoch


# ---------------------------------------------------------------------------------------------
# data feeding


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1))
    return g


def iterate_batches(split, batches: list[list[int]], device: torch.device, workers: int):
    """Yield (uint8 images, int64 labels) on ``device`` for each list of indices in ``batches``."""
    if isinstance(split, ImageSplit):
        pin = device.type == "cuda" and split.images.device.type == "cpu"
        for idx in batches:
            index = torch.as_tensor(idx, device=split.images.device)
            images, labels = split.gather(index)
            if pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(
        split, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def chunk(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[i : i + size] for i in range(0, len(indices), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"--amp must be auto, bf16, fp16 or none, got {amp!r}")
    return amp


def resolve_channels_last(flag: str | bool, device: torch.device) -> bool:
    """auto = on: cuDNN's and the fused kernels' fast layout on a GPU, and on the CPU too (oneDNN:
    FalconNet at 32 px with the seven-branch RepSO trained at 183 vs 98 images/s on 1 thread;
    with the one-conv RepSO path both layouts measured ~108 images/s; 2026-11-26)."""
    if flag == "auto":
        return True
    return flag in (True, "on", "true", "1")


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split,
    img_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    ctx: dist_utils.DistContext | None = None,
    amp: str = "none",
    channels_last: bool = False,
    workers: int = 0,
    return_logits: bool = False,
) -> dict:
    """Loss, top-1 and top-5 on ``split``; with several ranks each takes every world_size-th image
    (no padding, so every image counts once) and the counters are summed."""
    ctx = ctx or dist_utils.DistContext(device=device)
    was_training = model.training
    model.eval()
    indices = list(range(ctx.rank, len(split), ctx.world_size))
    mean, std = mean.to(device), std.to(device)
    k = min(5, split.num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, count
    all_logits = []
    for images, labels in iterate_batches(split, chunk(indices, batch_size, False), device, workers):
        x = eval_transform(images, img_size, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        totals += torch.stack([
            F.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
        if return_logits:
            all_logits.append(logits.cpu())
    model.train(was_training)
    loss, top1, topk, count = dist_utils.all_reduce_sum(totals, ctx).tolist()
    out = {"loss": loss / max(count, 1), "top1": top1 / max(count, 1), "top5": topk / max(count, 1), "count": int(count)}
    if return_logits:
        out["logits"] = torch.cat(all_logits) if all_logits else torch.empty(0)
    return out


# ---------------------------------------------------------------------------------------------
# training


def _jsonable(x):
    """JSON-safe copy: tuple keys (RepSO's extra branch sizes) become strings."""
    if isinstance(x, dict):
        return {(k if isinstance(k, str) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def load_data(cfg: TrainConfig, in_memory: bool | None = None):
    load_size = cfg.load_size or cfg.img_size
    train = load_split(cfg.dataset, "train", cfg.data_dir, load_size, in_memory, workers=cfg.workers or 1)
    val = load_split(cfg.dataset, "val", cfg.data_dir, load_size, in_memory, workers=cfg.workers or 1)
    if train.classes != val.classes:
        raise TrainError(f"{cfg.dataset}: the train and val splits have different classes ({len(train.classes)} vs {len(val.classes)})")
    return train, val


def train(
    cfg: TrainConfig,
    out_dir: str,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir`` (last.pt, best.pt, log.jsonl, curves.png, config.json).

    ``on_step(epoch, step)`` runs after every optimizer step (tests use it to simulate a crash).
    Everything that can be checked (data, model, checkpoint) is checked before the first write.
    """
    started = time.time()
    ctx = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, out_dir, resume, overwrite, progress, log if ctx.is_main else (lambda s: None), on_step, ctx, started)
    finally:
        dist_utils.teardown(ctx)


def set_cpu_threads(threads: int) -> None:
    """Intra-op CPU threads. The default is 1 per process: on shared cores OpenMP's spinning
    threads collapse (a FalconNet step at 32 px measured 20x slower with 2 threads than with 1 on
    2 busy cores); on a quiet machine pass --threads <cores>."""
    if threads > 0:
        torch.set_num_threads(threads)


def _train(cfg, out_dir, resume, overwrite, progress, log, on_step, ctx, started) -> TrainResult:
    device = ctx.device
    set_cpu_threads(cfg.threads)
    amp = resolve_amp(cfg.amp, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    if cfg.batch_size % ctx.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {ctx.world_size} processes")
    per_rank_batch = cfg.batch_size // ctx.world_size
    last_path = os.path.join(out_dir, LAST)

    # --- checks that must pass before anything is written
    if resume is None and not overwrite and os.path.exists(last_path):
        raise TrainError(f"{out_dir} already holds a run ({LAST}); pass --resume to continue it, --overwrite to replace it, or another --out-dir")
    train_split, val_split = load_data(cfg, in_memory=True if cfg.gpu_data else None)
    num_classes = train_split.num_classes
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise TrainError(f"--num-classes {cfg.num_classes} does not match {cfg.dataset}, which has {num_classes} classes")
    cfg.num_classes = num_classes
    steps_per_epoch = (len(train_split) // ctx.world_size) // per_rank_batch
    if steps_per_epoch < 1:
        raise TrainError(f"{cfg.dataset} has {len(train_split)} training images, fewer than one batch of {cfg.batch_size}; lower --batch-size")
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        check_compatible(ckpt, resume, cfg.model, num_classes, cfg.model_kwargs)
        if ckpt.get("deployed"):
            raise CheckpointError(f"{resume!r} is a deployed checkpoint; --resume needs a training checkpoint ({LAST})")
        if ckpt["config"]["dataset"] != cfg.dataset:
            raise CheckpointError(f"checkpoint {resume!r} was trained on {ckpt['config']['dataset']!r}, not {cfg.dataset!r}")
        if ckpt["epoch"] >= cfg.epochs:
            raise TrainError(f"checkpoint {resume!r} has already completed {ckpt['epoch']} of {cfg.epochs} epochs")
    mean, std = (ckpt["mean"], ckpt["std"]) if ckpt else channel_stats(train_split)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)

    seed_everything(cfg.seed)
    raw_model = create_model(cfg.model, num_classes, **cfg.model_kwargs)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw_model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start_epoch, best_top1, best_epoch, history = 0, -1.0, 0, []
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_top1, best_epoch = ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"]
        history = list(ckpt["history"])
        rngs = ckpt["rng"]
        if len(rngs) == ctx.world_size:
            restore_rng_state(rngs[ctx.rank])
        else:
            log(f"note: checkpoint saved by {len(rngs)} processes, resuming with {ctx.world_size}: RNG reseeded")
            seed_everything(cfg.seed + 1000 * start_epoch + ctx.rank)
        log(f"resumed from {resume} after epoch {start_epoch} (best val top-1 {100 * best_top1:.2f}% at epoch {best_epoch})")
    else:
        # ranks share the initial weights (DDP broadcasts rank 0's anyway) but not dropout noise
        seed_everything(cfg.seed + ctx.rank)

    model = raw_model
    if cfg.sync_bn and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    if cfg.gpu_data and device.type == "cuda":
        train_split, val_split = train_split.to(device), val_split.to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_split)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )

    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, CONFIG), json.dumps(_jsonable(cfg.to_dict()), indent=2) + "\n")
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(
        f"{cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.dataset}: {len(train_split)} train / {len(val_split)} val images, "
        f"{num_classes} classes, img {cfg.img_size}, batch {cfg.batch_size} x {ctx.world_size} process(es) on {device}, "
        f"amp {amp}, {cfg.epochs} epochs of {steps_per_epoch} steps -> {out_dir}"
    )

    from tqdm import tqdm

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        sampler.set_epoch(epoch)
        batches = chunk(list(sampler), per_rank_batch, drop_last=True)
        gen = epoch_generator(cfg.seed, epoch, ctx.rank, device)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and ctx.is_main),
                   leave=False, dynamic_ncols=True)
        for step, (images, labels) in enumerate(iterate_batches(train_split, batches, device, cfg.workers)):
            x = train_transform(images, gen, cfg.img_size, mean_t, std_t, crop=cfg.crop, flip=cfg.hflip)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                logits = model(x)
            loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                totals += torch.stack([
                    loss.detach().double() * labels.numel(),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
                ])
            bar.update(1)
            if ctx.is_main and progress and (step % 10 == 0 or step == len(batches) - 1):
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
            if on_step is not None:
                on_step(epoch, step)
        bar.close()
        loss_sum, correct, count = dist_utils.all_reduce_sum(totals, ctx).tolist()
        train_loss = loss_sum / count
        if not math.isfinite(train_loss):
            raise TrainError(f"epoch {epoch + 1}: the training loss is {train_loss}; stopping without saving (lower --lr?)")
        # Evaluate the unwrapped model: ranks may get unequal numbers of val batches, which must
        # not meet DDP's collectives. Rank 0's BN statistics (the ones checkpointed) go to all.
        dist_utils.broadcast_buffers(raw_model, ctx)
        val = evaluate(raw_model, val_split, cfg.img_size, mean_t, std_t, device, cfg.eval_batch_size or per_rank_batch,
                       ctx, amp, channels_last, cfg.workers)
        train_time = time.time() - t0
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc": correct / count,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "train_images": int(count),
            "val_images": val["count"],
            "epoch_s": round(train_time, 3),
            "images_per_s": round(count / train_time, 1),
        }
        history.append(row)
        is_best = val["top1"] > best_top1
        if is_best:
            best_top1, best_epoch = val["top1"], epoch + 1
        rngs = dist_utils.all_gather_objects(capture_rng_state(), ctx)
        if ctx.is_main:
            state = {
                "format_version": FORMAT_VERSION,
                "model_name": cfg.model,
                "model_kwargs": dict(cfg.model_kwargs),
                "num_classes": num_classes,
                "classes": list(train_split.classes),
                "config": cfg.to_dict(),
                "mean": list(mean),
                "std": list(std),
                "deployed": False,
                "epoch": epoch + 1,
                "model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "history": history,
                "metrics": row,
            }
            # best first: a crash between the two writes leaves last.pt one epoch behind, which a
            # resume redoes, rather than a best.pt that no last.pt ever held
            if is_best:
                atomic_save(state, os.path.join(out_dir, BEST))
            atomic_save(state, last_path)
            atomic_write_text(os.path.join(out_dir, LOG), "".join(json.dumps(h) + "\n" for h in history))
        dist_utils.barrier(ctx)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f} acc {100 * row['train_acc']:.2f}% | "
            f"val loss {val['loss']:.4f} top-1 {100 * val['top1']:.2f}% top-5 {100 * val['top5']:.2f}% | "
            f"{train_time:.1f}s, {row['images_per_s']:.0f} img/s"
        )

    if ctx.is_main and history:
        from .plots import plot_curves

        plot_curves(history, os.path.join(out_dir, CURVES))
    return TrainResult(
        out_dir=out_dir,
        history=history,
        best_top1=best_top1,
        best_epoch=best_epoch,
        wall_s=time.time() - started,
        final_state={k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()},
    )
