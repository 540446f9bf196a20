"""Optimizer plumbing: `split_tract_param_groups`, `split_muon_optimizer` and `CombinedOptimizer`.

[`TrActTrainer`] uses them for `tract_learning_rate` / `tract_weight_decay` (own parameter groups), for
`tract_optimizer="sgd"` (the paper's ablation: SGD on the first layer, the `optim` optimizer elsewhere) and for
`muon_learning_rate` (Muon for the hidden Linear weights, `optim` for the first layer and the rest). They work
with any optimizer built from plain parameter groups, also outside the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .patching import tract_layers
from .targets import find_first_layers
from .wrappers import unwrap_model


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


def _take_out(optimizer: torch.optim.Optimizer, params: dict[int, str], name: str, caller: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Moves `params` (`id -> name`) out of `optimizer`'s groups into new groups that keep each group's options.

    Returns the new groups (each with `"name": name`) and the names of the `params` the optimizer does not hold.
    """
    if any(optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError(f"{caller} must run before the optimizer's first step.")
    new_groups, found = [], set()
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in params]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in params]
        found.update(id(p) for p in moved)
        new_group = {key: value for key, value in group.items() if key not in ("params", "initial_lr")}
        new_group["params"] = moved
        new_group["name"] = name
        new_groups.append(new_group)
    return new_groups, [param_name for pid, param_name in params.items() if pid not in found]


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
    new_groups, missing = _take_out(optimizer, tract_params, "tract", "split_tract_param_groups")
    if missing:
        raise ValueError(
            f"The optimizer does not hold the TrAct parameters {missing}: they are frozen, or the optimizer "
            "(e.g. a layer-wise or factory optimizer) does not use plain parameter groups. Leave "
            "`tract_optimizer='same'` and `tract_learning_rate`/`tract_weight_decay` unset with such optimizers."
        )
    for group in new_groups:
        if learning_rate is not None:
            group["lr"] = learning_rate
        if weight_decay is not None and group.get("weight_decay", 0.0) > 0:
            group["weight_decay"] = weight_decay
    return new_groups


def _output_head_parameters(model: nn.Module) -> set[int]:
    """`id`s of the parameters of the model's output head (see `muon_parameter_names`)."""
    if hasattr(model, "base_model_prefix"):  # a transformers model: the head is what lies outside the backbone
        base = model.base_model
        inside = {id(p) for p in base.parameters()}
        return {id(p) for p in model.parameters() if id(p) not in inside}
    get_classifier = getattr(model, "get_classifier", None)  # timm
    if callable(get_classifier) and isinstance(head := get_classifier(), nn.Module):
        return {id(p) for p in head.parameters()}
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return {id(p) for p in linears[-1].parameters()} if linears else set()


def muon_parameter_names(model: nn.Module) -> list[str]:
    """
    The parameters that [`split_muon_optimizer`] gives to Muon: the weight of every trainable `nn.Linear` of
    the model, except the first layer (the TrAct layers; in a model without TrAct, the layer(s) `find_first_layers`
    finds) and the output head: both stay on the main optimizer, as Muon's authors advise.

    The head: for a transformers model, every module outside `model.base_model` (a bare backbone has none);
    for a timm model, `model.get_classifier()`; otherwise the last `nn.Linear` the model registers
    (torchvision's `fc`, `heads.head`, `classifier[-1]`). The stacked q/k/v matrix of `nn.MultiheadAttention`
    (`in_proj_weight`) counts as a Linear weight. Embedding tables, position embeddings, convolution kernels,
    norms and biases are never in the list (`torch.optim.Muon` takes 2-D matrices only).

    Args:
        model (`nn.Module`): The model, patched with TrAct or not.

    Returns:
        `list[str]`: Qualified parameter names, in the model's order.
    """
    return list(_muon_parameters(unwrap_model(model)).values())


def _muon_parameters(model: nn.Module) -> dict[int, str]:
    """`id(param) -> qualified name` of the parameters `muon_parameter_names` lists, in the model's order."""
    first = _tract_parameters(model) or {
        id(p): name for _, layer in find_first_layers(model) for name, p in layer.named_parameters()
    }
    excluded = set(first) | _output_head_parameters(model)
    params: dict[int, str] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Linear):
            matrix, name = module.weight, "weight"
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            matrix, name = module.in_proj_weight, "in_proj_weight"  # q, k, v stacked; out_proj is a Linear
        else:
            continue
        if matrix.requires_grad and id(matrix) not in excluded:
            params.setdefault(id(matrix), prefix + name)  # a shared weight once
    return params


def split_muon_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float, **muon_kwargs: Any) -> torch.optim.Muon:
    """
    Take the hidden `nn.Linear` weights (`muon_parameter_names`) out of `optimizer` and return a
    `torch.optim.Muon` that trains them; step both as one with [`CombinedOptimizer`]. Each moved weight keeps
    its group's `weight_decay` (decoupled in both AdamW and Muon); Adam-type options (betas, eps) stay behind.

    Must run before the optimizer's first step. Measured (benchmarks/results/muon_cpu-full.md): Muon for the
    hidden matrices with AdamW + TrAct for the first layer beat both Muon alone and AdamW + TrAct on the
    benchmark ViT at 2 and 8 epochs, and was level with Muon alone at 16.

    Args:
        optimizer (`torch.optim.Optimizer`): A freshly built optimizer over all the model's parameters.
        model (`nn.Module`): The model.
        lr (`float`): Muon's learning rate (it lives on its own scale: e.g. 0.01-0.02 where AdamW takes 1e-3).
        muon_kwargs: Other `torch.optim.Muon` options (`momentum`, `nesterov`, `ns_steps`, `adjust_lr_fn`, ...).

    Returns:
        `torch.optim.Muon`: The new optimizer, over groups named `"muon"`.

    Example:

    ```python
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    >>> optimizer = CombinedOptimizer([optimizer, split_muon_optimizer(optimizer, model, lr=0.01)])
    ```
    """
    model = unwrap_model(model)
    params = _muon_parameters(model)
    if not params:
        raise ValueError(
            "The model has no hidden `nn.Linear` weight for Muon (convolution kernels, embeddings, the first layer "
            "and the output head stay on the main optimizer); train it without `muon_learning_rate`."
        )
    groups, missing = _take_out(optimizer, params, "muon", "split_muon_optimizer")
    if missing:
        raise ValueError(f"The optimizer does not hold the parameters {missing}; build it over all trainable parameters.")
    groups = [{key: group[key] for key in ("params", "weight_decay", "name") if key in group} for group in groups]
    return torch.optim.Muon(groups, lr=lr, **muon_kwargs)


__all__ = ["CombinedOptimizer", "muon_parameter_names", "split_muon_optimizer", "split_tract_param_groups"]
