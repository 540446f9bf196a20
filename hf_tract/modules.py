"""TrAct layers: ``nn.Linear`` / ``nn.ConvNd`` subclasses whose weight gradient is preconditioned.

A patched layer keeps its forward maths exactly: the weight the linear/conv op sees is routed
through :class:`_TrActWeight`, an identity in the forward pass whose backward right-multiplies the
weight gradient by ``(A^T A / N + λ I)^-1``. Every other gradient (input, bias, other parameters)
is produced by the unchanged autograd graph of the plain op, hence bit-identical.

Patching swaps the class of the existing module (``layer.__class__ = TrActConv2d``): object
identity, parameters, state_dict keys and optimizer references are unchanged. Layers whose class
has its own ``forward`` (weight standardisation, dynamic "same" padding, ...) keep it; the conv or
linear op it calls is intercepted, so TrAct preconditions the gradient of the weight that op
actually sees.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .functional import (
    PatchGeometry,
    num_patch_rows,
    patch_gram,
    patch_matrix,
    precondition_with_gram,
    precondition_with_patches,
)

SUPPORTED_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _GramState:
    """What the backward needs about the batch, captured in the forward pass.

    Holds either the Gram (possibly an all-reduce of it still in flight) or, when the batch has
    fewer patch rows than the Gram has columns, the patch matrix itself for the Woodbury form.
    """

    __slots__ = ("gram", "num_rows", "patches", "work")

    def __init__(self, x: torch.Tensor, geometry: PatchGeometry, n: int, sync_group):
        self.gram = self.patches = self.work = None
        self.num_rows = num_patch_rows(x, geometry)
        if sync_group is None and self.num_rows < n:
            self.patches = patch_matrix(x, geometry)
            return
        self.gram = patch_gram(x, geometry)
        if sync_group is not None:
            # One buffer for Gram and row count: a single all-reduce, started now so it overlaps
            # with the rest of the forward and the backward of the layers above.
            buffer = torch.cat([self.gram.reshape(-1), self.gram.new_tensor([self.num_rows])])
            self.work = dist.all_reduce(buffer, group=sync_group, async_op=True)
            self.gram, self.num_rows = buffer[:-1].view_as(self.gram), buffer[-1]

    def precondition(self, grad_weight: torch.Tensor, lambda_: float, solve_dtype) -> torch.Tensor:
        if self.patches is not None:
            return precondition_with_patches(grad_weight, self.patches, lambda_, solve_dtype)
        if self.work is not None:
            self.work.wait()
        return precondition_with_gram(grad_weight, self.gram, self.num_rows, lambda_, solve_dtype)


class _TrActWeight(torch.autograd.Function):
    """Identity on the weight; backward preconditions the weight gradient with the batch's Gram."""

    @staticmethod
    def forward(ctx, weight, state, lambda_, solve_dtype):
        ctx.state, ctx.lambda_, ctx.solve_dtype = state, lambda_, solve_dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        state, ctx.state = ctx.state, None  # free the Gram as soon as it is used
        return state.precondition(grad_weight, ctx.lambda_, ctx.solve_dtype), None, None, None


def _sync_group(layer: nn.Module):
    if not layer.tract_sync_gram or not (dist.is_available() and dist.is_initialized()):
        return None
    group = layer.tract_sync_gram if not isinstance(layer.tract_sync_gram, bool) else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def tract_weight(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    """``weight`` as seen by the op of ``layer``, with the TrAct backward attached."""
    state = _GramState(x, geometry, weight[0].numel(), _sync_group(layer))
    return _TrActWeight.apply(weight, state, layer.tract_lambda, layer.tract_solve_dtype)


def _tract_active(layer: nn.Module) -> bool:
    # Eval mode, no_grad and frozen weights take the plain path: exactly the plain layer's cost.
    return layer.training and torch.is_grad_enabled() and layer.weight.requires_grad


class TrActLayerMixin:
    """Marker and shared attributes of patched layers.

    Attributes set by :func:`hf_tract.apply_tract`: ``tract_lambda`` (λ), ``tract_sync_gram``
    (False, True, or a process group), ``tract_solve_dtype`` (None = float64).
    The class it replaced is ``type(layer)._tract_base_class``.
    """

    _tract_base_class: type
    tract_lambda: float
    tract_sync_gram = False
    tract_solve_dtype: Optional[torch.dtype] = None


class _TrActConvMixin(TrActLayerMixin):
    def _conv_forward(self, input, weight, bias):
        if _tract_active(self):
            geometry = PatchGeometry.conv(
                self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.padding_mode
            )
            weight = tract_weight(self, weight, input, geometry)
        return super()._conv_forward(input, weight, bias)


class _TrActLinearMixin(TrActLayerMixin):
    def forward(self, input):
        weight = tract_weight(self, self.weight, input, PatchGeometry.linear()) if _tract_active(self) else self.weight
        return F.linear(input, weight, self.bias)


class TrActLinear(_TrActLinearMixin, nn.Linear):
    """``nn.Linear`` (any leading dims) with the TrAct weight gradient."""

    _tract_base_class = nn.Linear


class TrActConv1d(_TrActConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with the TrAct weight gradient."""

    _tract_base_class = nn.Conv1d


class TrActConv2d(_TrActConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with the TrAct weight gradient."""

    _tract_base_class = nn.Conv2d


class TrActConv3d(_TrActConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with the TrAct weight gradient."""

    _tract_base_class = nn.Conv3d


_CONV_OPS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _op_arguments(func, args, kwargs):
    """The call's arguments by name, and the patch geometry they define, for a conv/linear functional call."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if func is F.linear:
        geometry = PatchGeometry.linear()
    else:
        weight = bound["weight"]
        geometry = PatchGeometry.conv(
            weight.shape[2:],
            bound.get("stride", 1),
            bound.get("padding", 0),
            bound.get("dilation", 1),
            bound.get("groups", 1),
        )
    return bound, geometry


class _InterceptLayerOps(TorchFunctionMode):
    """Routes the weight of every conv/linear op called inside one layer's forward through TrAct."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func in _CONV_OPS:
            bound, geometry = _op_arguments(func, args, kwargs)
            bound["weight"] = tract_weight(self.layer, bound["weight"], bound["input"], geometry)
            return func(**bound)
        return func(*args, **kwargs)


class _TrActCustomForwardMixin(TrActLayerMixin):
    def forward(self, *args, **kwargs):
        if not _tract_active(self):
            return super().forward(*args, **kwargs)
        with _InterceptLayerOps(self):
            return super().forward(*args, **kwargs)


_STATIC_CLASSES = {cls._tract_base_class: cls for cls in (TrActLinear, TrActConv1d, TrActConv2d, TrActConv3d)}


def _supported_base(cls: type) -> Optional[type]:
    for base in SUPPORTED_LAYER_TYPES:
        if issubclass(cls, base):
            return base
    return None


@functools.lru_cache(maxsize=None)
def tract_class_for(cls: type) -> type:
    """The TrAct class that replaces ``cls`` (a subclass of a supported layer type).

    Plain torch classes map to the importable :class:`TrActLinear` / :class:`TrActConv2d` / ...;
    subclasses get a class made once per subclass, keeping their own ``forward``.
    """
    if cls in _STATIC_CLASSES:
        return _STATIC_CLASSES[cls]
    base = _supported_base(cls)
    if base is None or issubclass(cls, TrActLayerMixin):
        raise TypeError(f"{cls.__name__} is not a supported layer type")
    if cls.forward is not base.forward:
        mixin = _TrActCustomForwardMixin
    else:
        mixin = _TrActLinearMixin if base is nn.Linear else _TrActConvMixin
    return type(f"TrAct{cls.__name__}", (mixin, cls), {"_tract_base_class": cls, "__module__": cls.__module__})
