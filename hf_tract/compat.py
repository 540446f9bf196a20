"""Workarounds for bugs of the libraries hf_tract builds on, each naming the bug, the version and the test that
fails once the bug is fixed (then the workaround goes)."""

from __future__ import annotations

import os

from torch import nn
from transformers import Trainer


def resume_with_converted_legacy_keys(trainer: Trainer, checkpoint: str, model: nn.Module) -> bool:
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


__all__ = ["resume_with_converted_legacy_keys"]
