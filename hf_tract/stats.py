"""TrAct's training statistics (`tract_log_stats`): the first layer's gradient norms before and after the
preconditioner and the Gram's condition bound, recorded on logging steps only.

The layers record detached 0-d tensors in their backward pass ([`hf_tract.modules`]); [`TrActStatsCallback`]
turns the recording on for the steps the Trainer will log, and [`collect_tract_stats`] reads them when the logs
are written, so other steps gain no host synchronisation and no extra kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from .patching import tract_layers


class TrActStatsCallback(TrainerCallback):
    """Turns on the TrAct layers' statistics for the steps the Trainer will log (`tract_log_stats`).

    The layers then append detached 0-d tensors in their backward pass; nothing is read on the host until
    the Trainer's `log` ([`hf_tract.TrActTrainer`]) writes the logs, so other steps gain no synchronisation and no extra kernel.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.layers: list[nn.Module] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # Looked up once per run: the patched layers do not change while training.
        self.layers = list(tract_layers(self.trainer.model).values())

    def _will_log(self, args, state) -> bool:
        step = state.global_step + 1
        if step == 1 and args.logging_first_step:
            return True
        return args.logging_strategy == IntervalStrategy.STEPS and step % max(state.logging_steps, 1) == 0

    def on_step_begin(self, args, state, control, **kwargs):
        record = self._will_log(args, state)
        for layer in self.layers:
            layer.tract_record_stats = record
            if record:
                layer.tract_stats.clear()

    def on_step_end(self, args, state, control, **kwargs):
        for layer in self.layers:
            layer.tract_record_stats = False


def collect_tract_stats(model: nn.Module) -> dict[str, float]:
    """Read (and clear) the statistics the TrAct layers of `model` recorded.

    Args:
        model (`nn.Module`): A patched model whose layers had `tract_record_stats` on.

    Returns:
        `dict[str, float]`: `tract/grad_norm_plain`, `tract/grad_norm` and `tract/condition_bound`, each the mean
        over the recorded backward passes (key `tract/<layer name>/...` when several layers are patched).
    """
    layers = tract_layers(model)
    logs = {}
    for name, layer in layers.items():
        records = layer.__dict__.get("_tract_stats") or []
        if not records:
            continue
        prefix = "tract/" if len(layers) == 1 else f"tract/{name}/"
        for key, out in (("grad_norm_plain", "grad_norm_plain"), ("grad_norm_tract", "grad_norm"), ("condition_bound", "condition_bound")):
            logs[prefix + out] = torch.stack([record[key] for record in records]).mean().item()
        records.clear()
    return logs


__all__ = ["TrActStatsCallback", "collect_tract_stats"]
