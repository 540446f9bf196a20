"""Optimizer plumbing for the TrAct layer's own settings: `split_tract_param_groups` and `CombinedOptimizer`.

[`TrActTrainer`] uses them for `tract_learning_rate` / `tract_weight_decay` (own parameter groups) and for
`tract_optimizer="sgd"` (the paper's ablation: SGD on the first layer, the `optim` optimizer elsewhere). They
work with any optimizer built from plain parameter groups, also outside the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .patching import tract_layers


def _tract_parameters(model: nn.Module) -> dict[int, str]:
    """`id(param) -> qualified name` for every parameter of the layers patched with TrAct."""
    params = {}
    for layer_name, layer in tract_layers(model).items():
        for param_name, param in layer.named_parameters(recurse=False):
            params[id(param)] = f"{layer_name}.{param_name}"
    return params


class CombinedOptimizer(torch.optim.Optimizer):
    """
    Several optimizers stepped as one, so that Trainer, accelerate, LR schedulers, gradient
    clipping and AMP grad scaling treat them as a single optimizer.

    `param_groups` is the concatenation of the inner optimizers' group dicts (the same objects),
    so a scheduler that sets `group["lr"]` changes the inner optimizers directly.

    Args:
        optimizers (`list[torch.optim.Optimizer]`):
            The optimizers; the first one's first group is the one Trainer logs the learning rate of.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer.")
        self.optimizers = list(optimizers)
        # `Optimizer.__init__` appends the given group dicts themselves (it does not copy them).
        super().__init__([group for opt in self.optimizers for group in opt.param_groups], {})

    def _relink_param_groups(self) -> None:
        # `Optimizer.load_state_dict` replaces an optimizer's group dicts by new ones.
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if inner is None or len(inner) != len(self.optimizers):
            raise ValueError(
                "This optimizer state was not saved by a CombinedOptimizer with the same number of optimizers "
                "(was the run started with another `tract_optimizer`?)."
            )
        for opt, opt_state in zip(self.optimizers, inner):
            opt.load_state_dict(opt_state)
        self._relink_param_groups()

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {opt!r}" for opt in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"


def split_tract_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """
    Take the TrAct layers' parameters out of `optimizer`'s groups and return them as new groups
    that keep each original group's options (betas, weight decay or not, ...), with `lr` and a
    non-zero `weight_decay` replaced when given.

    Must run before the optimizer's first step (the moved parameters have no state yet). Each
    returned group has `"name": "tract"`.

    Args:
        optimizer (`torch.optim.Optimizer`): A freshly built optimizer.
        model (`nn.Module`): The model patched with TrAct whose parameters the optimizer holds.
        learning_rate (`float`, *optional*): Learning rate of the new groups.
        weight_decay (`float`, *optional*): Weight decay of the new groups that decay.

    Returns:
        `list[dict]`: The new groups, not yet added to any optimizer.
    """
    tract_params = _tract_parameters(model)
    if not tract_params:
        raise ValueError("The model has no TrAct layer: call `apply_tract(model)` first.")
    if any(optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError("split_tract_param_groups must run before the optimizer's first step.")
    new_groups, found = [], set()
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in tract_params]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in tract_params]
        found.update(id(p) for p in moved)
        new_group = {key: value for key, value in group.items() if key not in ("params", "initial_lr")}
        new_group["params"] = moved
        new_group["name"] = "tract"
        if learning_rate is not None:
            new_group["lr"] = learning_rate
        if weight_decay is not None and group.get("weight_decay", 0.0) > 0:
            new_group["weight_decay"] = weight_decay
        new_groups.append(new_group)
    missing = [name for pid, name in tract_params.items() if pid not in found]
    if missing:
        raise ValueError(
            f"The optimizer does not hold the TrAct parameters {missing}: they are frozen, or the optimizer "
            "(e.g. a layer-wise or factory optimizer) does not use plain parameter groups. Leave "
            "`tract_optimizer='same'` and `tract_learning_rate`/`tract_weight_decay` unset with such optimizers."
        )
    return new_groups


__all__ = ["CombinedOptimizer", "split_tract_param_groups"]
