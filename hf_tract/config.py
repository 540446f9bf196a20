"""`TrActConfig`: the one description of how a model is trained with TrAct.

Every entry point (`apply_tract`, `TrActTrainingArguments`, `TrActCallback`, `tract_model_init`, the CLI,
the model card, the examples) builds or reads this object; the default of each option and its validation
live here only. Each patched layer holds the config it was patched with (`layer.tract_config`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist


DEFAULT_LAMBDA = 0.1
LAMBDA_HELP = "the paper uses 0.1 by default, 0.2 for long runs and 0.05 for short ones, with standardised inputs"

# The solve_dtype value of a float32 Cholesky solve with one step of iterative refinement (float64 residual),
# `hf_tract.functional.refined_cholesky_solve`: a string, as no torch dtype names it.
FLOAT32_REFINED = "float32_refined"
_SOLVE_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64, FLOAT32_REFINED: FLOAT32_REFINED}
SOLVE_DTYPE_CHOICES = tuple(_SOLVE_DTYPES)


def _is_process_group(value: Any) -> bool:
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def parse_targets(target: Union[str, Iterable[str], None]) -> Optional[tuple[str, ...]]:
    """Normalise layer names to the form `TrActConfig.targets` holds.

    Args:
        target (`str` or `Iterable[str]`, *optional*):
            A dotted module name, a comma-separated list of them (`"a.b,c.d"`, the command-line form), or
            an iterable of names. `None` means "discover the first layer". The tuple `("",)` is how the config
            of a patched bare `nn.Conv2d` / `nn.Linear` names the layer (the model itself); as a target, `""` is
            refused (a bare layer is found as its own first layer: leave the target unset).

    Returns:
        `tuple[str, ...]` or `None`: The names, stripped, in the given order, duplicates removed.

    Raises:
        ValueError: If no name is left (`""`, `","`, `[]`): leave the option unset to discover the layer.
        TypeError: If `target` is neither a string nor an iterable of strings.
    """
    if target is None:
        return None
    if target == ("",):  # the recorded name of a patched bare layer (the model itself)
        return target
    if isinstance(target, Iterable) and not isinstance(target, str):
        target = list(target)
    if isinstance(target, str):
        names = target.split(",")
    elif isinstance(target, list) and all(isinstance(name, str) for name in target):
        names = [part for name in target for part in name.split(",")]
    else:
        raise TypeError(f"target must be a module name, a comma-separated string or a list of names; got {target!r}.")
    names = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not names:
        raise ValueError(
            f"target {target!r} names no layer; leave it unset (None) to discover the first layer, or give "
            "dotted module names such as 'vit.embeddings.patch_embeddings.projection'."
        )
    return names


def parse_solve_dtype(solve_dtype: Union[str, torch.dtype, None]) -> Union[torch.dtype, str, None]:
    """`"auto"` / `None` -> `None`, `"float32"` / `torch.float32` -> `torch.float32`, same for float64;
    `"float32_refined"` stays that string (a float32 solve with one float64 refinement step).

    Raises:
        ValueError: For any other value.
    """
    if solve_dtype is None or solve_dtype in (torch.float32, torch.float64):
        return solve_dtype
    if isinstance(solve_dtype, str) and solve_dtype.replace("torch.", "") in _SOLVE_DTYPES:
        return _SOLVE_DTYPES[solve_dtype.replace("torch.", "")]
    raise ValueError(
        f"solve_dtype must be None ('auto'), torch.float32 ('float32'), torch.float64 ('float64') or "
        f"'{FLOAT32_REFINED}'; got {solve_dtype!r}."
    )


def solve_dtype_name(solve_dtype: Union[torch.dtype, str, None]) -> str:
    """The command-line name of a solve dtype: `"auto"`, `"float32"`, `"float64"` or `"float32_refined"`."""
    return {value: name for name, value in _SOLVE_DTYPES.items()}[solve_dtype]


def check_lambda(lambda_: Any, name: str = "lambda_") -> float:
    """`lambda_` as a float, if it is a finite number > 0.

    Args:
        lambda_ (`float`): The value to check.
        name (`str`, *optional*, defaults to `"lambda_"`): How the error message names the option.

    Raises:
        TypeError: If it is not a real number (a bool or a string is refused).
        ValueError: If it is not finite and > 0.
    """
    if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {lambda_!r} ({type(lambda_).__name__}); {LAMBDA_HELP}.")
    value = float(lambda_)
    if not (math.isfinite(value) and value > 0):
        hint = " (λ → ∞ is plain training: use `use_tract=False` / `remove_tract` instead)" if value == math.inf else ""
        raise ValueError(
            f"`{name}` must be a finite number > 0 (it keeps AᵀA/N + λI invertible); got {lambda_!r}{hint}; {LAMBDA_HELP}."
        )
    return value


@dataclass(frozen=True)
class TrActConfig:
    """How the first layer(s) of a model are trained with TrAct.

    Frozen and validated once, here: an instance is always valid. Build a changed copy with
    [`TrActConfig.replace`].

    Args:
        lambda_ (`float`, *optional*, defaults to `0.1`):
            The regulariser λ of `grad_W · (AᵀA/N + λI)⁻¹`, finite and > 0. The paper uses 0.1, 0.2 for long
            runs and 0.05 for short ones, and assumes standardised inputs.
        targets (`tuple[str, ...]`, *optional*):
            Dotted names of the layer(s) to patch. A comma-separated string or a list is accepted and stored
            as a tuple. `None` discovers the first layer ([`hf_tract.find_first_layers`]). In the config a
            patched layer holds, the names actually patched.
        sync_gram (`bool` or `torch.distributed.ProcessGroup`, *optional*, defaults to `False`):
            All-reduce the patch Gram across processes (`True`: the default group; or a given group), so that
            R processes compute exactly single-process TrAct on the global batch. `False`: each process uses
            its own batch's Gram, like BatchNorm.
        solve_dtype (`torch.dtype` or `str`, *optional*):
            dtype of the Cholesky solve: `torch.float32`, `torch.float64`, or `None` (also `"auto"`): float64
            on GPUs; on CPU float32 when an a-priori condition bound guarantees ~1e-3 accuracy, else float64.
            The strings `"float32"` / `"float64"` are accepted. `"float32_refined"`: a float32 factorisation
            and one step of iterative refinement with a float64 residual (accuracy measured in
            `benchmarks/results/solve_precision_cpu.md`).

    Example:
        ```python
        >>> from hf_tract import TrActConfig, apply_tract
        >>> config = TrActConfig(lambda_=0.2, targets="vit.embeddings.patch_embeddings.projection")
        >>> config.targets
        ('vit.embeddings.patch_embeddings.projection',)
        >>> model = apply_tract(model, config)  # doctest: +SKIP
        ```
    """

    lambda_: float = DEFAULT_LAMBDA
    targets: Optional[tuple[str, ...]] = None
    sync_gram: Union[bool, Any] = False
    solve_dtype: Union[torch.dtype, str, None] = None

    def __post_init__(self):
        object.__setattr__(self, "lambda_", check_lambda(self.lambda_))
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if not (isinstance(self.sync_gram, bool) or _is_process_group(self.sync_gram)):
            raise TypeError(
                f"sync_gram must be True, False or a torch.distributed.ProcessGroup; got {self.sync_gram!r}."
            )
        object.__setattr__(self, "solve_dtype", parse_solve_dtype(self.solve_dtype))

    @classmethod
    def given(cls, config: Union["TrActConfig", float, None] = None, **options: Any) -> dict[str, Any]:
        """The options a user gave, as field names: what overrides the options a model was patched with.

        Every entry point that takes "a config and/or keyword options" (`apply_tract`, [`TrActCallback`],
        [`tract_model_init`], the training arguments) merges them here, so the rules are the same everywhere:
        the fields of `config` that are set (not `None`), then the keyword options that are not `None` on top.
        A plain number as `config` is λ (the positional form `apply_tract(model, 0.2)`).

        Args:
            config ([`TrActConfig`] or `float`, *optional*): All options at once, or λ.
            options: [`TrActConfig`] fields (`lambda_`, `targets`, `sync_gram`, `solve_dtype`); `None` means
                not given.

        Returns:
            `dict[str, Any]`: The given options, validated (as a [`TrActConfig`] built from them would be).

        Raises:
            TypeError: If `config` is neither a [`TrActConfig`], a number nor `None`, or an option is unknown.
            ValueError: If an option is invalid.
        """
        fields = [field.name for field in dataclasses.fields(cls)]
        unknown = set(options) - set(fields)
        if unknown:
            raise TypeError(f"unknown TrAct option(s) {sorted(unknown)}; the options are {fields}.")
        if isinstance(config, numbers.Real) and not isinstance(config, bool):
            if options.get("lambda_") is not None:
                raise TypeError(f"λ given twice: as config ({config!r}) and as lambda_ ({options['lambda_']!r}).")
            config, options = None, {**options, "lambda_": config}
        if config is not None and not isinstance(config, TrActConfig):
            raise TypeError(f"config must be a TrActConfig (or use the keyword options); got {config!r}.")
        given = {name: getattr(config, name) for name in fields} if config is not None else {}
        given.update({key: value for key, value in options.items() if value is not None})
        given = {key: value for key, value in given.items() if value is not None}
        validated = cls(**given)
        return {key: getattr(validated, key) for key in given}

    def replace(self, **changes: Any) -> "TrActConfig":
        """A copy with `changes` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def sync_group(self):
        """The process group the Gram is all-reduced over in this process, or `None` (per-process Gram).

        `None` when `sync_gram` is off, when `torch.distributed` is not initialised, or when the group
        has a single process. This is what a patched layer calls in its forward pass; with the default
        `sync_gram=False` it returns at once.
        """
        if self.sync_gram is False:
            return None
        if not dist.is_initialized():
            return None
        group = dist.group.WORLD if self.sync_gram is True else self.sync_gram
        return group if dist.get_world_size(group) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for logs and model cards): a process group is reported as `True`."""
        return {
            "lambda": self.lambda_,
            "targets": list(self.targets) if self.targets is not None else None,
            "sync_gram": bool(self.sync_gram) if isinstance(self.sync_gram, bool) else True,
            "solve_dtype": solve_dtype_name(self.solve_dtype),
        }

    def describe(self) -> str:
        """One line for log messages: `lambda=0.1, sync_gram=False, solve_dtype=auto`."""
        values = self.to_dict()
        return f"lambda={self.lambda_:g}, sync_gram={values['sync_gram']}, solve_dtype={values['solve_dtype']}"


__all__ = ["TrActConfig", "DEFAULT_LAMBDA", "FLOAT32_REFINED", "SOLVE_DTYPE_CHOICES", "parse_targets", "parse_solve_dtype", "check_lambda"]
