"""Datasets for training and evaluation, held as uint8 images of one fixed size per dataset.

Every dataset becomes a ``ImageSplit``: uint8 images (N, 3, S, S) at a storage size S (the
native size for CIFAR 32, Tiny-ImageNet 64 and digits 8; ``load_size`` for an ImageFolder), and
int64 labels. Augmentation (crop, flip, resize to the training size, normalisation) then runs on
whole batches on the training device (see augment.py), so the same code path serves the CPU, a
GPU fed from host memory and a GPU that holds the whole dataset (``--gpu-data``).

An ImageFolder of arbitrary images is decoded lazily (``FileImageSplit``) unless it is small or
``--gpu-data`` asks for it in memory.

Splits: "train" and "val". CIFAR has no validation set, so "val" is its test set (as in the
paper's tables); Tiny-ImageNet's "val" is its labelled val/ folder (its test/ has no labels);
digits are split 80/20, stratified, with a fixed seed, so the split never changes.
"""
from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder")
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The digits split: fixed, so a number measured today is comparable tomorrow.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetError(ValueError):
    """A dataset directory is missing or not in the expected layout (the message says which)."""


@dataclass
class ImageSplit:
    """One split held in memory: uint8 images (N, 3, S, S) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(f"{self.name}: images must be uint8 (N, 3, S, S), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]

    def to(self, device) -> "ImageSplit":
        return ImageSplit(self.images.to(device), self.labels.to(device), self.classes, self.name)


@dataclass
class FileImageSplit(torch.utils.data.Dataset):
    """An ImageFolder-style split decoded on demand (in DataLoader workers) to size S x S."""

    paths: list[str]
    labels: torch.Tensor
    classes: list[str]
    load_size: int
    name: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> int:
        return self.load_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.paths[i], self.load_size), int(self.labels[i])

    def load_all(self, workers: int = 8) -> ImageSplit:
        return ImageSplit(decode_images(self.paths, self.load_size, workers), self.labels, self.classes, self.name)


def decode_image(path: str, size: int | None) -> torch.Tensor:
    """Decode one image file to uint8 (3, size, size); RGB, bilinear resize when the size differs."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_images(paths: list[str], size: int, workers: int = 8) -> torch.Tensor:
    """Decode many files into one uint8 (N, 3, size, size) tensor; PIL releases the GIL while decoding."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def one(i):
        out[i] = decode_image(paths[i], size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(len(paths))))
    return out


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn)


def load_digits_split(split: str) -> ImageSplit:
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) as uint8 RGB, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    index = np.arange(len(grey))
    train_idx, val_idx = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=digits.target
    )
    chosen = np.sort(train_idx if split == "train" else val_idx)
    images = torch.from_numpy(grey[chosen]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    return ImageSplit(images, labels, [str(d) for d in range(10)], f"digits/{split}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (the python pickles that torchvision downloads)

_CIFAR = {
    # name: (folder, train files, val files, meta file, label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _cifar_root(name: str, data_dir: str) -> str:
    folder = _CIFAR[name][0]
    for candidate in (os.path.join(data_dir, folder), data_dir):
        if os.path.isfile(os.path.join(candidate, _CIFAR[name][3])):
            return candidate
    raise DatasetError(
        f"{name}: no CIFAR python-pickle data under {data_dir!r}; expected {os.path.join(data_dir, folder)}/ "
        f"with {', '.join(_CIFAR[name][1] + _CIFAR[name][2] + [_CIFAR[name][3]])} (torchvision's layout; "
        f"pass --download to fetch it)"
    )


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetError(f"missing file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign file
        raise DatasetError(f"cannot read CIFAR pickle {path}: {exc}") from exc


def load_cifar_split(name: str, data_dir: str, split: str, download: bool = False) -> ImageSplit:
    folder, train_files, val_files, meta_file, label_key, names_key = _CIFAR[name]
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(data_dir, train=split == "train", download=True)
    root = _cifar_root(name, data_dir)
    meta = _unpickle(os.path.join(root, meta_file))
    if names_key not in meta:
        raise DatasetError(f"{name}: {os.path.join(root, meta_file)} has no {names_key.decode()} entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    images, labels = [], []
    for fname in train_files if split == "train" else val_files:
        path = os.path.join(root, fname)
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise DatasetError(f"{name}: {path} lacks the 'data' or '{label_key.decode()}' entry")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{name}: {path} 'data' must be (N, 3072) uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    labels_np = np.concatenate(labels)
    if labels_np.min() < 0 or labels_np.max() >= len(classes):
        raise DatasetError(f"{name}: labels must lie in [0, {len(classes)}), found {labels_np.min()}..{labels_np.max()}")
    return ImageSplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels_np), classes, f"{name}/{split}")


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet-200: train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt


def _tinyimagenet_root(data_dir: str) -> str:
    for candidate in (os.path.join(data_dir, "tiny-imagenet-200"), data_dir):
        if os.path.isdir(os.path.join(candidate, "train")) and os.path.isdir(os.path.join(candidate, "val")):
            return candidate
    raise DatasetError(
        f"tinyimagenet: no Tiny-ImageNet under {data_dir!r}; expected {os.path.join(data_dir, 'tiny-imagenet-200')}/ "
        "(or the folder itself) holding wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
        "val/val_annotations.txt"
    )


def _list_images(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def tinyimagenet_files(data_dir: str, split: str) -> tuple[list[str], list[int], list[str]]:
    root = _tinyimagenet_root(data_dir)
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_path):
        with open(wnids_path) as f:
            wnids = sorted(line.strip() for line in f if line.strip())
    else:
        wnids = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
    if not wnids:
        raise DatasetError(f"tinyimagenet: no classes found in {wnids_path} or {os.path.join(root, 'train')}")
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for w in wnids:
            folder = os.path.join(root, "train", w, "images")
            if not os.path.isdir(folder):
                raise DatasetError(f"tinyimagenet: missing folder {folder} for class {w}")
            files = _list_images(folder)
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise DatasetError(f"tinyimagenet: missing {ann} (lines: <file>\\t<wnid>\\t<bbox>)")
        with open(ann) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 2 or parts[1] not in index:
                    raise DatasetError(f"tinyimagenet: {ann} line {n} must be '<file>\\t<wnid>...' with a known wnid, got {line.strip()!r}")
                path = os.path.join(root, "val", "images", parts[0])
                if not os.path.isfile(path):
                    raise DatasetError(f"tinyimagenet: {ann} line {n} names {path}, which does not exist")
                paths.append(path)
                labels.append(index[parts[1]])
    if not paths:
        raise DatasetError(f"tinyimagenet: no {split} images found under {root}")
    return paths, labels, wnids


# ---------------------------------------------------------------------------------------------
# ImageFolder: <dir>/<split>/<class>/*.jpg (or <dir>/<class>/*.jpg, whose "val" is then missing)


def imagefolder_files(data_dir: str, split: str) -> tuple[list[str], list[int], list[str]]:
    if not os.path.isdir(data_dir):
        raise DatasetError(f"imagefolder: {data_dir!r} is not a directory")
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(
            f"imagefolder: expected {split_dir}/<class>/<image> (an ImageFolder with train/ and val/ "
            f"subfolders) under {data_dir!r}"
        )
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not classes:
        raise DatasetError(f"imagefolder: {split_dir} holds no class folders")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = _list_images(os.path.join(split_dir, c))
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DatasetError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
    return paths, labels, classes


# ---------------------------------------------------------------------------------------------


def load_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    load_size: int = 224,
    in_memory: bool | None = None,
    download: bool = False,
    workers: int = 8,
) -> ImageSplit | FileImageSplit:
    """Load one split. ``load_size`` is the storage size of an ImageFolder (others keep their own).

    ``in_memory=None`` keeps Tiny-ImageNet in memory (1.2 GB uint8 for train) and an ImageFolder
    on disk; True forces memory (needed for --gpu-data).
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if dataset == "digits":
        return load_digits_split(split)
    if data_dir is None:
        raise DatasetError(f"{dataset}: --data-dir is required (the folder holding the dataset)")
    if not download and not os.path.isdir(data_dir):
        raise DatasetError(f"{dataset}: data directory {data_dir!r} does not exist")
    if dataset in _CIFAR:
        return load_cifar_split(dataset, data_dir, split, download)
    if dataset == "tinyimagenet":
        paths, labels, classes = tinyimagenet_files(data_dir, split)
        files = FileImageSplit(paths, torch.tensor(labels, dtype=torch.int64), classes, 64, f"tinyimagenet/{split}")
        return files if in_memory is False else files.load_all(workers)
    paths, labels, classes = imagefolder_files(data_dir, split)
    files = FileImageSplit(paths, torch.tensor(labels, dtype=torch.int64), classes, load_size, f"imagefolder/{split}")
    return files.load_all(workers) if in_memory else files


def channel_stats(split: ImageSplit | FileImageSplit, max_images: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of (up to max_images evenly spaced) training images."""
    n = len(split)
    if not isinstance(split, ImageSplit):
        max_images = min(max_images, 1000)  # each one is a file to decode
    take = torch.linspace(0, n - 1, min(n, max_images)).long()
    if isinstance(split, ImageSplit):
        sample = split.images[take]
    else:
        sample = torch.stack([split[int(i)][0] for i in take])
    x = sample.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)  # a constant channel (e.g. grey images) must not divide by 0
    return mean.tolist(), std.tolist()
