"""Per-step cost: plain and TrAct steps timed interleaved in one process, so that machine load hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from .data import Data, augment, preprocess
from .models import apply_variant, build_model
from .optimizers import make_optimizer
from .presets import Preset, Setting, Variant
from benchmarks import harness


__all__ = ["measure_step_times"]


def measure_step_times(
    setting: Setting, preset: Preset, data: Data, lr: float, device: torch.device, variants: list[Variant]
) -> dict[str, Any]:
    """Per-step training time of plain and TrAct models, measured interleaved in this process.

    All `variants` (same initialisation) take turns: every round each variant runs `preset.timing_steps`
    steps on the same batches, in a rotated order. The median over rounds of the per-step time is kept, so
    machine load that comes and goes hits every variant alike.

    Returns:
        `dict`: `seconds_per_step` per variant name, `ratio` (variant / plain) per TrAct variant, keyed by
        its lambda for the main hf_tract variants (`"0.1"`) and by its name for the others, and the raw
        per-round times.
    """
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(preset.timing_steps):
        idx = torch.randint(len(data.train_x), (preset.batch_size,), generator=gen).to(device)
        images = augment(data.train_x[idx], preset.crop_pad, preset.hflip, gen)
        batches.append((preprocess(images, setting.inputs, data.mean, data.std, gen), data.train_y[idx]))
    models = {}
    for variant in variants:
        model = build_model(setting.arch, getattr(preset, setting.arch), 0).to(device)
        model = apply_variant(model, variant, whitening_inputs=batches[0][0])
        models[variant.name] = (model, make_optimizer(setting.optimizer, model, lr, variant))

    def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        harness.sync(device)
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        harness.sync(device)
        return (time.perf_counter() - start) / len(batches)

    names = list(models)
    for name in names:  # warm-up
        run_steps(*models[name])
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(preset.timing_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_round[name].append(run_steps(*models[name]))
    seconds = {name: statistics.median(times) for name, times in per_round.items()}
    plain = next(v.name for v in variants if v.tract is None and v.first_layer_init == "default")
    ratio = {}
    for variant in variants:
        if variant.name != plain:
            key = str(variant.lambda_) if variant.name == f"tract_{variant.lambda_}" else variant.name
            ratio[key] = seconds[variant.name] / seconds[plain]
    return {"seconds_per_step": seconds, "ratio": ratio, "per_round": per_round}
