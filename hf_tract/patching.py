"""Patching: `apply_tract` / `remove_tract` change the first layer(s) of a model in place, and
`prepare_model_for_training` decides, for a training run, whether and with which options a model is patched."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from .config import TrActConfig
from .modules import SUPPORTED_LAYER_TYPES, TrActLayerMixin, tract_class_for
from .probe_inputs import ExampleInputs
from .targets import resolve_targets
from .wrappers import unwrap_for_patching, unwrap_model


logger = logging.getLogger(__name__)

TRACT_TAG = "tract"
# Everything apply_tract sets on a layer instance, removed again by remove_tract.
_LAYER_ATTRIBUTES = ("tract_config", "tract_record_stats", "_tract_stats")


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, TrActLayerMixin):
        return
    if not isinstance(module, SUPPORTED_LAYER_TYPES):
        supported = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYER_TYPES)
        raise TypeError(
            f"target {name!r} is a {type(module).__name__}; TrAct supports {supported} and their subclasses "
            "(transposed convolutions and embeddings have no input patches to precondition with). "
            "Pass target= the Linear/Conv that consumes the pixels."
        )


def tract_config_of(model: nn.Module) -> Optional[TrActConfig]:
    """The [`TrActConfig`] the model's patched layers carry, or `None` when it is not patched.

    Args:
        model (`nn.Module`): Any model; wrappers (DDP, compile, ...) are looked through.

    Returns:
        [`TrActConfig`] or `None`: One config, with `targets` the names of all patched layers.

    Raises:
        ValueError: If the patched layers were patched with different options (separate `apply_tract`
            calls with different λ, ...): there is then no single config to report.
    """
    layers = tract_layers(model)
    if not layers:
        return None
    configs = {layer.tract_config.replace(targets=None) for layer in layers.values()}
    if len(configs) > 1:
        details = ", ".join(f"{name}: {layer.tract_config.describe()}" for name, layer in layers.items())
        raise ValueError(f"The TrAct layers of this model carry different options ({details}); re-apply one config.")
    return configs.pop().replace(targets=tuple(layers))


def apply_tract(
    model: nn.Module,
    config: Optional[TrActConfig] = None,
    *,
    lambda_: Optional[float] = None,
    target: Optional[Union[str, Iterable[str]]] = None,
    sync_gram: Any = None,
    solve_dtype: Union[torch.dtype, str, None] = None,
    example_inputs: Optional[ExampleInputs] = None,
) -> nn.Module:
    """Train the first layer(s) of `model` with TrAct, in place.

    The forward pass, the parameters and the state_dict are unchanged; only the weight gradient of the
    patched layer(s) becomes `grad_W · (AᵀA/N + λI)⁻¹`. Each patched layer holds the resulting
    [`TrActConfig`] as `layer.tract_config`.

    The options come from `config`, then from the keyword arguments, which override it. Without `config`,
    a model that is already patched keeps its options except those given (so calling this again updates
    options and never stacks); an unpatched model starts from `TrActConfig()`'s defaults.

    Args:
        model (`nn.Module`):
            A transformers / timm / torchvision model (or any `nn.Module`), before `torch.compile` or
            `accelerator.prepare`. DDP / DataParallel wrappers are looked through.
        config ([`TrActConfig`], *optional*):
            All options at once. A plain number is read as `lambda_` (the positional form of earlier versions).
        lambda_ (`float`, *optional*):
            The regulariser λ > 0 (default 0.1; the paper uses 0.2 for long runs, 0.05 for short ones, and
            assumes standardised inputs).
        target (`str` or `list[str]`, *optional*):
            Dotted name(s) of the layer(s) to patch, or a comma-separated string; `""` is the model itself.
            Default: found by [`hf_tract.find_first_layers`].
        sync_gram (`bool` or `torch.distributed.ProcessGroup`, *optional*):
            All-reduce the Gram across processes (`True`: the default group), making R processes exactly
            single-process TrAct on the global batch. Default `False`: each process uses its own batch's Gram.
        solve_dtype (`torch.dtype` or `str`, *optional*):
            dtype of the Cholesky solve (`torch.float32` / `torch.float64`; `"float32"` / `"float64"` /
            `"float32_refined"` / `"auto"` are accepted). Default: float64 on GPUs; on CPU float32 when an a-priori condition
            bound guarantees ~1e-3 accuracy (standardised inputs), float64 otherwise.
        example_inputs (`torch.Tensor` or `dict`, *optional*):
            Input for the discovery probe (see [`hf_tract.find_first_layers`]).

    Returns:
        `nn.Module`: `model` itself.

    Raises:
        ValueError: For an invalid option (see [`TrActConfig`]) or a target that is not a submodule.
        TypeError: For a target that is not a `nn.Linear` / `nn.Conv1d/2d/3d` (or subclass).
        RuntimeError: For a compiled, FSDP or DeepSpeed model (patch before wrapping).

    Example:
        ```python
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from hf_tract import TrActConfig, apply_tract
        >>> model = apply_tract(ViTForImageClassification(ViTConfig(image_size=32, patch_size=4)), lambda_=0.2)
        >>> model.vit.embeddings.patch_embeddings.projection.tract_config.lambda_
        0.2
        ```
    """
    given = TrActConfig.given(config, lambda_=lambda_, targets=target, sync_gram=sync_gram, solve_dtype=solve_dtype)
    model_to_patch = unwrap_for_patching(model)
    # A whole config describes the run by itself; options alone update the model's own patch.
    base = TrActConfig() if isinstance(config, TrActConfig) else tract_config_of(model_to_patch) or TrActConfig()
    config = base.replace(**given)
    layers = resolve_targets(model_to_patch, config.targets, example_inputs)
    for name, module in layers:
        _check_supported(name, module)
    config = config.replace(targets=tuple(name for name, _ in layers))
    changed = False
    for name, module in layers:
        if not isinstance(module, TrActLayerMixin):
            module.__class__ = tract_class_for(type(module))
        if module.__dict__.get("tract_config") != config:
            module.tract_config = config
            changed = True
        if not module.weight.requires_grad:
            warnings.warn(
                f"{name}.weight does not require grad: TrAct changes nothing until it is trained "
                f"(set {name}.weight.requires_grad_(True), or unfreeze the first layer).",
                stacklevel=2,
            )
    names = ", ".join(name or "(the model itself)" for name, _ in layers)
    plural = f"{len(layers)} first layers" if len(layers) > 1 else "first layer"
    # Re-applying the same options changes nothing and says nothing, so a run logs this line once.
    (logger.info if changed else logger.debug)("TrAct (%s) applied to the %s: %s", config.describe(), plural, names)
    if hasattr(model_to_patch, "add_model_tags"):
        model_to_patch.add_model_tags([TRACT_TAG])
    return model


def tract_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` patched with TrAct, by dotted name (wrappers are looked through)."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, TrActLayerMixin)}


def is_tract_applied(model: nn.Module) -> bool:
    """Whether any layer of `model` is patched with TrAct."""
    return bool(tract_layers(model))


def remove_tract(model: nn.Module) -> nn.Module:
    """Exact undo of [`apply_tract`]: original classes back, `tract_config` and the `tract` tag removed.

    Args:
        model (`nn.Module`): A patched model (wrappers are looked through); an unpatched one is returned as is.

    Returns:
        `nn.Module`: `model` itself.
    """
    inner = unwrap_model(model)
    for module in tract_layers(inner).values():
        module.__class__ = type(module)._tract_base_class
        for attribute in _LAYER_ATTRIBUTES:
            module.__dict__.pop(attribute, None)
    tags = getattr(inner, "model_tags", None)
    if tags and TRACT_TAG in tags:
        tags.remove(TRACT_TAG)
        if not tags:
            inner.model_tags = None
    return model


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
        options (`dict`): The explicitly given options, as [`TrActConfig`] field names (see [`TrActConfig.given`]).
        source (`str`, *optional*, defaults to `"training arguments"`): What gave the options, for the log messages.

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


__all__ = [
    "TRACT_TAG",
    "apply_tract",
    "is_tract_applied",
    "prepare_model_for_training",
    "remove_tract",
    "tract_config_of",
    "tract_layers",
]
