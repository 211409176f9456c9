"""Batched augmentation on any device: random crop with zero padding, horizontal flip, resize, normalise.

Working on whole uint8 batches lets the GPU do this work when the dataset lives on it
(``--gpu-data``), and keeps the CPU path identical. All randomness comes from an explicit
generator, so a run is reproducible from (seed, epoch, rank) alone, however the data is fed.

Order: crop and flip at the storage size (CIFAR 32, Tiny-ImageNet 64, digits 8), then resize to
the training size. Padding S/8 on each side is CIFAR's customary 4 pixels at 32; cropping before
the resize is equivalent to cropping the resized image with S/8-proportional padding, and costs
(224/32)^2 = 49x less.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_padding(storage_size: int) -> int:
    return max(1, storage_size // 8)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Per-image random S x S crop of the zero-padded batch, then a flip with probability 1/2."""
    n, c, s, _ = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    ramp = torch.arange(s, device=device)
    rows = (dy[:, None] + ramp)[:, None, :, None]  # (n, 1, s, 1)
    cols = (dx[:, None] + ramp)[:, None, None, :]  # (n, 1, 1, s)
    if flip:
        mirrored = torch.rand(n, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def to_model_input(
    images: torch.Tensor, img_size: int, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float (N, 3, img_size, img_size); bilinear resize when S differs."""
    x = images.to(dtype).div_(255.0)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        # downscaling (an ImageFolder of large images) needs antialiasing; upscaling does not
        antialias = x.shape[-1] > img_size
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=antialias)
    return x.sub_(mean.view(1, -1, 1, 1).to(x)).div_(std.view(1, -1, 1, 1).to(x))


def train_transform(
    images: torch.Tensor,
    generator: torch.Generator,
    img_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    crop: bool = True,
    flip: bool = True,
) -> torch.Tensor:
    if crop or flip:
        padding = crop_padding(images.shape[-1]) if crop else 0
        images = random_crop_flip(images, generator, padding, flip)
    return to_model_input(images, img_size, mean, std)


def eval_transform(images: torch.Tensor, img_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return to_model_input(images, img_size, mean, std)
