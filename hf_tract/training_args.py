"""`TrActTrainingArguments`: transformers' `TrainingArguments` plus the TrAct options.

The four options that build a [`TrActConfig`] (`tract_lambda`, `tract_target`, `tract_sync_gram`,
`tract_solve_dtype`) default to `None`, "not given", so that a run can tell a value the user set from a default
(README "Which TrAct options a run uses"); the others choose how the first layer is optimised, whether Muon
trains the hidden Linear weights (`muon_learning_rate`), and what is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .config import SOLVE_DTYPE_CHOICES, TrActConfig, check_lambda, parse_solve_dtype, parse_targets, solve_dtype_name
from .environment import launched_processes, needs_cpu_ddp, process_rank


logger = logging.getLogger(__name__)

TRACT_OPTIMIZER_CHOICES = ("same", "sgd")


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
            `"float32"`, `"float64"` or `"float32_refined"` (float32 plus one float64 refinement step). Unset: the
            model's, else `"auto"`.
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
        muon_learning_rate (`float`, *optional*):
            When set, the hidden `nn.Linear` weights (see [`~hf_tract.optim.muon_parameter_names`]) are trained by
            `torch.optim.Muon` at this learning rate (its own scale: e.g. 0.01-0.02 where AdamW takes 1e-3), and
            the first layer (TrAct), embeddings, norms, biases and the output head by `optim` at
            `learning_rate`. Weight decay and the schedule apply to both. On the benchmark ViT, Muon + TrAct
            beat both Muon alone and AdamW + TrAct at 2 and 8 epochs and was level with Muon alone at 16 (README
            "Does it help?"). Single process or DDP; not with FSDP or DeepSpeed. Works with `use_tract=False`
            too (the plain Muon baseline).
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
            "accurate), float32, float64 or float32_refined. Default: the model's patch, else auto.",
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
    muon_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Train the hidden Linear weights with torch.optim.Muon at this learning rate (e.g. 0.01); the "
            "first layer, embeddings, norms, biases and the head stay on `optim`. Default: off."
        },
    )
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
            (logger.warning if process_rank() == 0 else logger.debug)(
                "%d processes were launched and this machine has no GPU/accelerator: training with CPU DDP "
                "(`use_cpu=True`, gloo). Pass `--use_cpu True` to say so explicitly.",
                launched_processes(),
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
        if self.muon_learning_rate is not None:
            if not self.muon_learning_rate > 0:
                raise ValueError(f"`muon_learning_rate` must be > 0 or unset, got {self.muon_learning_rate}.")
            if self.fsdp or self.deepspeed:
                raise ValueError(
                    "`muon_learning_rate` works in single-process and DDP runs; with FSDP or DeepSpeed, leave it "
                    "unset (or build the optimizer yourself and pass it as `optimizers=`)."
                )
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
        return TrActConfig.given(
            lambda_=self.tract_lambda,
            targets=self.tract_target,
            sync_gram=self.tract_sync_gram,
            solve_dtype=self.tract_solve_dtype,
        )

    @property
    def tract_config(self) -> TrActConfig:
        """The [`TrActConfig`] these arguments give an unpatched model (defaults where unset)."""
        return TrActConfig(**self.tract_options)

    @property
    def tract_targets(self) -> tuple[str, ...] | None:
        """`tract_target` as a tuple of names, or `None` (discover)."""
        return parse_targets(self.tract_target)


__all__ = ["TRACT_OPTIMIZER_CHOICES", "TrActTrainingArguments"]
