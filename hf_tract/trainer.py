"""Trainer integration: `TrActTrainingArguments`, `TrActTrainer`, `TrActCallback`, `tract_model_init`.

TrAct only changes how the first layer's weight gradient is computed, so the integration is
about *when* the layer is patched: it must be patched on the bare model, before
`accelerate` wraps it (DDP / FSDP / `torch.compile`) inside `Trainer.train()`. Three routes:

- [`TrActTrainer`] (recommended): patches the model given to `__init__`, every model built by
  `model_init` (also the ones `train()` builds for a hyper-parameter search trial) and re-syncs
  λ / targets from `args` in `create_optimizer`, the last public hook before the model is wrapped.
- [`TrActCallback`] for code that already subclasses `Trainer`: patches in `on_init_end`, which
  fires at the end of `Trainer.__init__`, before anything is wrapped. `on_train_begin` would be
  too late (it fires after `accelerator.prepare`), so the callback only *checks* there.
- [`tract_model_init`] wraps a `model_init` function for the same users when they use
  `model_init`: `Trainer.train()` rebuilds the model there and callbacks never see the new model
  before it is wrapped.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from .patching import apply_tract, is_tract_applied, tract_layers
from .wrappers import is_wrapped

logger = logging.getLogger(__name__)

TRACT_OPTIMIZER_CHOICES = ("same", "sgd")


def _parse_targets(tract_target: str | list[str] | None) -> str | list[str] | None:
    """`"a.b, c.d"` -> `["a.b", "c.d"]`; one name stays a string; empty / None -> None (discover)."""
    if tract_target is None:
        return None
    names = tract_target if isinstance(tract_target, list) else tract_target.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        return None
    return names[0] if len(names) == 1 else names


@dataclass
class TrActTrainingArguments(TrainingArguments):
    """
    [`~transformers.TrainingArguments`] plus the TrAct options. Every field can be given on the
    command line (`--tract_lambda 0.2`) or in a JSON / YAML file read by
    [`~transformers.HfArgumentParser`], and is saved with the rest in `training_args.bin`.

    Args:
        use_tract (`bool`, defaults to `True`):
            Train the first layer with TrAct. `False` gives a plain Trainer run with the same
            script, which is what a baseline needs.
        tract_lambda (`float`, defaults to `0.1`):
            The regulariser λ of `(AᵀA/N + λI)⁻¹`. The paper recommends 0.1, 0.2 for long runs
            and 0.05 for short ones, with standardised inputs.
        tract_target (`str`, *optional*):
            Dotted module name(s) of the layer(s) to train with TrAct, comma separated
            (`"vit.embeddings.patch_embeddings.projection"`). `None` discovers the first layer.
        tract_sync_gram (`bool`, defaults to `False`):
            All-reduce the patch Gram matrix across processes so that R processes compute
            exactly single-process TrAct on the global batch. Off: each process uses its own
            batch's Gram (like BatchNorm statistics).
        tract_optimizer (`str`, defaults to `"same"`):
            `"same"`: the TrAct layer is updated by the optimizer chosen with `optim`, in its own
            parameter groups when `tract_learning_rate` / `tract_weight_decay` are set.
            `"sgd"`: the TrAct layer is updated by `torch.optim.SGD` while the rest uses `optim`
            (the paper's ablation); needs `tract_learning_rate`.
        tract_learning_rate (`float`, *optional*):
            Learning rate of the TrAct layer's parameters. `None` uses `learning_rate`. The
            learning-rate schedule scales it like every other group.
        tract_weight_decay (`float`, *optional*):
            Weight decay of the TrAct layer's weight (its bias never decays, as in Trainer).
            `None` uses `weight_decay`.
        tract_momentum (`float`, defaults to `0.9`):
            Momentum of the SGD optimizer when `tract_optimizer="sgd"`.
    """

    use_tract: bool = field(default=True, metadata={"help": "Train the first layer with TrAct."})
    tract_lambda: float = field(
        default=0.1,
        metadata={"help": "TrAct regulariser lambda (> 0). Paper: 0.1 default, 0.2 long runs, 0.05 short runs."},
    )
    tract_target: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module name(s) of the layer(s) trained with TrAct; default: discover."},
    )
    tract_sync_gram: bool = field(
        default=False,
        metadata={"help": "All-reduce the patch Gram across processes (exact single-process TrAct on the global batch)."},
    )
    tract_optimizer: str = field(
        default="same",
        metadata={
            "help": "Optimizer of the TrAct layer: 'same' (the `optim` optimizer) or 'sgd' (paper ablation).",
            "choices": list(TRACT_OPTIMIZER_CHOICES),
        },
    )
    tract_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the TrAct layer (default: learning_rate)."}
    )
    tract_weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay of the TrAct layer's weight (default: weight_decay)."}
    )
    tract_momentum: float = field(default=0.9, metadata={"help": "SGD momentum when tract_optimizer='sgd'."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.tract_lambda, bool) or not isinstance(self.tract_lambda, (int, float)):
            raise TypeError(f"`tract_lambda` must be a float, got {self.tract_lambda!r}.")
        self.tract_lambda = float(self.tract_lambda)
        # NaN fails `> 0` as well, so it is caught here too.
        if not self.tract_lambda > 0:
            raise ValueError(
                f"`tract_lambda` must be > 0 (it keeps AᵀA/N + λI invertible), got {self.tract_lambda}; "
                "the paper uses 0.1 (0.2 for long runs, 0.05 for short ones). Use `use_tract=False` to disable TrAct."
            )
        if self.tract_target is not None and not isinstance(self.tract_target, str):
            if isinstance(self.tract_target, (list, tuple)) and all(isinstance(t, str) for t in self.tract_target):
                # A list from Python / YAML is stored in the CLI form so that it round-trips through JSON and argv.
                self.tract_target = ",".join(self.tract_target)
            else:
                raise TypeError(f"`tract_target` must be a module name or a comma-separated list, got {self.tract_target!r}.")
        if self.tract_target is not None and _parse_targets(self.tract_target) is None:
            raise ValueError("`tract_target` is empty; leave it unset (None) to discover the first layer.")
        if self.tract_optimizer not in TRACT_OPTIMIZER_CHOICES:
            raise ValueError(
                f"`tract_optimizer` must be one of {TRACT_OPTIMIZER_CHOICES}, got {self.tract_optimizer!r}."
            )
        if self.tract_learning_rate is not None and not self.tract_learning_rate > 0:
            raise ValueError(f"`tract_learning_rate` must be > 0 or unset, got {self.tract_learning_rate}.")
        if self.tract_weight_decay is not None and not self.tract_weight_decay >= 0:
            raise ValueError(f"`tract_weight_decay` must be >= 0 or unset, got {self.tract_weight_decay}.")
        if not 0 <= self.tract_momentum < 1:
            raise ValueError(f"`tract_momentum` must be in [0, 1), got {self.tract_momentum}.")
        if self.tract_optimizer == "sgd" and self.tract_learning_rate is None:
            # SGD and Adam-type learning rates live on different scales: silently reusing
            # `learning_rate` would train the first layer with a meaningless step size.
            raise ValueError(
                "`tract_optimizer='sgd'` needs an explicit `tract_learning_rate` (SGD step sizes are not "
                "comparable to those of `optim`); set e.g. `--tract_learning_rate <lr>`."
            )
        if not self.use_tract and (
            self.tract_optimizer != "same" or self.tract_learning_rate is not None or self.tract_weight_decay is not None
        ):
            logger.warning(
                "`use_tract=False`: `tract_optimizer`, `tract_learning_rate` and `tract_weight_decay` are ignored."
            )

    @property
    def tract_targets(self) -> str | list[str] | None:
        """`tract_target` in the form `apply_tract` takes (a name, a list of names, or `None`)."""
        return _parse_targets(self.tract_target)


def _check_plain_trainer_args(args: TrainingArguments) -> None:
    if not isinstance(args, TrActTrainingArguments):
        raise TypeError(
            "TrActTrainer needs `TrActTrainingArguments` (a `TrainingArguments` subclass with the `tract_*` "
            f"options), got {type(args).__name__}. Replace `TrainingArguments(...)` by `TrActTrainingArguments(...)`."
        )


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


class TrActTrainer(Trainer):
    """
    A [`~transformers.Trainer`] that trains the model's first layer with TrAct.

    The model is patched with [`apply_tract`] (λ, targets and `sync_gram` from
    [`TrActTrainingArguments`]) when the Trainer is built, every time `model_init` builds a model
    (also inside `train()`), and again in `create_optimizer` (idempotent: it picks up options that a
    hyper-parameter search trial set on `args`). All of this happens before `accelerate` wraps the
    model. Saved weights, `state_dict` keys and the forward pass are those of the plain model.

    `save_model` also writes or updates the model card (`README.md`, `tract` tag, λ, layer names,
    citation) without touching the rest of the card; `push_to_hub` writes the Trainer's card and
    adds the TrAct section before uploading.

    Example:

    ```python
    >>> from hf_tract import TrActTrainer, TrActTrainingArguments
    >>> args = TrActTrainingArguments(output_dir="out", tract_lambda=0.1, bf16=True)
    >>> trainer = TrActTrainer(model=model, args=args, train_dataset=train_ds)
    >>> trainer.train()
    >>> trainer.save_model()
    ```
    """

    def __init__(self, model: nn.Module | None = None, args: TrActTrainingArguments | None = None, **kwargs):
        if args is None:
            args = TrActTrainingArguments(output_dir="tmp_trainer")
        _check_plain_trainer_args(args)
        if model is not None and args.use_tract:
            # Before Trainer.__init__: it may already move the model, and a model it is given wrapped
            # (compiled, DDP) can only be rejected clearly here.
            self._apply_tract_from_args(model, args)
        super().__init__(model=model, args=args, **kwargs)

    @staticmethod
    def _apply_tract_from_args(model: nn.Module, args: TrActTrainingArguments) -> nn.Module:
        return apply_tract(model, args.tract_lambda, args.tract_targets, sync_gram=args.tract_sync_gram)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Build the model with `model_init` and patch it with TrAct before Trainer places or wraps it."""
        model = super().call_model_init(trial)
        if self.args.use_tract:
            self._apply_tract_from_args(model, self.args)
        return model

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """
        Build the optimizer as Trainer does, with the TrAct layer's parameters in their own groups
        when `tract_learning_rate` / `tract_weight_decay` are set, or in a separate SGD optimizer
        combined with the main one when `tract_optimizer="sgd"`.
        """
        if self.optimizer is not None:
            return super().create_optimizer(model)
        args = self.args
        if args.use_tract and not is_wrapped(self.model):
            # Re-sync with `args` (idempotent): a hyper-parameter search trial sets its values on
            # `args` after `model_init` ran.
            self._apply_tract_from_args(self.model, args)
        optimizer = super().create_optimizer(model)
        if not args.use_tract:
            return optimizer
        custom_groups = args.tract_learning_rate is not None or args.tract_weight_decay is not None
        if args.tract_optimizer == "same" and not custom_groups:
            return optimizer
        opt_model = self.model if model is None else model
        tract_groups = split_tract_param_groups(
            optimizer, opt_model, learning_rate=args.tract_learning_rate, weight_decay=args.tract_weight_decay
        )
        if args.tract_optimizer == "same":
            for group in tract_groups:
                optimizer.add_param_group(group)
        else:
            for group in tract_groups:
                # Only the options SGD knows survive; betas / eps of Adam-type groups would make SGD raise.
                for key in list(group):
                    if key not in ("params", "lr", "weight_decay", "name"):
                        del group[key]
            sgd = torch.optim.SGD(tract_groups, lr=args.tract_learning_rate, momentum=args.tract_momentum)
            optimizer = CombinedOptimizer([optimizer, sgd])
        self.optimizer = optimizer
        return optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """
        Load the model weights of a checkpoint, also for models whose saved keys differ from their
        module names.

        transformers 5 saves some models (ViT among them) under legacy key names and converts them
        back only in `from_pretrained`; `Trainer._load_from_checkpoint` (5.24) loads the raw state
        dict instead, so resuming silently keeps the *initial* weights of every renamed tensor (it
        only logs missing/unexpected keys). This loads such checkpoints through `from_pretrained`.
        """
        from transformers import PreTrainedModel

        target = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        plain_path = not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and isinstance(target, PreTrainedModel)
        if plain_path and os.path.isfile(weights):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                saved_keys = set(f.keys())
            if saved_keys != set(target.state_dict()):
                loaded = type(target).from_pretrained(
                    resume_from_checkpoint, config=target.config, dtype=target.dtype, use_safetensors=True
                )
                result = target.load_state_dict(loaded.state_dict(), strict=False)
                if result.missing_keys or result.unexpected_keys:
                    raise RuntimeError(
                        f"Could not load the weights of {resume_from_checkpoint} into the model: missing "
                        f"{result.missing_keys}, unexpected {result.unexpected_keys}."
                    )
                return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _tract_unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        Save the plain weights as [`~transformers.Trainer.save_model`] does, then create or update the
        TrAct section of `README.md` in `output_dir` (only when called by the user, not for
        checkpoints, and only on the process that saves).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            self._update_tract_card(output_dir if output_dir is not None else self.args.output_dir)

    def _update_tract_card(self, output_dir: str) -> None:
        # A `use_tract=False` baseline run gets the plain Trainer card, without a TrAct section.
        model = self._tract_unwrapped_model()
        if not is_tract_applied(model):
            return
        from .hub import create_or_update_model_card

        create_or_update_model_card(output_dir, model=model, args=self.args)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """
        Write the Trainer's model card (hyper-parameters, results) and add the TrAct section and tag.

        Trainer rewrites `README.md` from scratch here (as plain Trainer does); the TrAct section is
        then inserted between its markers, so calling this repeatedly yields one section.
        """
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self._update_tract_card(self.args.output_dir)


class TrActCallback(TrainerCallback):
    """
    Patch the model of any [`~transformers.Trainer`] (also a user's own subclass) with TrAct.

    The patch is applied in `on_init_end`, which runs at the end of `Trainer.__init__`, before
    `train()` lets accelerate wrap the model. Pass the callback to the constructor
    (`Trainer(..., callbacks=[TrActCallback()])`): a callback added later with `add_callback`
    misses `on_init_end`, and its `on_train_begin` comes after the wrapping, so it raises there
    instead of training silently without TrAct.

    Callbacks never see models built by `model_init` inside `train()`; wrap the function with
    [`tract_model_init`] for that path (or use [`TrActTrainer`]).

    Args:
        lambda_ (`float`, *optional*): λ. `None` reads `args.tract_lambda` (default 0.1).
        target (`str` or `list[str]`, *optional*): Layer name(s). `None` reads `args.tract_target`
            or discovers the first layer.
        sync_gram (`bool`, *optional*): `None` reads `args.tract_sync_gram` (default `False`).
    """

    def __init__(
        self, lambda_: float | None = None, target: str | list[str] | None = None, sync_gram: bool | None = None
    ):
        self.lambda_ = lambda_
        self.target = target
        self.sync_gram = sync_gram

    def _options(self, args: TrainingArguments) -> tuple[float, str | list[str] | None, bool]:
        lambda_ = self.lambda_ if self.lambda_ is not None else getattr(args, "tract_lambda", 0.1)
        target = self.target if self.target is not None else _parse_targets(getattr(args, "tract_target", None))
        sync_gram = self.sync_gram if self.sync_gram is not None else getattr(args, "tract_sync_gram", False)
        return lambda_, target, sync_gram

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(args, "use_tract", True):
            return
        lambda_, target, sync_gram = self._options(args)
        apply_tract(model, lambda_, target, sync_gram=sync_gram)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(args, "use_tract", True):
            return
        if not is_tract_applied(model):
            raise RuntimeError(
                "TrActCallback: the model is not patched with TrAct at the start of training. Pass the callback "
                "to the Trainer constructor (`callbacks=[TrActCallback()]`) so it patches the model before "
                "accelerate wraps it, or call `apply_tract(model)` before building the Trainer."
            )


def tract_model_init(
    model_init: Callable[..., nn.Module],
    lambda_: float = 0.1,
    target: str | list[str] | None = None,
    *,
    sync_gram: bool = False,
) -> Callable[..., nn.Module]:
    """
    Wrap a Trainer `model_init` so that every model it builds is patched with TrAct.

    For users of a plain or custom `Trainer` with `model_init` (hyper-parameter search): Trainer
    rebuilds the model inside `train()`, before wrapping it, by calling this function.

    Args:
        model_init (`Callable`): The original `model_init`, with zero or one (`trial`) argument.
        lambda_ (`float`, defaults to 0.1): λ.
        target (`str` or `list[str]`, *optional*): Layer name(s); `None` discovers the first layer.
        sync_gram (`bool`, defaults to `False`): All-reduce the Gram across processes.

    Returns:
        `Callable`: A `model_init` with the same number of arguments.
    """
    # Trainer dispatches on the number of arguments (0 or 1), so the wrapper must keep it.
    if number_of_arguments(model_init) == 0:

        @functools.wraps(model_init)
        def wrapped():
            return apply_tract(model_init(), lambda_, target, sync_gram=sync_gram)

    else:

        @functools.wraps(model_init)
        def wrapped(trial):
            return apply_tract(model_init(trial), lambda_, target, sync_gram=sync_gram)

    # `functools.wraps` sets `__wrapped__`, which `inspect.signature` would follow to the original.
    wrapped.__signature__ = inspect.signature(wrapped, follow_wrapped=False)
    return wrapped


__all__ = [
    "TrActTrainingArguments",
    "TrActTrainer",
    "TrActCallback",
    "CombinedOptimizer",
    "split_tract_param_groups",
    "tract_model_init",
]
