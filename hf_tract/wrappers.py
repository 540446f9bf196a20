"""The one place that looks through model wrappers (DDP, DataParallel, FSDP, DeepSpeed, `torch.compile`)."""

from __future__ import annotations

import torch
import torch.nn as nn


_WRAPPER_NAMES = ("FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine")


def _is_compiled(model: nn.Module) -> bool:
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def unwrap_for_patching(model: nn.Module) -> nn.Module:
    """The model to patch: the module inside `DistributedDataParallel` / `DataParallel`, or `model` itself.

    Args:
        model (`nn.Module`): A model, possibly wrapped.

    Returns:
        `nn.Module`: The bare model.

    Raises:
        RuntimeError: For `torch.compile`, FSDP (1 and 2) and DeepSpeed wrappers: they must be applied after TrAct.
    """
    fix = "Call apply_tract(model) on the plain model first, then torch.compile / accelerator.prepare / wrap it."
    if _is_compiled(model):
        raise RuntimeError(f"The model is already compiled with torch.compile. {fix}")
    if type(model).__name__ in _WRAPPER_NAMES:
        raise RuntimeError(f"The model is already wrapped by {type(model).__name__}. {fix}")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise RuntimeError(f"The model's parameters are sharded DTensors (FSDP2 / tensor parallel). {fix}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return unwrap_for_patching(model.module)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside any wrapper (DDP, DataParallel, FSDP1, DeepSpeed, `torch.compile`), refusing none: for
    read-only queries and undo.

    Args:
        model (`nn.Module`): A model, possibly wrapped (several times).

    Returns:
        `nn.Module`: The innermost model.
    """
    if _is_compiled(model):
        return unwrap_model(model._orig_mod)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or type(model).__name__ in _WRAPPER_NAMES:
        return unwrap_model(model.module)
    return model


def is_wrapped(model: nn.Module) -> bool:
    """Whether `model` is a DDP / DataParallel / FSDP1 / DeepSpeed / compiled wrapper (patching must happen before).

    Args:
        model (`nn.Module`): A model.

    Returns:
        `bool`: `True` if [`unwrap_model`] would return another module.
    """
    return unwrap_model(model) is not model


__all__ = ["is_wrapped", "unwrap_for_patching", "unwrap_model"]
