"""The first-layer probe: which Conv / Linear layers consume the pixels, found by one inference forward.

The model runs once in eval mode under `torch.no_grad` on a dummy input ([`hf_tract.probe_inputs`]). A
`TorchFunctionMode` marks every tensor derived from the pixels (views and in-place writes included) except the
outputs of Conv / Linear / Embedding layers; a Conv / Linear whose input is marked is a first layer. No autograd
graph is built and the marks are weak references, so the probe costs one inference forward.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .probe_inputs import WEIGHT_LAYER_TYPES, ExampleInputs, ProbeInput, candidate_inputs, user_inputs


logger = logging.getLogger(__name__)


class FirstLayerNotFoundError(RuntimeError):
    """No first layer could be determined; the message lists candidates and how to pass `target=`."""


_VALUE_FREE = ("size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "is_contiguous", "stride")
# Functions whose other tensor arguments give only a dtype, device or shape: `x.to(pixels)` is not pixels.
_FIRST_ARGUMENT_ONLY = ("to", "type_as", "view_as", "reshape_as", "expand_as")


class _PixelTracker(TorchFunctionMode):
    """Marks the tensors derived from the pixels, without an autograd graph and without keeping any
    tensor alive (weak references): the output of a torch function is marked when one of its inputs
    is (in-place ops and `__setitem__` mark the tensor they write, and its base when it is a view),
    except outputs of weight layers (Conv/Linear/Embedding: unmarked by a forward hook), of
    functions that read only shapes (`*_like`, `new_*`) and of integer / bool results (indices,
    masks: no gradient would flow through them either); `x.to(pixels)` follows `x` only."""

    def __init__(self):
        super().__init__()
        self.marked = WeakIdKeyDictionary()

    def is_marked(self, values) -> bool:
        return any(isinstance(v, torch.Tensor) and v in self.marked for v in tree_leaves(values))

    def mark(self, tensor: torch.Tensor) -> None:
        self.marked[tensor] = True
        base = tensor._base
        if base is not None:
            self.marked[base] = True

    def unmark(self, values) -> None:
        for value in tree_leaves(values):
            if isinstance(value, torch.Tensor):
                self.marked.pop(value, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _VALUE_FREE or name.endswith("_like") or name.startswith("new_"):
            return output
        if self.is_marked(args[:1] if name in _FIRST_ARGUMENT_ONLY else (args, kwargs)):
            for value in tree_leaves(output):
                if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                    self.mark(value)
            written = args[0] if args and (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))) else None
            for value in (written, kwargs.get("out")):
                if isinstance(value, torch.Tensor):
                    self.mark(value)
        return output


class _ConsumerHooks:
    """Forward hooks on every weight layer: record those whose input is marked, unmark their outputs."""

    def __init__(self, model: nn.Module, tracker: _PixelTracker):
        self.tracker = tracker
        self.consumers: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, WEIGHT_LAYER_TYPES):
                self.handles.append(
                    module.register_forward_pre_hook(functools.partial(self._before, name), with_kwargs=True)
                )
                self.handles.append(module.register_forward_hook(self._after, always_call=True))

    def _before(self, name, module, args, kwargs):
        if name not in self.consumers and self.tracker.is_marked((args, kwargs)):
            self.consumers.append(name)

    def _after(self, module, args, output):
        self.tracker.unmark(output)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _probe_once(model: nn.Module, candidate: ProbeInput) -> tuple[list[str], Optional[BaseException]]:
    tracker = _PixelTracker()
    hooks = _ConsumerHooks(model, tracker)
    error = None
    try:
        with torch.no_grad(), tracker:
            for pixels in candidate.pixels:
                tracker.mark(pixels)
            candidate.run(model)
    except Exception as exc:  # noqa: BLE001 - an error after the first layer ran never hides it
        error = exc
    finally:
        hooks.remove()
    return hooks.consumers, error


def probe_first_layers(
    model: nn.Module, example_inputs: Optional[ExampleInputs] = None, *, image_size: Optional[int] = None
) -> list[str]:
    """Names of the weight layers that directly consume the pixels, in call order.

    Runs the model in eval mode under `torch.no_grad` (no autograd graph: the cost of one inference
    forward) on `example_inputs`, or else on the candidates of [`candidate_inputs`] in turn,
    the whole model first and its vision towers alone last. A layer consumes the pixels when its
    input is derived from them by torch functions that do not pass through another Conv / Linear /
    Embedding. A forward that fails after a first layer ran still counts; one that fails earlier,
    or finds nothing, moves on to the next candidate.

    Args:
        model (`nn.Module`): The model.
        example_inputs (`torch.Tensor`, `dict` or `list`, *optional*): The input to use (its
            floating-point tensors are the pixels) instead of dummies.
        image_size (`int`, *optional*): Side of the dummy images (default: what the model says).

    Returns:
        `list[str]`: Dotted names, in the order the layers first ran.

    Raises:
        FirstLayerNotFoundError: If no candidate reached a layer; the message has the last error.
    """
    candidates = [user_inputs(example_inputs, model)] if example_inputs is not None else None
    was_training = model.training
    partial, last_error, tried = None, None, False
    towers: dict[str, list[str]] = {}  # vision towers run alone -> the layers they found
    model.eval()
    try:
        for candidate in candidates or candidate_inputs(model, image_size=image_size):
            path = candidate.module_path
            if path and partial is not None:
                break  # a layer was found on the whole model: towers alone add nothing
            if path and any(path == p or path.startswith(p + ".") for p in towers):
                continue  # this tower (or the one holding it) already answered
            tried = True
            consumers, error = _probe_once(model, candidate)
            if error is not None:
                logger.debug("first-layer probe forward failed: %r", error)
                last_error = error
            if path and consumers:
                towers[path] = consumers
            elif consumers and error is None:
                return consumers
            elif consumers and partial is None:
                partial = consumers
    finally:
        model.train(was_training)
    found = partial or [name for consumers in towers.values() for name in consumers]
    if found:
        return list(dict.fromkeys(found))
    if last_error is not None:
        raise FirstLayerNotFoundError(f"the probe forward failed before any layer consumed the pixels: {last_error!r}")
    reason = "no forward argument takes pixels" if not tried else "no Conv/Linear consumed the pixels"
    raise FirstLayerNotFoundError(f"the probe found no first layer ({reason})")


__all__ = ["FirstLayerNotFoundError", "probe_first_layers"]
