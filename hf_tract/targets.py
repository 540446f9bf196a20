"""Which layer(s) `apply_tract` patches: the user's `target=`, or the layer(s) that consume the raw pixels.

Discovery tries, in order: the registry of every transformers vision family and timm's metadata
([`hf_tract.registry`]), then the probe, which works for any model ([`hf_tract.probe`]).
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from typing import Optional, Sequence, Union

import torch.nn as nn

from .config import parse_targets
from .modules import SUPPORTED_LAYER_TYPES
from .probe import FirstLayerNotFoundError, probe_first_layers
from .probe_inputs import ExampleInputs
from .registry import from_registry, from_timm
from .wrappers import unwrap_for_patching


def _supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def _candidates_message(model: nn.Module) -> str:
    candidates = [f"  {name} ({type(m).__name__})" for name, m in model.named_modules() if _supported(m)][:8]
    return "\n".join(candidates) or "  (none: the model has no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d)"


def find_first_layers(
    model: nn.Module,
    example_inputs: Optional[ExampleInputs] = None,
    *,
    use_registry: bool = True,
    image_size: Optional[int] = None,
) -> list[tuple[str, nn.Module]]:
    """All layers that consume the raw pixels of `model` (several for two-tower or parallel stems).

    Args:
        model (`nn.Module`): A transformers, timm or torchvision model (or any `nn.Module`), not yet wrapped.
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): Input for the probe forward (a
            tensor, a list of positional arguments or a dict of keyword arguments). Passing it forces
            the probe, skipping the registries.
        use_registry (`bool`, *optional*, defaults to `True`): Look the model up in the first-layer
            registry and timm's metadata before probing. `False` runs the probe alone.
        image_size (`int`, *optional*): Side of the probe's dummy images (default: what the model says).

    Returns:
        `list[tuple[str, nn.Module]]`: `[(dotted_name, module), ...]` in call order.

    Raises:
        FirstLayerNotFoundError: Listing candidate layers and how to pass `target=`.
    """
    model = unwrap_for_patching(model)
    if _supported(model):  # a bare layer: it consumes whatever it is given
        return [("", model)]
    sources = [from_registry, from_timm] if example_inputs is None and use_registry else []
    names: list[str] = []
    for source in sources:
        names = source(model)
        if names:
            break
    probe_error = None
    if not names:
        try:
            names = probe_first_layers(model, example_inputs, image_size=image_size)
        except FirstLayerNotFoundError as exc:
            probe_error = exc
    modules = dict(model.named_modules())
    found = [(name, modules[name]) for name in names]
    if not found:
        reason = f" ({probe_error})" if probe_error else ""
        raise FirstLayerNotFoundError(
            f"Could not find the first layer of {type(model).__name__}{reason}. Candidate layers:\n"
            f"{_candidates_message(model)}\nPass it explicitly, e.g. apply_tract(model, target='<dotted name>'), "
            "or pass example_inputs=... so the probe can run a forward pass."
        )
    return found


def find_first_layer(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> tuple[str, nn.Module]:
    """The layer that consumes the raw pixels, as `(dotted_name, module)`.

    Raises:
        FirstLayerNotFoundError: if none is found, or if the model has several first layers
            (use [`find_first_layers`] then).
    """
    found = find_first_layers(model, example_inputs)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise FirstLayerNotFoundError(
            f"{type(model).__name__} has {len(found)} first layers ({names}); use find_first_layers(model)."
        )
    return found[0]


# A model this small runs the probe forward in well under a second on a CPU: resolve_targets checks
# a user's target= against it. Larger models are checked against the registries only.
_CHEAP_PROBE_PARAMETERS = 20_000_000


def _discovered_cheaply(model: nn.Module, example_inputs: Optional[ExampleInputs]) -> list[str]:
    """The first layers where finding them is cheap (registry, timm metadata, or the probe on a small
    model or the user's own example input); `[]` when unknown. Never raises."""
    with contextlib.suppress(Exception):
        if example_inputs is None:
            names = from_registry(model) or from_timm(model)
            if names:
                return names
            if sum(p.numel() for p in model.parameters()) > _CHEAP_PROBE_PARAMETERS:
                return []
            if any(p.is_meta for p in model.parameters()):
                return []
        return probe_first_layers(model, example_inputs)
    return []


def _not_a_submodule(model: nn.Module, name: str, example_inputs) -> str:
    layers = [n for n, m in model.named_modules() if _supported(m)]
    close = difflib.get_close_matches(name, layers, n=3, cutoff=0.5) or difflib.get_close_matches(
        name, [n for n, _ in model.named_modules() if n], n=3, cutoff=0.5
    )
    message = f"target {name!r} is not a submodule of {type(model).__name__}."
    if close:
        message += " Closest names: " + ", ".join(repr(c) for c in close) + "."
    first = _discovered_cheaply(model, example_inputs)
    if first:
        message += f" The layer that consumes the pixels is {', '.join(repr(n) for n in first)}."
    if not close and not first:
        message += " Leave target=None to discover the first layer, or see model.named_modules()."
    return message


def resolve_targets(
    model: nn.Module, target: Optional[Union[str, Sequence[str]]], example_inputs: Optional[ExampleInputs] = None
) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs `apply_tract` patches: `target` resolved in `model`, or discovered.

    Args:
        model (`nn.Module`): The (unwrapped) model.
        target (`str` or `list[str]`, *optional*): Dotted name(s) of the layer(s); `None` discovers them
            with [`find_first_layers`].
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): Input for the discovery probe.

    Returns:
        `list[tuple[str, nn.Module]]`: The layers, in the order given (or discovered).

    Raises:
        ValueError: If `target` is empty (`""`, `[]`) or names a module `model` does not have
            (the message suggests the closest names and the discovered first layer).
        FirstLayerNotFoundError: If `target` is `None` and no first layer can be found.

    A target that exists but does not consume the pixels is accepted with a warning naming the layer
    that does (checked where discovery is cheap: registry, timm metadata, or a probe of a small model).
    """
    names = parse_targets(target)
    if names is None:
        return find_first_layers(model, example_inputs)
    resolved = []
    for name in names:
        try:
            resolved.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ValueError(_not_a_submodule(model, name, example_inputs)) from None
    first = _discovered_cheaply(model, example_inputs)
    stray = [name for name, module in resolved if first and name not in first and _supported(module)]
    if stray:
        warnings.warn(
            f"target {', '.join(repr(n) for n in stray)} does not consume the pixels of {type(model).__name__}; "
            f"the first layer is {', '.join(repr(n) for n in first)}. TrAct preconditions with the input patches of "
            "the layer it patches: pass the first layer (or leave target=None) unless this is what you want.",
            UserWarning,
            stacklevel=3,
        )
    return resolved


__all__ = ["FirstLayerNotFoundError", "find_first_layer", "find_first_layers", "resolve_targets"]
