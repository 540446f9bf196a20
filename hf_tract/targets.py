"""Which layer is "first": the layer(s) that consume the raw pixels.

Three sources, tried in order:

1. a registry of the paths measured for every transformers vision family (``first_layers.json``,
   keyed by model class, then by ``model_type``);
2. timm's own metadata (``pretrained_cfg["first_conv"]``) for raw timm models, ``TimmWrapper*``
   models and timm backbones inside transformers models;
3. a probe that works for any model: one forward pass on a dummy input that requires grad, with
   every parameter frozen; a Conv/Linear is a first layer if the autograd graph of its input reaches
   the pixels without passing through the output of another Conv/Linear/Embedding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from importlib import resources
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .modules import SUPPORTED_LAYER_TYPES
from .wrappers import unwrap_for_patching

logger = logging.getLogger(__name__)

_WEIGHT_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)

ExampleInputs = Union[torch.Tensor, Mapping[str, Any], Sequence[Any]]


class FirstLayerNotFoundError(RuntimeError):
    """No first layer could be determined; the message lists candidates and how to pass ``target=``."""


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    return json.loads(resources.files(__package__).joinpath("first_layers.json").read_text())


def _supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def _path_matches(name: str, recorded: str) -> bool:
    # The registry path is relative to the class the survey ran; the same layer sits under a
    # different prefix in other heads (ViTModel vs ViTForImageClassification) or wrappers.
    return name == recorded or recorded.endswith("." + name) or name.endswith("." + recorded)


def _from_registry(model: nn.Module) -> list[str]:
    """Recorded first layers of this model class, else of this ``model_type`` (matched by path
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


def _from_timm(model: nn.Module) -> list[str]:
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


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) or config


def default_example_inputs(model: nn.Module) -> dict:
    """A one-image dummy input built from the model's config (transformers), ``pretrained_cfg``
    (timm) or the 3×224×224 ImageNet default (torchvision and others)."""
    config = _config_of(model)
    if config is not None and hasattr(model, "main_input_name"):
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(config, "num_channels", 3)
        shape = (1, channels, height, width)
        if getattr(config, "num_frames", None):
            shape = (1, config.num_frames, channels, height, width)
        return {model.main_input_name: torch.randn(shape)}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return {"x": torch.randn(1, *cfg["input_size"])}
    return {"x": torch.randn(1, 3, 224, 224)}


class _PixelConsumerProbe:
    """Records the weight layers whose input reaches the pixels without crossing another one."""

    def __init__(self, model: nn.Module, pixels: list[torch.Tensor]):
        self.pixel_nodes = set()
        self.layer_outputs = set()
        self.consumers: list[str] = []
        self._reaches: dict = {}
        self._handles = []
        self._pixels = pixels
        for name, module in model.named_modules():
            if isinstance(module, _WEIGHT_LAYER_TYPES):
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._before, name)))
                self._handles.append(module.register_forward_hook(self._after))

    def _reaches_pixels(self, node) -> bool:
        stack, seen = [node], []
        while stack:
            current = stack.pop()
            if current is None or current in self.layer_outputs or current in seen:
                continue
            if current in self._reaches:
                if self._reaches[current]:
                    return True
                continue
            seen.append(current)
            if getattr(current, "variable", None) is not None and any(current.variable is p for p in self._pixels):
                for visited in seen:
                    self._reaches[visited] = True
                return True
            stack.extend(child for child, _ in current.next_functions)
        for visited in seen:
            self._reaches[visited] = False
        return False

    def _before(self, name, module, args):
        for tensor in (a for a in args if isinstance(a, torch.Tensor)):
            is_pixels = any(tensor is p for p in self._pixels)
            if is_pixels or (tensor.grad_fn is not None and self._reaches_pixels(tensor.grad_fn)):
                if name not in self.consumers:
                    self.consumers.append(name)
                return

    def _after(self, module, args, output):
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            self.layer_outputs.add(output.grad_fn)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def probe_first_layers(model: nn.Module, example_inputs: Optional[ExampleInputs] = None) -> list[str]:
    """Names of the weight layers that directly consume the pixel input, in call order.

    Runs one forward pass in eval mode on ``example_inputs`` (default: :func:`default_example_inputs`)
    with all parameters frozen (restored afterwards). Floating-point tensors of the input are the
    "pixels". A forward that fails after a first layer ran still counts (heads of tiny configs may
    not fit a dummy input).
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def prepare(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().to(device).requires_grad_(True)
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    if isinstance(example_inputs, Mapping):
        args, kwargs = [], {k: prepare(v) for k, v in example_inputs.items()}
    else:
        args, kwargs = [prepare(v) for v in example_inputs], {}
    pixels = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.requires_grad]
    if len(kwargs) == 1 and "x" in kwargs:  # positional input for non-transformers models
        args, kwargs = [kwargs["x"]], {}

    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    probe = _PixelConsumerProbe(model, pixels)
    error = None
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported below if no first layer ran
        error = exc
    finally:
        probe.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    if not probe.consumers and error is not None:
        logger.debug("first-layer probe forward failed: %r", error)
        raise FirstLayerNotFoundError(f"the probe forward failed before any layer consumed the pixels: {error!r}")
    return probe.consumers


def _candidates_message(model: nn.Module) -> str:
    candidates = [f"  {name} ({type(m).__name__})" for name, m in model.named_modules() if _supported(m)][:8]
    return "\n".join(candidates) or "  (none: the model has no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d)"


def find_first_layers(
    model: nn.Module, example_inputs: Optional[ExampleInputs] = None
) -> list[tuple[str, nn.Module]]:
    """All layers that consume the raw pixels of ``model`` (several for two-tower or parallel stems).

    Args:
        model: a transformers, timm or torchvision model (or any ``nn.Module``), not yet wrapped.
        example_inputs: input for the probe forward (a tensor, a list of positional arguments or a
            dict of keyword arguments). Passing it forces the probe, skipping the registries.

    Returns:
        ``[(dotted_name, module), ...]`` in call order.

    Raises:
        FirstLayerNotFoundError: listing candidate layers and how to pass ``target=``.
    """
    model = unwrap_for_patching(model)
    sources = [] if example_inputs is not None else [_from_registry, _from_timm]
    names: list[str] = []
    for source in sources:
        names = source(model)
        if names:
            break
    probe_error = None
    if not names:
        try:
            names = probe_first_layers(model, example_inputs)
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
    """The layer that consumes the raw pixels, as ``(dotted_name, module)``.

    Raises:
        FirstLayerNotFoundError: if none is found, or if the model has several first layers
            (use :func:`find_first_layers` then).
    """
    found = find_first_layers(model, example_inputs)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise FirstLayerNotFoundError(
            f"{type(model).__name__} has {len(found)} first layers ({names}); use find_first_layers(model)."
        )
    return found[0]


def resolve_targets(
    model: nn.Module, target: Optional[Union[str, Sequence[str]]], example_inputs: Optional[ExampleInputs] = None
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``apply_tract`` patches: ``target`` resolved in ``model``, or discovered."""
    if target is None:
        return find_first_layers(model, example_inputs)
    names = [target] if isinstance(target, str) else list(target)
    if not names:
        raise ValueError("target must be a dotted module name or a non-empty list of them.")
    resolved = []
    for name in names:
        try:
            resolved.append((name, model.get_submodule(name)))
        except AttributeError as exc:
            raise ValueError(f"target {name!r} is not a submodule of {type(model).__name__}: {exc}") from None
    return resolved
