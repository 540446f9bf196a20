"""apply_tract / remove_tract: patch the first layer(s) of a model in place, and undo it."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from .modules import SUPPORTED_LAYER_TYPES, TrActLayerMixin, tract_class_for
from .targets import ExampleInputs, resolve_targets
from .wrappers import unwrap_for_patching, unwrap_model

logger = logging.getLogger(__name__)

TRACT_TAG = "tract"
_TRACT_ATTRIBUTES = ("tract_lambda", "tract_sync_gram", "tract_solve_dtype")


def _check_lambda(lambda_) -> float:
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_) or lambda_ <= 0:
        raise ValueError(
            f"lambda_ must be a finite number > 0 (paper: 0.05 short runs, 0.1 default, 0.2 long runs); got {lambda_!r}."
        )
    return float(lambda_)


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


def apply_tract(
    model: nn.Module,
    lambda_: float = 0.1,
    target: Optional[Union[str, Iterable[str]]] = None,
    *,
    sync_gram=False,
    solve_dtype: Optional[torch.dtype] = None,
    example_inputs: Optional[ExampleInputs] = None,
) -> nn.Module:
    """Train the first layer(s) of ``model`` with TrAct, in place.

    The forward pass, the parameters and the state_dict are unchanged; only the weight gradient
    of the patched layer(s) becomes ``grad_W · (A^T A / N + λ I)^-1``. Calling it again updates the
    options (never stacks).

    Args:
        model: a transformers / timm / torchvision model (or any ``nn.Module``), before
            ``torch.compile`` or ``accelerator.prepare``. DDP / DataParallel wrappers are unwrapped.
        lambda_: the regulariser λ > 0 (paper: 0.1; 0.2 for long runs, 0.05 for short ones; it
            assumes standardised inputs).
        target: dotted name(s) of the layer(s) to patch; default: found by
            :func:`hf_tract.find_first_layers`.
        sync_gram: all-reduce the Gram across processes (``True`` for the default group, or a
            process group), making R processes exactly single-process TrAct on the global batch.
            Default: each process uses its own batch's Gram, like BatchNorm.
        solve_dtype: dtype of the Cholesky solve. Default: float64 on GPUs; on CPU float32 when
            an a-priori condition bound guarantees ~1e-3 accuracy (standardised inputs), float64
            otherwise (e.g. pixels in [0, 255]). ``torch.float32`` forces the faster solve.
        example_inputs: input for the discovery probe (see :func:`hf_tract.find_first_layers`).

    Returns:
        ``model`` itself.

    Example:
        ```python
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from hf_tract import apply_tract
        >>> model = apply_tract(ViTForImageClassification(ViTConfig(image_size=32, patch_size=4)))
        ```
    """
    lambda_ = _check_lambda(lambda_)
    if solve_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"solve_dtype must be None, torch.float32 or torch.float64; got {solve_dtype!r}.")
    model_to_patch = unwrap_for_patching(model)
    layers = resolve_targets(model_to_patch, target, example_inputs)
    for name, module in layers:
        _check_supported(name, module)
    for name, module in layers:
        if not isinstance(module, TrActLayerMixin):
            module.__class__ = tract_class_for(type(module))
        module.tract_lambda = lambda_
        module.tract_sync_gram = sync_gram
        module.tract_solve_dtype = solve_dtype
        if not module.weight.requires_grad:
            warnings.warn(
                f"{name}.weight does not require grad: TrAct changes nothing until it is trained "
                f"(set {name}.weight.requires_grad_(True), or unfreeze the first layer).",
                stacklevel=2,
            )
    names = ", ".join(name for name, _ in layers)
    plural = f"{len(layers)} first layers" if len(layers) > 1 else "first layer"
    logger.info("TrAct (lambda=%g, sync_gram=%s) applied to the %s: %s", lambda_, bool(sync_gram), plural, names)
    if hasattr(model_to_patch, "add_model_tags"):
        model_to_patch.add_model_tags([TRACT_TAG])
    return model


def tract_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` patched with TrAct, by dotted name."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, TrActLayerMixin)}


def is_tract_applied(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is patched with TrAct."""
    return bool(tract_layers(model))


def remove_tract(model: nn.Module) -> nn.Module:
    """Exact undo of :func:`apply_tract`: original classes back, TrAct attributes and tag removed."""
    inner = unwrap_model(model)
    for module in tract_layers(inner).values():
        module.__class__ = type(module)._tract_base_class
        for attribute in _TRACT_ATTRIBUTES:
            module.__dict__.pop(attribute, None)
    tags = getattr(inner, "model_tags", None)
    if tags and TRACT_TAG in tags:
        tags.remove(TRACT_TAG)
        if not tags:
            inner.model_tags = None
    return model
