"""Pretrained checkpoints, the Hugging Face way: train plainly, `save_pretrained` (model + image processor),
`from_pretrained` with a new head."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTImageProcessor,
)
from transformers.utils import logging as hf_logging

from .presets import FinetunePreset
from .tasks import SourceTask, label_names
from benchmarks.convergence.data import preprocess
from benchmarks.convergence.models import build_model
from benchmarks.convergence.optimizers import make_optimizer
from benchmarks.convergence.presets import PLAIN
from benchmarks.convergence.training import evaluate, fit


__all__ = ["load_for_finetuning", "pretrain", "processor_stats"]

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def pretrain(arch: str, source: str, task: SourceTask, preset: FinetunePreset, folder: Path, device: torch.device) -> dict[str, Any]:
    """Trains `arch` plainly on the source task (seed 0), saves model and image processor to `folder`.

    The image processor carries the source images' mean and std (what fine-tuning standardizes with). Flips are
    used for Fashion-MNIST only (digits are not mirror-symmetric). Returns the pretraining record.
    """
    model = build_model(arch, preset.models[arch], seed=0, num_labels=task.num_labels).to(device)
    names = label_names(source)
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    optimizer = make_optimizer(preset.optimizers[arch], model, preset.pretrain_lr[arch], PLAIN)
    steps = preset.pretrain_epochs * (len(task.train_x) // preset.batch_size)
    log = fit(model, optimizer, task.train_x.to(device), task.train_y.to(device), steps=steps, batch_size=preset.batch_size,
              seed=0, inputs="std", mean=task.mean, std=task.std, crop_pad=preset.crop_pad, hflip=source != "mnist", device=device)
    test_x = preprocess(task.test_x.to(device), "std", task.mean, task.std, torch.Generator())
    test_acc, test_loss = evaluate(model, test_x, task.test_y.to(device))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    ViTImageProcessor(do_resize=False, image_mean=[task.mean], image_std=[task.std]).save_pretrained(folder)
    record = {"arch": arch, "source": source, "epochs": preset.pretrain_epochs, "steps": log.steps, "lr": preset.pretrain_lr[arch],
              "optimizer": preset.optimizers[arch], "n_train": len(task.train_x), "source_test_acc": test_acc,
              "source_test_loss": test_loss, "train_seconds": log.seconds, "checksum": _checksum(model),
              "folder": str(folder), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (folder / "pretraining.json").write_text(json.dumps(record, indent=1))
    return record


def processor_stats(folder: Path) -> tuple[float, float]:
    """The pixel mean and std of the checkpoint's image processor (`AutoImageProcessor.from_pretrained`)."""
    processor = AutoImageProcessor.from_pretrained(folder)
    return float(processor.image_mean[0]), float(processor.image_std[0])


def load_for_finetuning(folder: Path, target: str, seed: int, device: torch.device) -> torch.nn.Module:
    """`from_pretrained` with the target's labels (`num_labels`, `id2label`, `ignore_mismatched_sizes=True`) and a
    new head.

    `from_pretrained` keeps the pretrained head when the sizes match (5 -> 5 and 10 -> 10 classes here, though the
    classes differ), so the head is always replaced by that of a fresh model built from the same config, seeded by
    `seed`: the initialisation transformers gives a new head.
    """
    names = label_names(target)
    model = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    torch.manual_seed(seed)
    fresh = AutoModelForImageClassification.from_config(model.config)
    model.classifier.load_state_dict(fresh.classifier.state_dict())
    return model.to(device)
