"""Dataset loaders on small data written in each dataset's real on-disk format, and augmentation."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from falconnet.train.augment import random_crop_flip, to_model_input
from falconnet.train.data import DatasetError, channel_stats, load_split


def _rgb(rng, n, size):
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_cifar(root, name, n_train=12, n_test=5, seed=0):
    """CIFAR in torchvision's python-pickle layout (data rows are R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, trains, tests, meta, label_key, names_key, k = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names", 10
    else:
        folder, trains, tests, meta, label_key, names_key, k = "cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names", 100
    d = os.path.join(root, folder)
    os.makedirs(d)
    written = {}
    for fname, n in [(f, n_train) for f in trains] + [(f, n_test) for f in tests]:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, k, size=n).tolist()
        with open(os.path.join(d, fname), "wb") as f:
            pickle.dump({b"data": images.reshape(n, -1), label_key: labels, b"batch_label": fname.encode()}, f)
        written[fname] = (images, labels)
    with open(os.path.join(d, meta), "wb") as f:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(k)]}, f)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    written = write_cifar(tmp_path, name)
    train = load_split(name, "train", str(tmp_path))
    val = load_split(name, "val", str(tmp_path))
    files = [f for f in written if "test" not in f]
    assert len(train) == 12 * len(files) and len(val) == 5
    assert train.num_classes == (10 if name == "cifar10" else 100) and train.classes[3] == "class3"
    images, labels = written[files[-1]]
    assert torch.equal(train.images[-12:], torch.from_numpy(images))
    assert train.labels[-12:].tolist() == labels
    test_images, test_labels = written["test_batch" if name == "cifar10" else "test"]
    assert torch.equal(val.images, torch.from_numpy(test_images)) and val.labels.tolist() == test_labels


def test_cifar_malformed(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_split("cifar10", "train", str(tmp_path))
    write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_split("cifar10", "train", str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("cifar10", "train", str(tmp_path / "nowhere"))


def write_tinyimagenet(root, wnids=("n01", "n02", "n03"), per_class=3, n_val=4, seed=0):
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    train = {}
    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d)
        for i, img in enumerate(_rgb(rng, per_class, 64)):
            Image.fromarray(img).save(os.path.join(d, f"{w}_{i}.png"))  # lossless, so pixels compare exactly
            train[f"{w}_{i}"] = img
    lines, val = [], []
    for i, img in enumerate(_rgb(rng, n_val, 64)):
        name, w = f"val_{i}.png", wnids[i % len(wnids)]
        Image.fromarray(img).save(os.path.join(base, "val", "images", name))
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        val.append((img, wnids.index(w)))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return base, train, val


def test_tinyimagenet_folders(tmp_path):
    base, train_imgs, val_imgs = write_tinyimagenet(tmp_path)
    train = load_split("tinyimagenet", "train", str(tmp_path), workers=2)
    val = load_split("tinyimagenet", "val", str(tmp_path), workers=2)
    assert train.classes == ["n01", "n02", "n03"] and len(train) == 9 and train.image_size == 64
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(train.images[4], torch.from_numpy(train_imgs["n02_1"]).permute(2, 0, 1))
    assert val.labels.tolist() == [label for _, label in val_imgs]
    assert torch.equal(val.images[3], torch.from_numpy(val_imgs[3][0]).permute(2, 0, 1))
    lazy = load_split("tinyimagenet", "val", str(tmp_path), in_memory=False)
    image, label = lazy[3]
    assert torch.equal(image, val.images[3]) and label == val_imgs[3][1]


def test_tinyimagenet_malformed(tmp_path):
    base, _, _ = write_tinyimagenet(tmp_path)
    os.remove(os.path.join(base, "val", "val_annotations.txt"))
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        load_split("tinyimagenet", "val", str(tmp_path))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("val_0.png\tn99\t0 0 1 1\n")
    with pytest.raises(DatasetError, match="known wnid"):
        load_split("tinyimagenet", "val", str(tmp_path))
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_split("tinyimagenet", "train", str(tmp_path / "tiny-imagenet-200" / "train"))


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_rgb(rng, 1, 20 + i)[0]).save(d / f"{i}.png")  # mixed sizes
    lazy = load_split("imagefolder", "train", str(tmp_path), load_size=16)
    assert lazy.classes == ["cat", "dog"] and len(lazy) == 6 and lazy.labels.tolist() == [0, 0, 0, 1, 1, 1]
    image, label = lazy[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    held = load_split("imagefolder", "val", str(tmp_path), load_size=16, in_memory=True)
    assert held.images.shape == (4, 3, 16, 16)
    with pytest.raises(DatasetError, match="train/ and val/"):
        load_split("imagefolder", "train", str(tmp_path / "train"))


def test_digits_split_is_fixed_and_stratified():
    train, val = load_split("digits", "train"), load_split("digits", "val")
    assert len(train) == 1437 and len(val) == 360 and train.image_size == 8
    assert torch.bincount(val.labels, minlength=10).min() >= 35  # 20% of each class (~178 per class)
    again = load_split("digits", "val")
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated to RGB
    mean, std = channel_stats(train)
    assert len(mean) == 3 and 0 < mean[0] < 1 and std[0] > 0


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(DatasetError, match="expected one of"):
        load_split("mnist", "train")
    with pytest.raises(DatasetError, match="--data-dir"):
        load_split("cifar10", "train", None)


def test_crop_flip_and_resize():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(images, g, 0, flip=False), images)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), 2, flip=True)
    assert out.shape == images.shape
    for n in range(2):
        # every crop is a shifted (maybe mirrored) window of the zero-padded image
        padded = torch.nn.functional.pad(images[n], (2, 2, 2, 2))
        windows = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in windows)
    x = to_model_input(images, 32, torch.zeros(3), torch.ones(3))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
