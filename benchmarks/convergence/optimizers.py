"""The optimizers of a run (AdamW, SGD, Muon; the first layer on SGD through `hf_tract.optim`) and the schedule."""

from __future__ import annotations

import math

import torch

from hf_tract.optim import CombinedOptimizer, split_muon_optimizer, split_tract_param_groups

from .presets import Variant


__all__ = ["MUON_ADAMW_LR", "WARMUP_FRACTION", "cosine_with_warmup", "make_optimizer"]

WARMUP_FRACTION = 0.05
MUON_ADAMW_LR = 1e-3  # AdamW part of a Muon run: the plain AdamW learning rate chosen in cpu-full


def _muon(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Muon for the hidden Linear weights; AdamW for the first layer, the head, biases, norms and embeddings: the
    split of `hf_tract.optim.split_muon_optimizer` (what `TrActTrainingArguments(muon_learning_rate=...)` uses)."""
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=MUON_ADAMW_LR, weight_decay=0.05)
    return CombinedOptimizer([adamw, split_muon_optimizer(adamw, model, lr)])


def make_optimizer(optimizer: str, model: torch.nn.Module, lr: float, variant: Variant) -> torch.optim.Optimizer:
    """The run's optimizer over the trainable parameters.

    `"adam"`: AdamW (weight decay 0.05); `"sgd"`: SGD (Nesterov momentum 0.9, weight decay 5e-4); `"muon"`:
    `torch.optim.Muon` (weight decay 0.05) at `lr` for the hidden Linear weights and AdamW at `MUON_ADAMW_LR` for the
    rest (the first layer included, as Muon's authors advise). With `variant.first_layer_sgd_lr` the TrAct layer's
    parameters are taken out with `hf_tract.optim.split_tract_param_groups` and trained by `torch.optim.SGD`
    (momentum 0.9, weight decay 5e-4), combined with the rest by `hf_tract.optim.CombinedOptimizer`: the same
    plumbing as `TrActTrainingArguments(tract_optimizer="sgd")`. With `variant.first_layer_lr` the TrAct layer's
    parameters get their own groups of the same optimizer at that learning rate (`tract_learning_rate`).

    Returns:
        `torch.optim.Optimizer`: one optimizer (a `CombinedOptimizer` where there are several), so one scheduler
        drives all learning rates.
    """
    if optimizer == "muon":
        if variant.first_layer_sgd_lr is not None or variant.first_layer_lr is not None:
            raise ValueError("the first-layer optimizer variants are defined for the adam and sgd settings only")
        return _muon(model, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        main = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    else:
        main = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if variant.first_layer_lr is not None:  # as TrActTrainingArguments(tract_learning_rate=...)
        for group in split_tract_param_groups(main, model, learning_rate=variant.first_layer_lr):
            main.add_param_group(group)
        return main
    if variant.first_layer_sgd_lr is None:
        return main
    groups = split_tract_param_groups(main, model, learning_rate=variant.first_layer_sgd_lr, weight_decay=5e-4)
    for group in groups:  # SGD raises on Adam's options (betas, eps, ...)
        for key in list(group):
            if key not in ("params", "lr", "weight_decay", "name"):
                del group[key]
    return CombinedOptimizer([main, torch.optim.SGD(groups, lr=variant.first_layer_sgd_lr, momentum=0.9)])


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `WARMUP_FRACTION` of the steps, then cosine decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
