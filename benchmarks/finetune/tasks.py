"""The source tasks (pretraining) and target tasks (fine-tuning): which images, which labels."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from .presets import ALL
from benchmarks.convergence.data import Data, read_idx_dataset


__all__ = ["DATASET_OF", "FASHION_NAMES", "SourceTask", "label_names", "source_task", "target_task"]

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASET_OF = {"fmnist04": "fashion-mnist", "mnist": "mnist", "fmnist59": "fashion-mnist", "fmnist": "fashion-mnist"}


@functools.lru_cache(maxsize=2)
def _read(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four IDX files, read once per process (each is read by every cell)."""
    return read_idx_dataset(data_dir)


def label_names(task: str) -> list[str]:
    """Class names of a task, in label order."""
    return {
        "fmnist04": FASHION_NAMES[:5],
        "fmnist59": FASHION_NAMES[5:],
        "fmnist": FASHION_NAMES,
        "mnist": [str(d) for d in range(10)],
    }[task]


def _classes(images: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of `task`'s classes, relabelled from 0 (Fashion-MNIST 5-9 -> 0-4)."""
    if task == "fmnist04":
        keep = labels < 5
        return images[keep], labels[keep]
    if task == "fmnist59":
        keep = labels >= 5
        return images[keep], labels[keep] - 5
    return images, labels


@dataclasses.dataclass
class SourceTask:
    """Pretraining images (uint8 `(N, 1, 28, 28)`) and labels, the source test set, and the pixel statistics."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_labels: int
    mean: float
    std: float


def source_task(task: str, data_dir: Path, n_train: int) -> SourceTask:
    """The source task's training images (the first `n_train` of a fixed seed-0 permutation; `ALL`: all) and test set."""
    train_x, train_y, test_x, test_y = _read(data_dir)
    train_x, train_y = _classes(train_x, train_y, task)
    test_x, test_y = _classes(test_x, test_y, task)
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    idx = perm if n_train == ALL else perm[:n_train]
    pixels = train_x[idx].float() / 255
    return SourceTask(train_x[idx], train_y[idx], test_x, test_y, len(label_names(task)), pixels.mean().item(), pixels.std().item())


def target_task(task: str, data_dir: Path, n_val: int, labels: int, n_test: int, mean: float, std: float) -> Data:
    """The target task's split: validation = the first `n_val` of a fixed seed-0 permutation of its training images,
    training = the next `labels` (`ALL`: the rest), test = its first `n_test` test images (`ALL`: all).

    `mean` / `std` standardize the inputs: the pretrained checkpoint's image processor's, as a user's pipeline would.
    """
    train_x, train_y, test_x, test_y = _read(data_dir)
    train_x, train_y = _classes(train_x, train_y, task)
    test_x, test_y = _classes(test_x, test_y, task)
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    val_idx = perm[:n_val]
    train_idx = perm[n_val:] if labels == ALL else perm[n_val : n_val + labels]
    if labels != ALL and len(train_idx) < labels:
        raise ValueError(f"{task} has {len(perm) - n_val} training images after validation, fewer than {labels}")
    n_test = len(test_x) if n_test == ALL else n_test
    return Data(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx], test_x[:n_test], test_y[:n_test], mean, std)
