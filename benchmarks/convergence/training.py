"""The training loop (`fit`), evaluation, and one convergence run (`train_run`): build, train, evaluate."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from .data import Data, EvalSets, augment, preprocess
from .models import apply_variant, build_model
from .optimizers import cosine_with_warmup, make_optimizer
from .presets import Preset, Setting, Variant
from benchmarks import harness


__all__ = ["FIRST_STEPS_LOGGED", "FitLog", "evaluate", "fit", "train_run"]

FIRST_STEPS_LOGGED = 50  # per-step training losses kept per run (fidelity comparison)


@dataclasses.dataclass
class FitLog:
    """What `fit` observed: training time (evaluation excluded), steps, the first minibatch losses, divergence."""

    seconds: float
    steps: int
    first_losses: list[float]
    final_batch_loss: float
    diverged: bool


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    inputs: str,
    mean: float,
    std: float,
    crop_pad: int = 0,
    hflip: bool = False,
    device: torch.device | None = None,
) -> FitLog:
    """Trains `model` for `steps` minibatch steps with a cosine schedule (warm-up included), epoch after epoch.

    Every epoch draws a new order of `images` (generator seeded with `seed`) and drops its last incomplete
    batch; augmentation and contrast draws come from a second generator (`seed + 1000`), so two runs with the
    same seed see the same batches. A non-finite loss at the end of an epoch stops the run (`diverged`).

    Args:
        images (`torch.Tensor`): uint8 training images `(N, 1, H, W)` (at least `batch_size` of them).
        labels (`torch.Tensor`): int64 labels.
        inputs (`str`), mean (`float`), std (`float`): preprocessing (see [`data.preprocess`]).
    """
    device = device or images.device
    scheduler = cosine_with_warmup(optimizer, steps)
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(images)} training images are fewer than one batch of {batch_size}")
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1000)
    model.train()
    first_losses: list[float] = []
    done, diverged = 0, False
    harness.sync(device)
    start = time.perf_counter()
    while done < steps and not diverged:
        perm = torch.randperm(len(images), generator=order_gen).to(device)
        for step in range(min(steps_per_epoch, steps - done)):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = preprocess(augment(images[idx], crop_pad, hflip, aug_gen), inputs, mean, std, aug_gen)
            loss = F.cross_entropy(model(pixel_values=x).logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
            if len(first_losses) < FIRST_STEPS_LOGGED:
                first_losses.append(loss.item())
        diverged = not math.isfinite(loss.item())
    harness.sync(device)
    return FitLog(time.perf_counter() - start, done, first_losses, loss.item(), diverged)


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Top-1 accuracy and mean cross entropy of `model` (eval mode) on preprocessed `inputs`.

    Returns:
        `tuple[float, float]`: accuracy, loss.
    """
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(inputs), batch_size):
        logits = model(pixel_values=inputs[start : start + batch_size]).logits.float()
        target = labels[start : start + batch_size]
        correct += (logits.argmax(-1) == target).sum().item()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
    model.train()
    return correct / len(inputs), loss / len(inputs)


def train_run(
    setting: Setting,
    preset: Preset,
    data: Data,
    evals: EvalSets,
    lr: float,
    variant: Variant,
    epochs: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Trains one model of the convergence benchmark for `epochs` epochs with its own cosine schedule and evaluates it.

    Args:
        variant (`Variant`): plain, hf_tract, official, ... (see [`Variant`]).
        evals (`EvalSets`): preprocessed training-loss slice, validation and test inputs.

    Returns:
        `dict`: the run's record: training loss (fixed slice, eval mode), validation and test accuracy and
        loss, training wall time (evaluation excluded), the first per-step minibatch losses, whether the
        loss became non-finite.
    """
    model = build_model(setting.arch, getattr(preset, setting.arch), seed).to(device)
    model = apply_variant(model, variant, whitening_inputs=evals.train_x)
    optimizer = make_optimizer(setting.optimizer, model, lr, variant)
    log = fit(model, optimizer, data.train_x, data.train_y, steps=epochs * (len(data.train_x) // preset.batch_size),
              batch_size=preset.batch_size, seed=seed, inputs=setting.inputs, mean=data.mean, std=data.std,
              crop_pad=preset.crop_pad, hflip=preset.hflip, device=device)
    train_acc, train_loss = evaluate(model, evals.train_x, evals.train_y)
    val_acc, val_loss = evaluate(model, evals.val_x, data.val_y)
    test_acc, test_loss = evaluate(model, evals.test_x, data.test_y)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_seconds": log.seconds,
        "steps": log.steps,
        "final_batch_loss": log.final_batch_loss,
        "first_losses": log.first_losses,
        "diverged": log.diverged,
    }
