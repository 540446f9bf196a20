"""Trainer integration: `TrActTrainingArguments`, `TrActTrainer`, `TrActCallback`, `tract_model_init`.

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
[`TrActConfig`]'s defaults for an unpatched model; `use_tract=False` removes TrAct from a patched model.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, number_of_arguments
from transformers.training_args import ParallelMode

from .config import SOLVE_DTYPE_CHOICES, TrActConfig, check_lambda, parse_solve_dtype, parse_targets, solve_dtype_name
from .optim import CombinedOptimizer, split_tract_param_groups
from .patching import apply_tract, remove_tract, tract_config_of, tract_layers
from .wrappers import unwrap_model

logger = logging.getLogger(__name__)

TRACT_OPTIMIZER_CHOICES = ("same", "sgd")


# ---------------------------------------------------------------------------------------------- processes


def _launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started, from its environment."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def needs_cpu_ddp(args: TrainingArguments) -> bool:
    """Whether `args` must turn on `use_cpu` to be DDP: several processes launched, no accelerator, no DeepSpeed.

    transformers (5.24) puts such a run in distributed mode only with `use_cpu=True`; without it every process
    trains alone (accelerate's `PartialState` finds no GPU backend and falls back to `DistributedType.NO`).
    """
    if args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return False
    return _launched_processes() > 1 and not _has_accelerator() and not args.deepspeed


def check_distributed_setup(args: TrainingArguments) -> None:
    """Refuse to train independent copies when several processes were launched.

    transformers only warns ("process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED")
    when, e.g., `torchrun --nproc_per_node 2` runs on a machine without GPUs and `use_cpu` is off: every process
    then trains its own model and they all write to the same folder.

    Args:
        args (`TrainingArguments`): The Trainer's arguments (their devices are set up by this call).

    Raises:
        RuntimeError: If several processes were launched but the Trainer is not in distributed mode.
    """
    launched = _launched_processes()
    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if max(launched, group) > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise RuntimeError(
            f"{max(launched, group)} processes were launched, but the Trainer is not in distributed mode "
            f"(parallel_mode={args.parallel_mode.value}, device={args.device}): each process would train its own "
            "copy of the model. On a machine without GPUs pass `--use_cpu True` (DDP over gloo; "
            "`TrActTrainingArguments` does this by itself when no accelerator is found), or launch with "
            "`accelerate launch --config_file examples/accelerate_configs/cpu_multi_process.yaml`; with GPUs, "
            "give each process one (`torchrun --nproc_per_node <number of GPUs>`)."
        )


# ---------------------------------------------------------------------------------------------- arguments


@dataclass
class TrActTrainingArguments(TrainingArguments):
    """
    [`~transformers.TrainingArguments`] plus the TrAct options. Every field can be given on the command line
    (`--tract_lambda 0.2`) or in a JSON / YAML file read by [`~transformers.HfArgumentParser`], and is saved
    with the rest in `training_args.bin`.

    The options that build the [`TrActConfig`] (`tract_lambda`, `tract_target`, `tract_sync_gram`,
    `tract_solve_dtype`) default to `None`, "not given": a model that is already patched keeps its own value,
    an unpatched one gets [`TrActConfig`]'s default. Given values override the model's patch.

    When several processes were launched (torchrun, accelerate launch) on a machine without any accelerator,
    `use_cpu` is turned on (with a log line), so that the run is CPU DDP rather than independent copies.

    Args:
        use_tract (`bool`, *optional*, defaults to `True`):
            Train the first layer with TrAct. `False` gives a plain Trainer run with the same script (what a
            baseline needs); a model patched before is then unpatched, with a warning.
        tract_lambda (`float`, *optional*):
            The regulariser λ of `(AᵀA/N + λI)⁻¹`, finite and > 0. Unset: the model's, else 0.1. The paper uses
            0.1, 0.2 for long runs and 0.05 for short ones, with standardised inputs.
        tract_target (`str`, *optional*):
            Dotted module name(s) of the layer(s) to train with TrAct, comma separated
            (`"vit.embeddings.patch_embeddings.projection"`). Unset: the model's patched layers, else discovery.
        tract_sync_gram (`bool`, *optional*):
            All-reduce the patch Gram across processes so that R processes compute exactly single-process TrAct
            on the global batch. Unset: the model's, else off (each process uses its own batch's Gram).
        tract_solve_dtype (`str`, *optional*):
            dtype of the Cholesky solve: `"auto"` (float64 on GPUs; on CPU float32 when provably accurate),
            `"float32"` or `"float64"`. Unset: the model's, else `"auto"`.
        tract_optimizer (`str`, *optional*, defaults to `"same"`):
            `"same"`: the TrAct layer is updated by the optimizer chosen with `optim`, in its own parameter
            groups when `tract_learning_rate` / `tract_weight_decay` are set. `"sgd"`: the TrAct layer is updated
            by `torch.optim.SGD` while the rest uses `optim` (the paper's ablation); needs `tract_learning_rate`.
        tract_learning_rate (`float`, *optional*):
            Learning rate of the TrAct layer's parameters. `None` uses `learning_rate`. The learning-rate
            schedule scales it like every other group.
        tract_weight_decay (`float`, *optional*):
            Weight decay of the TrAct layer's weight (its bias never decays, as in Trainer). `None` uses
            `weight_decay`.
        tract_momentum (`float`, *optional*, defaults to `0.9`):
            Momentum of the SGD optimizer when `tract_optimizer="sgd"`.
        tract_log_stats (`bool`, *optional*, defaults to `False`):
            Add what TrAct does to the training logs (TensorBoard, W&B, `log_history`), on logging steps only:
            `tract/grad_norm_plain` and `tract/grad_norm` (first-layer weight-gradient norm before and after
            the preconditioner) and `tract/condition_bound` (`1 + tr(G)/(Nλ)`, a bound on the condition number of
            `G/N + λI`), averaged over the step's micro-batches, from the main process. Read by [`TrActTrainer`]
            (a plain `Trainer` with [`TrActCallback`] does not add them).
    """

    use_tract: bool = field(default=True, metadata={"help": "Train the first layer with TrAct."})
    tract_lambda: float | None = field(
        default=None,
        metadata={
            "help": "TrAct regulariser lambda (finite, > 0). Default: the model's patch, else 0.1. "
            "Paper: 0.1 default, 0.2 long runs, 0.05 short runs."
        },
    )
    tract_target: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module name(s) of the layer(s) trained with TrAct. Default: the model's "
            "patched layers, else discover the first layer."
        },
    )
    tract_sync_gram: bool | None = field(
        default=None,
        metadata={
            "help": "All-reduce the patch Gram across processes (exact single-process TrAct on the global "
            "batch). Default: the model's patch, else off.",
            # `--tract_sync_gram` alone means True, as for plain bool fields (HfArgumentParser reads these keys).
            "nargs": "?",
            "const": True,
        },
    )
    tract_solve_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of TrAct's Cholesky solve: auto (float64 on GPUs, float32 on CPU when provably "
            "accurate), float32 or float64. Default: the model's patch, else auto.",
            "choices": list(SOLVE_DTYPE_CHOICES),
        },
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
    tract_log_stats: bool = field(
        default=False,
        metadata={
            "help": "Log the first layer's plain and preconditioned gradient norms and the Gram's condition "
            "bound at logging steps (tract/grad_norm_plain, tract/grad_norm, tract/condition_bound)."
        },
    )

    def __post_init__(self):
        self._normalise_tract_options()
        if needs_cpu_ddp(self):
            # Without this, transformers trains one independent copy per process (it only logs a warning).
            (logger.warning if os.environ.get("RANK", "0") == "0" else logger.debug)(
                "%d processes were launched and this machine has no GPU/accelerator: training with CPU DDP "
                "(`use_cpu=True`, gloo). Pass `--use_cpu True` to say so explicitly.",
                _launched_processes(),
            )
            self.use_cpu = True
        super().__post_init__()
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

    def _normalise_tract_options(self) -> None:
        # The rules are TrActConfig's (hf_tract/config.py); only the names in the messages differ. Values are
        # stored in their command-line form, so that they round-trip through argv and JSON.
        if self.tract_lambda is not None:
            self.tract_lambda = check_lambda(self.tract_lambda, "tract_lambda")
        if self.tract_target is not None:
            try:
                self.tract_target = ",".join(parse_targets(self.tract_target))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"`tract_target`: {exc}") from None
        if self.tract_sync_gram is not None and not isinstance(self.tract_sync_gram, bool):
            raise TypeError(f"`tract_sync_gram` must be True, False or unset, got {self.tract_sync_gram!r}.")
        if self.tract_solve_dtype is not None:
            try:
                self.tract_solve_dtype = solve_dtype_name(parse_solve_dtype(self.tract_solve_dtype))
            except ValueError as exc:
                raise ValueError(f"`tract_solve_dtype`: {exc}") from None

    @property
    def tract_options(self) -> dict[str, Any]:
        """The TrAct options given (not `None`), as [`TrActConfig`] field names: what overrides the model's patch."""
        options = {
            "lambda_": self.tract_lambda,
            "targets": self.tract_target,
            "sync_gram": self.tract_sync_gram,
            "solve_dtype": self.tract_solve_dtype,
        }
        return {key: value for key, value in options.items() if value is not None}

    @property
    def tract_config(self) -> TrActConfig:
        """The [`TrActConfig`] these arguments give an unpatched model (defaults where unset)."""
        return TrActConfig(**self.tract_options)

    @property
    def tract_targets(self) -> tuple[str, ...] | None:
        """`tract_target` as a tuple of names, or `None` (discover)."""
        return parse_targets(self.tract_target)


# ---------------------------------------------------------------------------------------------- precedence


def _describe_changes(old: TrActConfig, new: TrActConfig) -> str:
    before, after = old.to_dict(), new.to_dict()
    return ", ".join(f"{key} {before[key]} -> {after[key]}" for key in after if before[key] != after[key])


def prepare_model_for_training(
    model: nn.Module, use_tract: bool, options: dict[str, Any], source: str = "training arguments"
) -> nn.Module:
    """Patch, re-patch or unpatch `model` for a run, by the precedence rules of the Trainer integration.

    - `use_tract=False`: a patched model is unpatched (with a warning), so the run is a plain baseline.
    - An unpatched model is patched with `TrActConfig(**options)` (defaults where an option is unset).
    - A patched model keeps its [`TrActConfig`] except for the options given, which override it (logged).
      New targets replace the patched layers.

    Args:
        model (`nn.Module`): The bare model (not wrapped yet).
        use_tract (`bool`): Whether the run trains with TrAct.
        options (`dict`): The explicitly given options, as [`TrActConfig`] field names.
        source (`str`, *optional*): What gave the options, for the log messages.

    Returns:
        `nn.Module`: `model` itself.
    """
    current = tract_config_of(model)
    if not use_tract:
        if current is not None:
            warnings.warn(
                f"use_tract=False, but the model is patched with TrAct ({current.describe()}, layers "
                f"{', '.join(current.targets)}): removing TrAct so that this run is a plain baseline.",
                stacklevel=3,
            )
            remove_tract(model)
        return model
    if current is None:
        return apply_tract(model, TrActConfig(**options))
    wanted = current.replace(**options)
    if "targets" in options and set(wanted.targets) != set(current.targets):
        logger.warning(
            "TrAct: %s move TrAct from %s to %s.", source, ", ".join(current.targets), ", ".join(wanted.targets)
        )
        remove_tract(model)
        return apply_tract(model, wanted)
    wanted = wanted.replace(targets=current.targets)
    if wanted != current:
        logger.warning(
            "TrAct: %s override the options the model was patched with: %s.", source, _describe_changes(current, wanted)
        )
        apply_tract(model, wanted)
    else:
        logger.info("TrAct: training with the model's patch (%s) on %s.", current.describe(), ", ".join(current.targets))
    return model


def _check_plain_trainer_args(args: TrainingArguments) -> None:
    if not isinstance(args, TrActTrainingArguments):
        raise TypeError(
            "TrActTrainer needs `TrActTrainingArguments` (a `TrainingArguments` subclass with the `tract_*` "
            f"options), got {type(args).__name__}. Replace `TrainingArguments(...)` by `TrActTrainingArguments(...)`."
        )


# ---------------------------------------------------------------------------------------------- statistics


class _TrActStatsCallback(TrainerCallback):
    """Turns on the TrAct layers' statistics for the steps the Trainer will log (`tract_log_stats`).

    The layers then append detached 0-d tensors in their backward pass; nothing is read on the host until
    [`TrActTrainer.log`] writes the logs, so other steps gain no synchronisation and no extra kernel.
    """

    def __init__(self, trainer: "TrActTrainer"):
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


# ---------------------------------------------------------------------------------------------- Trainer


def _resume_with_converted_legacy_keys(trainer: Trainer, checkpoint: str, model: nn.Module) -> bool:
    """Work around transformers 5.24 resuming with the initial weights of renamed tensors.

    transformers 5 saves some models (ViT among them) under legacy key names and converts them back only in
    `from_pretrained`; `Trainer._load_from_checkpoint` (5.24) loads the raw state dict instead, so resuming
    keeps the *initial* weights of every renamed tensor and only logs the missing/unexpected keys.
    `tests/test_trainer.py::test_transformers_still_needs_the_legacy_key_workaround` fails once transformers
    converts the keys itself: then remove this function.

    Args:
        trainer (`Trainer`): The Trainer that resumes.
        checkpoint (`str`): The checkpoint folder.
        model (`nn.Module`): The model to load into.

    Returns:
        `bool`: Whether the weights were loaded here (`False`: let Trainer load them).
    """
    from transformers import PreTrainedModel

    weights = os.path.join(checkpoint, "model.safetensors")
    plain_path = not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and isinstance(model, PreTrainedModel)
    if not (plain_path and os.path.isfile(weights)):
        return False
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        saved_keys = set(f.keys())
    if saved_keys == set(model.state_dict()):
        return False
    loaded = type(model).from_pretrained(checkpoint, config=model.config, dtype=model.dtype, use_safetensors=True)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"Could not load the weights of {checkpoint} into the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}."
        )
    return True


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
        _check_plain_trainer_args(args)
        check_distributed_setup(args)
        if model is not None:
            # Before Trainer.__init__: it may already move the model, and a model it is given wrapped
            # (compiled, DDP) can only be rejected clearly here.
            self._prepare_model(model, args)
        super().__init__(model=model, args=args, **kwargs)
        if args.tract_log_stats:
            self.add_callback(_TrActStatsCallback(self))

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
        `tract_learning_rate` / `tract_weight_decay` are set, or in a separate SGD optimizer combined with the
        main one when `tract_optimizer="sgd"`.
        """
        if self.optimizer is not None:
            return super().create_optimizer(model)
        args = self.args
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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's `log`, with the TrAct statistics added to training logs when `tract_log_stats` is on."""
        if self.args.tract_log_stats and "loss" in logs:
            logs.update(collect_tract_stats(self.model))
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's checkpoint loading, through [`_resume_with_converted_legacy_keys`] (transformers 5.24 bug)."""
        target = self.model if model is None else model
        if not _resume_with_converted_legacy_keys(self, resume_from_checkpoint, target):
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


# ---------------------------------------------------------------------------------------------- other Trainers


def _options(config: TrActConfig | None, **options: Any) -> dict[str, Any]:
    """`config`'s fields overridden by the given keyword options (`None` = not given); a number is λ."""
    if isinstance(config, (int, float)) and not isinstance(config, bool) and options.get("lambda_") is None:
        config, options["lambda_"] = None, config
    if config is not None and not isinstance(config, TrActConfig):
        raise TypeError(f"config must be a TrActConfig (or use the keyword options); got {config!r}.")
    merged = {}
    if config is not None:
        merged = {"lambda_": config.lambda_, "targets": config.targets, "sync_gram": config.sync_gram}
        merged["solve_dtype"] = config.solve_dtype
        merged = {key: value for key, value in merged.items() if value is not None}
    merged.update({key: value for key, value in options.items() if value is not None})
    TrActConfig(**merged)  # validated now, not when training starts
    return merged


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
        self.options = _options(config, lambda_=lambda_, targets=target, sync_gram=sync_gram, solve_dtype=solve_dtype)

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
    options = _options(config, lambda_=lambda_, targets=target, sync_gram=sync_gram, solve_dtype=solve_dtype)

    def patch(model: nn.Module) -> nn.Module:
        return apply_tract(model, TrActConfig(**options))

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


__all__ = [
    "TrActTrainingArguments",
    "TrActTrainer",
    "TrActCallback",
    "CombinedOptimizer",
    "split_tract_param_groups",
    "tract_model_init",
    "prepare_model_for_training",
    "check_distributed_setup",
    "collect_tract_stats",
]
