"""One fine-tuning run: load the checkpoint with a new head, apply the variant, train, evaluate, measure the drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_tract import find_first_layer

from .checkpoints import load_for_finetuning
from .presets import FinetunePreset
from benchmarks.convergence.data import Data, EvalSets, eval_sets
from benchmarks.convergence.models import apply_variant
from benchmarks.convergence.optimizers import make_optimizer
from benchmarks.convergence.presets import Variant
from benchmarks.convergence.training import evaluate, fit


__all__ = ["finetune_evals", "finetune_run", "finetune_steps"]


def finetune_steps(preset: FinetunePreset, n_train: int) -> int:
    """Fine-tuning length: `max(min_steps, min_epochs * steps per epoch)`."""
    return max(preset.min_steps, preset.min_epochs * (n_train // preset.batch_size))


def finetune_evals(data: Data, preset: FinetunePreset) -> EvalSets:
    """Preprocessed training-loss slice (first `min(n_train_eval, n)` training images), validation and test inputs."""
    return eval_sets(data, "std", min(preset.n_train_eval, len(data.train_x)))


def finetune_run(
    folder: Path, arch: str, target: str, data: Data, evals: EvalSets, variant: Variant, lr: float, seed: int,
    preset: FinetunePreset, device: torch.device,
) -> dict[str, Any]:
    """Fine-tunes the checkpoint in `folder` on `data` (whole model trainable) and evaluates it.

    Returns:
        `dict`: test / validation accuracy and loss, training loss (eval mode, un-augmented training images),
        `first_layer_drift` = ‖W - W₀‖ / ‖W₀‖ of the first layer's weight (W₀: as loaded), steps, training time.
    """
    model = load_for_finetuning(folder, target, seed, device)
    _, first = find_first_layer(model)
    w0 = first.weight.detach().clone()
    model = apply_variant(model, variant)
    optimizer = make_optimizer(preset.optimizers[arch], model, lr, variant)
    log = fit(model, optimizer, data.train_x.to(device), data.train_y.to(device), steps=finetune_steps(preset, len(data.train_x)),
              batch_size=preset.batch_size, seed=seed, inputs="std", mean=data.mean, std=data.std, crop_pad=preset.crop_pad,
              hflip=True, device=device)
    train_acc, train_loss = evaluate(model, evals.train_x, evals.train_y.to(device))
    val_acc, val_loss = evaluate(model, evals.val_x, data.val_y.to(device))
    test_acc, test_loss = evaluate(model, evals.test_x, data.test_y.to(device))
    drift = (first.weight.detach() - w0).norm() / w0.norm()
    return {
        "test_acc": test_acc, "test_loss": test_loss, "train_loss": train_loss, "train_acc": train_acc,
        "val_acc": val_acc, "val_loss": val_loss, "first_layer_drift": drift.item(), "steps": log.steps,
        "train_seconds": log.seconds, "final_batch_loss": log.final_batch_loss, "diverged": log.diverged,
    }
