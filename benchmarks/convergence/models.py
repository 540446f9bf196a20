"""The models: a seeded tiny ViT / ResNet from a transformers config, with a run's variant applied to its first layer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_tract import apply_tract, find_first_layer, whiten_first_layer

from .presets import Variant


__all__ = ["apply_variant", "build_model"]


def build_model(arch: str, model_kwargs: dict[str, Any], seed: int, num_labels: int = 10) -> torch.nn.Module:
    """A freshly initialised (seeded) one-channel 28x28 classifier from a transformers config.

    Args:
        arch (`str`): `"vit"` or `"resnet"`.
        model_kwargs (`dict`): `ViTConfig` / `ResNetConfig` keyword arguments (a preset's `vit` / `resnet`).
        seed (`int`): seed of the initialisation.
        num_labels (`int`): classes of the head.
    """
    torch.manual_seed(seed)
    if arch == "vit":
        return ViTForImageClassification(ViTConfig(num_channels=1, image_size=28, num_labels=num_labels, **model_kwargs))
    return ResNetForImageClassification(ResNetConfig(num_channels=1, num_labels=num_labels, **model_kwargs))


def apply_variant(model: torch.nn.Module, variant: Variant, whitening_inputs: torch.Tensor | None = None) -> torch.nn.Module:
    """Initialises and patches the first layer of `model` as `variant` says (in place for hf_tract; returns the model).

    Args:
        whitening_inputs (`torch.Tensor`, *optional*): preprocessed training images for the patch-whitening
            initialisation (needed when `variant.first_layer_init` is not `"default"`).

    Raises:
        ImportError: for the official variant when `torch-tract` is not installed.
    """
    if variant.first_layer_init != "default":
        if whitening_inputs is None:
            raise ValueError(f"variant {variant.name} needs whitening_inputs")
        name = whiten_first_layer(model, whitening_inputs, stride=1)  # every 7x7 patch, as airbench does
        if variant.first_layer_init == "whiten_frozen":
            model.get_submodule(name).weight.requires_grad_(False)
    if variant.tract is None:
        return model
    if variant.implementation == "official":
        import torch_tract  # benchmark / test dependency only

        name, layer = find_first_layer(model)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, torch_tract.TrAct(layer, l=variant.lambda_))
        return model
    return apply_tract(model, variant.tract)
