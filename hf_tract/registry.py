"""What is known about a model's first layer without running it: our registry and timm's metadata.

- The registry (`first_layers.json`) holds the first layer(s) measured for every transformers vision family on
  tiny configs, keyed by model class, then by `model_type` (matched by path suffix, so that other heads and
  wrappers of the same family are found too).
- timm models say it themselves: `pretrained_cfg["first_conv"]`, for raw timm models, `TimmWrapper*` models and
  timm backbones inside transformers models.
"""

from __future__ import annotations

import contextlib
import functools
import json
from importlib import resources
from typing import Mapping

import torch.nn as nn

from .modules import SUPPORTED_LAYER_TYPES


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    return json.loads(resources.files(__package__).joinpath("first_layers.json").read_text())


def _supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def _path_matches(name: str, recorded: str) -> bool:
    # The registry path is relative to the class the survey ran; the same layer sits under a
    # different prefix in other heads (ViTModel vs ViTForImageClassification) or wrappers.
    return name == recorded or recorded.endswith("." + name) or name.endswith("." + recorded)


def from_registry(model: nn.Module) -> list[str]:
    """Recorded first layers of this model class, else of this `model_type` (matched by path
    suffix); used only when exactly one recorded set of layers is present in the model."""
    registry = _registry()
    modules = {name: m for name, m in model.named_modules() if _supported(m)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lookups = (
        (registry["by_class"].get(type(model).__name__, []), str.__eq__),
        (registry["by_model_type"].get(model_type, []), _path_matches),
    )
    for path_sets, matches in lookups:
        present = set()
        for paths in path_sets:
            found = tuple(sorted(n for n in modules if any(matches(n, p) for p in paths)))
            if found and all(any(matches(n, p) for n in found) for p in paths):
                present.add(found)
        if len(present) == 1:
            return list(present.pop())
    return []


def from_timm(model: nn.Module) -> list[str]:
    found = []
    for prefix, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        first_conv = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
        if not first_conv:
            continue
        for conv in [first_conv] if isinstance(first_conv, str) else first_conv:
            name = f"{prefix}.{conv}" if prefix else conv
            with contextlib.suppress(AttributeError):
                if _supported(model.get_submodule(name)):
                    found.append(name)
        if found:
            return found
    return found


__all__ = ["from_registry", "from_timm"]
