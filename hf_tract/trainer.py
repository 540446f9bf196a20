"""Trainer integration: `TrActTrainer`, `TrActCallback`, `tract_model_init`.

TrAct only changes how the first layer's weight gradient is computed, so the integration is about *when*
and *with which options* the layer is patched: on the bare model, before `accelerate` wraps it (DDP / FSDP /
`torch.compile`) inside `Trainer.train()`, once per model. Three routes:

- [`TrActTrainer`] (recommended): patches the model given to `__init__` and every model built by
  `model_init` (for a hyper-parameter search trial: once the trial's values are on `args`).
- [`TrActCallback`] for code that already subclasses `Trainer`: patches in `on_init_end`, at the end of
  `Trainer.__init__`, before anything is wrapped; `on_train_begin` comes after the wrapping, so it only checks.
- [`tract_model_init`] wraps a `model_init` function for the same users when they use `model_init`.

Which options win (README "Which TrAct options a run uses"): the `tract_*` training arguments that are
given override what the model carries (and the log says so); those left unset keep the model's patch, or
[`TrActConfig`]'s defaults for an unpatched model; `use_tract=False` removes TrAct from a patched model. The rules
are [`hf_tract.patching.prepare_model_for_training`]; the arguments are [`TrActTrainingArguments`]
(`training_args.py`), the launcher checks `environment.py`, the logged statistics `stats.py`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from .compat import resume_with_converted_legacy_keys
from .config import TrActConfig
from .environment import check_distributed_setup
from .optim import CombinedOptimizer, split_muon_optimizer, split_tract_param_groups
from .patching import apply_tract, prepare_model_for_training, tract_config_of
from .stats import TrActStatsCallback, collect_tract_stats
from .training_args import TrActTrainingArguments
from .wrappers import unwrap_model


logger = logging.getLogger(__name__)


def _require_tract_training_arguments(args: TrainingArguments) -> None:
    if not isinstance(args, TrActTrainingArguments):
        raise TypeError(
            "TrActTrainer needs `TrActTrainingArguments` (a `TrainingArguments` subclass with the `tract_*` "
            f"options), got {type(args).__name__}. Replace `TrainingArguments(...)` by `TrActTrainingArguments(...)`."
        )


class TrActTrainer(Trainer):
    """
    A [`~transformers.Trainer`] that trains the model's first layer with TrAct.

    The model is patched once, before `accelerate` wraps it: the model given to `__init__`, and every model
    `model_init` builds (in `__init__`, in `train()`, and for a hyper-parameter search trial once the trial's
    values are on `args`). The [`TrActConfig`] used is the model's own patch with the `tract_*` arguments that
    are given on top (see [`prepare_model_for_training`]). Saved weights, `state_dict` keys and the forward pass
    are those of the plain model.

    `save_model` also writes or updates the model card (`README.md`, `tract` tag, λ, layer names, citation)
    without touching the rest of the card; `push_to_hub` writes the Trainer's card and adds the TrAct section
    before uploading.

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
        _require_tract_training_arguments(args)
        check_distributed_setup(args)
        if model is not None:
            # Before Trainer.__init__: it may already move the model, and a model it is given wrapped
            # (compiled, DDP) can only be rejected clearly here.
            self._prepare_model(model, args)
        super().__init__(model=model, args=args, **kwargs)
        if args.muon_learning_rate is not None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                # The launcher can turn these on without `args.fsdp` / `args.deepspeed` (accelerate config).
                raise ValueError(
                    "`muon_learning_rate` works in single-process and DDP runs, not with FSDP or DeepSpeed: leave it unset."
                )
            if self.optimizer is not None:
                logger.warning("An optimizer was passed with `optimizers=`: `muon_learning_rate` is ignored.")
        if args.tract_log_stats:
            self.add_callback(TrActStatsCallback(self))

    @staticmethod
    def _prepare_model(model: nn.Module, args: TrActTrainingArguments) -> nn.Module:
        return prepare_model_for_training(model, args.use_tract, args.tract_options)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Build the model with `model_init` and patch it with TrAct before Trainer places or wraps it.

        For a hyper-parameter search trial the patch waits for `_hp_search_setup`, which sets the trial's
        values on `args` right after this call.
        """
        model = super().call_model_init(trial)
        if trial is None or self.hp_search_backend is None:
            self._prepare_model(model, self.args)
        return model

    def _hp_search_setup(self, trial: Any) -> None:
        super()._hp_search_setup(trial)
        if trial is not None and self.hp_search_backend is not None and self.model is not None:
            self._prepare_model(self.model, self.args)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """
        Build the optimizer as Trainer does, with the TrAct layer's parameters in their own groups when
        `tract_learning_rate` / `tract_weight_decay` are set, or in a separate SGD optimizer when
        `tract_optimizer="sgd"`, and the hidden Linear weights in a `torch.optim.Muon` when `muon_learning_rate`
        is set; several optimizers are stepped as one [`~hf_tract.optim.CombinedOptimizer`].
        """
        if self.optimizer is not None:
            return super().create_optimizer(model)
        args = self.args
        optimizer = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        extra = []
        if args.muon_learning_rate is not None:
            muon = split_muon_optimizer(optimizer, opt_model, args.muon_learning_rate)
            extra.append(muon)
            logger.info(
                "Muon (lr %g) trains %d hidden Linear weights; the other parameters use `%s`.",
                args.muon_learning_rate, sum(len(g["params"]) for g in muon.param_groups), getattr(args.optim, "value", args.optim),
            )
        custom_groups = args.tract_learning_rate is not None or args.tract_weight_decay is not None
        if args.use_tract and (args.tract_optimizer != "same" or custom_groups):
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
                extra.insert(0, torch.optim.SGD(tract_groups, lr=args.tract_learning_rate, momentum=args.tract_momentum))
        if extra:
            optimizer = CombinedOptimizer([optimizer, *extra])
        self.optimizer = optimizer
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's `log`, with the TrAct statistics added to training logs when `tract_log_stats` is on."""
        if self.args.tract_log_stats and "loss" in logs:
            logs.update(collect_tract_stats(self.model))
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's checkpoint loading, through [`resume_with_converted_legacy_keys`] (transformers 5.24 bug)."""
        target = self.model if model is None else model
        if not resume_with_converted_legacy_keys(self, resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        Save the plain weights as [`~transformers.Trainer.save_model`] does, then create or update the TrAct
        section of `README.md` in `output_dir` (only when called by the user, not for checkpoints, and only on
        the process that saves).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            self._update_tract_card(output_dir if output_dir is not None else self.args.output_dir)

    def _update_tract_card(self, output_dir: str) -> None:
        # A `use_tract=False` baseline run gets the plain Trainer card, without a TrAct section.
        model = unwrap_model(self.model)
        if tract_config_of(model) is None:
            return
        from .hub import create_or_update_model_card

        create_or_update_model_card(output_dir, model=model, args=self.args)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """
        Write the Trainer's model card (hyper-parameters, results) and add the TrAct section and tag.

        Trainer rewrites `README.md` from scratch here (as plain Trainer does); the TrAct section is then
        inserted between its markers, so calling this repeatedly yields one section. Only the main process
        writes.
        """
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self._update_tract_card(self.args.output_dir)


class TrActCallback(TrainerCallback):
    """
    Patch the model of any [`~transformers.Trainer`] (also a user's own subclass) with TrAct.

    The patch is applied in `on_init_end`, which runs at the end of `Trainer.__init__`, before `train()` lets
    accelerate wrap the model. Pass the callback to the constructor (`Trainer(..., callbacks=[TrActCallback()])`):
    a callback added later with `add_callback` misses `on_init_end`, and its `on_train_begin` comes after the
    wrapping, so it raises there instead of training silently without TrAct.

    Options: those given to the callback, then the `tract_*` fields of `args` when they are
    [`TrActTrainingArguments`], override the model's own patch; unset ones keep it (or [`TrActConfig`]'s defaults).

    Callbacks never see models built by `model_init` inside `train()`; wrap the function with [`tract_model_init`]
    for that path (or use [`TrActTrainer`]).

    Args:
        config ([`TrActConfig`], *optional*): All options at once.
        lambda_ (`float`, *optional*): λ.
        target (`str` or `list[str]`, *optional*): Layer name(s).
        sync_gram (`bool`, *optional*): All-reduce the Gram across processes.
        solve_dtype (`torch.dtype` or `str`, *optional*): dtype of the solve.
    """

    def __init__(
        self,
        config: TrActConfig | None = None,
        *,
        lambda_: float | None = None,
        target: str | list[str] | None = None,
        sync_gram: bool | None = None,
        solve_dtype: Any = None,
    ):
        self.options = TrActConfig.given(config, lambda_=lambda_, targets=target, sync_gram=sync_gram, solve_dtype=solve_dtype)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        check_distributed_setup(args)
        options = dict(getattr(args, "tract_options", {}))
        options.update(self.options)
        prepare_model_for_training(model, getattr(args, "use_tract", True), options, source="TrActCallback options")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not getattr(args, "use_tract", True):
            return
        if tract_config_of(model) is None:
            raise RuntimeError(
                "TrActCallback: the model is not patched with TrAct at the start of training. Pass the callback "
                "to the Trainer constructor (`callbacks=[TrActCallback()]`) so it patches the model before "
                "accelerate wraps it, or call `apply_tract(model)` before building the Trainer."
            )


def tract_model_init(
    model_init: Callable[..., nn.Module],
    config: TrActConfig | None = None,
    *,
    lambda_: float | None = None,
    target: str | list[str] | None = None,
    sync_gram: bool | None = None,
    solve_dtype: Any = None,
) -> Callable[..., nn.Module]:
    """
    Wrap a Trainer `model_init` so that every model it builds is patched with TrAct.

    For users of a plain or custom `Trainer` with `model_init` (hyper-parameter search): Trainer rebuilds the
    model inside `train()`, before wrapping it, by calling this function.

    Args:
        model_init (`Callable`): The original `model_init`, with zero or one (`trial`) argument.
        config ([`TrActConfig`], *optional*): All options at once (a number is read as `lambda_`).
        lambda_ (`float`, *optional*): λ (default 0.1).
        target (`str` or `list[str]`, *optional*): Layer name(s); `None` discovers the first layer.
        sync_gram (`bool`, *optional*): All-reduce the Gram across processes (default off).
        solve_dtype (`torch.dtype` or `str`, *optional*): dtype of the solve (default automatic).

    Returns:
        `Callable`: A `model_init` with the same number of arguments.
    """
    config = TrActConfig(
        **TrActConfig.given(config, lambda_=lambda_, targets=target, sync_gram=sync_gram, solve_dtype=solve_dtype)
    )

    def patch(model: nn.Module) -> nn.Module:
        return apply_tract(model, config)

    # Trainer dispatches on the number of arguments (0 or 1), so the wrapper must keep it.
    if number_of_arguments(model_init) == 0:

        @functools.wraps(model_init)
        def wrapped():
            return patch(model_init())

    else:

        @functools.wraps(model_init)
        def wrapped(trial):
            return patch(model_init(trial))

    # `functools.wraps` sets `__wrapped__`, which `inspect.signature` would follow to the original.
    wrapped.__signature__ = inspect.signature(wrapped, follow_wrapped=False)
    return wrapped


__all__ = ["TrActCallback", "TrActTrainer", "tract_model_init"]
