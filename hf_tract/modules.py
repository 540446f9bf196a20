"""TrAct layers: `nn.Linear` / `nn.ConvNd` subclasses whose weight gradient is preconditioned.

A patched layer keeps its forward maths exactly: the weight the linear/conv op sees is routed
through [`_TrActWeight`], an identity in the forward pass whose backward right-multiplies the
weight gradient by `(A^T A / N + λ I)^-1`. Every other gradient (input, bias, other parameters)
is produced by the unchanged autograd graph of the plain op, hence bit-identical.

Under autocast, when the op runs in a lower precision than its input has, the weight gradient is
instead formed from the full-precision input and then preconditioned (see [`tract_op`]); the op's
output, input and bias gradients are still those of the plain model under autocast.

Patching swaps the class of the existing module (`layer.__class__ = TrActConv2d`): object
identity, parameters, state_dict keys and optimizer references are unchanged. Layers whose class
has its own `forward` (weight standardisation, dynamic "same" padding, ...) keep it; the conv or
linear op it calls is intercepted, so TrAct preconditions the gradient of the weight that op
actually sees.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import TrActConfig
from .functional import (
    num_patch_rows,
    patch_gram,
    patch_matrix,
    precondition_with_gram,
    precondition_with_patches,
    weight_gradient,
)
from .geometry import PatchGeometry


__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "TrActConv1d",
    "TrActConv2d",
    "TrActConv3d",
    "TrActLayerMixin",
    "TrActLinear",
    "tract_class_for",
    "tract_op",
    "tract_weight",
]

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

    def condition_bound(self, lambda_: float) -> torch.Tensor:
        """`1 + trace(G) / (N λ)` (largest over groups): an upper bound on the condition number of
        `G/N + λI`, whose eigenvalues lie in `[λ, λ + trace(G)/N]`. A 0-d tensor, no host sync."""
        if self.patches is not None:
            trace = self.patches.square().sum((1, 2)).max()
        else:
            trace = self.gram.diagonal(dim1=1, dim2=2).sum(-1).max()
        rows = self.num_rows.clamp_min(1) if isinstance(self.num_rows, torch.Tensor) else max(self.num_rows, 1)
        return 1.0 + trace / (rows * lambda_)


def _precondition(state, config: TrActConfig, stats: Optional[list], grad_weight: torch.Tensor) -> torch.Tensor:
    """The TrAct gradient from the plain one; records the logging statistics when asked to."""
    grad = state.precondition(grad_weight, config.lambda_, config.solve_dtype)
    if stats is not None:
        # Only on the steps the Trainer logs (see `TrActLayerMixin.tract_record_stats`): detached
        # 0-d tensors, read on the host when the logs are written.
        stats.append(
            {
                "grad_norm_plain": grad_weight.detach().float().norm(),
                "grad_norm_tract": grad.detach().float().norm(),
                "condition_bound": state.condition_bound(config.lambda_).detach().float(),
            }
        )
    return grad


class _TrActWeight(torch.autograd.Function):
    """Identity on the weight; backward preconditions the weight gradient with the batch's Gram."""

    @staticmethod
    def forward(ctx, weight, state, config, stats):
        ctx.state, ctx.config, ctx.stats = state, config, stats
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        state, ctx.state = ctx.state, None  # free the Gram as soon as it is used
        return _precondition(state, ctx.config, ctx.stats, grad_weight), None, None, None


class _TrActFullPrecisionWeight(torch.autograd.Function):
    """Identity on the output of an op that autocast ran in lower precision, called with a detached weight.

    Its backward passes the output gradient on unchanged (the op's own backward then forms the input and bias
    gradients exactly as in the plain model, but no half-precision weight gradient) and returns as the weight's
    gradient the TrAct one, preconditioning the weight gradient formed from the op's full-precision input.
    """

    @staticmethod
    def forward(ctx, output, weight, x, state, config, stats, geometry):
        ctx.save_for_backward(x)
        ctx.state, ctx.config, ctx.stats, ctx.geometry = state, config, stats, geometry
        ctx.weight_dtype = weight.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        state, ctx.state = ctx.state, None  # free the Gram as soon as it is used
        grad = None
        if ctx.needs_input_grad[1]:
            (x,) = ctx.saved_tensors
            plain = weight_gradient(grad_output, x, ctx.geometry)
            grad = _precondition(state, ctx.config, ctx.stats, plain).to(ctx.weight_dtype)
        return grad_output, grad, None, None, None, None, None


def _autocast_lowers_precision(x: torch.Tensor) -> bool:
    """Whether autocast runs a linear / conv op on `x` in a lower precision than `x` has.

    Autocast casts these ops' floating-point arguments, except float64 ones, to its dtype. A plain bool
    from the autocast state and the dtype: no device synchronisation.
    """
    device_type = x.device.type
    return (
        torch.is_autocast_enabled(device_type)
        and x.is_floating_point()
        and x.dtype != torch.float64
        and x.dtype != torch.get_autocast_dtype(device_type)
    )


def _backward_inputs(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, geometry: PatchGeometry, state):
    """What a TrAct backward needs, captured in the forward: the batch's Gram state, the layer's config, and the
    list the statistics go to on logging steps (`None` otherwise)."""
    config = layer.tract_config
    if state is None:
        state = _GramState(x, geometry, weight[0].numel(), config.sync_group())
    stats = layer.tract_stats if layer.tract_record_stats else None
    return state, config, stats


def tract_weight(
    layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, geometry: PatchGeometry, *, state=None
) -> torch.Tensor:
    """`weight` as seen by the op of `layer`, with the TrAct backward attached.

    This preconditions the weight gradient the op's own backward forms; under autocast, [`tract_op`] forms it
    from the full-precision input instead.

    Args:
        layer (`nn.Module`): The patched layer; its `tract_config` gives λ, the solve dtype and the sync group.
        weight (`torch.Tensor`): The weight the op uses.
        x (`torch.Tensor`): The op's input.
        geometry (`PatchGeometry`): How the op turns its input into patch rows.
        state (*optional*): What the backward uses instead of the default Gram state: any object with
            `precondition(grad_weight, lambda_, solve_dtype)` and `condition_bound(lambda_)` (the seam for
            experiments such as computing the factorisation on a side stream; no caller in the library).

    Returns:
        `torch.Tensor`: `weight` in the forward pass; its gradient is the TrAct one.
    """
    return _TrActWeight.apply(weight, *_backward_inputs(layer, weight, x, geometry, state))


def tract_op(
    layer: nn.Module,
    op: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    x: torch.Tensor,
    geometry: PatchGeometry,
    *,
    state=None,
) -> torch.Tensor:
    """`op(weight)`, the linear / conv op of `layer` on input `x`, with the TrAct weight gradient.

    Without autocast (or when autocast leaves the op's precision as it is) this is `op(tract_weight(...))`.
    When autocast lowers the op's precision (e.g. a float32 input under bf16 autocast), the weight gradient is
    formed from the full-precision input `x` and the (half-precision) output gradient, accumulated in float32
    ([`hf_tract.functional.weight_gradient`]), and then preconditioned: the preconditioner would otherwise
    amplify the input's half-precision rounding along the Gram's weak directions. The op then runs with a
    detached weight, so its backward forms no half-precision weight gradient; its output, input gradient and
    bias gradient are those of the plain model under autocast. `x` is kept for the backward.

    Args:
        layer (`nn.Module`): The patched layer; its `tract_config` gives λ, the solve dtype and the sync group.
        op (`Callable[[torch.Tensor], torch.Tensor]`): The op with every argument but the weight bound.
        weight (`torch.Tensor`): The weight the op uses.
        x (`torch.Tensor`): The op's input.
        geometry (`PatchGeometry`): How the op turns its input into patch rows.
        state (*optional*): As for [`tract_weight`].

    Returns:
        `torch.Tensor`: The op's output.
    """
    if not _autocast_lowers_precision(x):
        return op(tract_weight(layer, weight, x, geometry, state=state))
    state, config, stats = _backward_inputs(layer, weight, x, geometry, state)
    output = op(weight.detach())
    return _TrActFullPrecisionWeight.apply(output, weight, x.detach(), state, config, stats, geometry)


def _tract_active(layer: nn.Module) -> bool:
    # Eval mode, no_grad and frozen weights take the plain path: exactly the plain layer's cost.
    return layer.training and torch.is_grad_enabled() and layer.weight.requires_grad


class TrActLayerMixin:
    """Marker and shared attributes of patched layers.

    Attributes:
        tract_config ([`TrActConfig`]): Set by [`hf_tract.apply_tract`]: λ, sync_gram, solve dtype, and
            `targets`, the names of the layers patched with it. The only TrAct state a layer holds, besides
            the statistics below.
        tract_record_stats (`bool`): When `True`, every backward appends to `tract_stats` a dict of detached
            0-d tensors (`grad_norm_plain`, `grad_norm_tract`, `condition_bound`). Off by default; the
            Trainer turns it on for the steps it logs (`tract_log_stats`).

    `tract_lambda`, `tract_sync_gram` and `tract_solve_dtype` read the config (read-only). The class the
    layer had before patching is `type(layer)._tract_base_class`.
    """

    _tract_base_class: type
    tract_config: TrActConfig
    tract_record_stats: bool = False

    @property
    def tract_stats(self) -> list:
        return self.__dict__.setdefault("_tract_stats", [])

    @property
    def tract_lambda(self) -> float:
        return self.tract_config.lambda_

    @property
    def tract_sync_gram(self):
        return self.tract_config.sync_gram

    @property
    def tract_solve_dtype(self) -> Optional[torch.dtype]:
        return self.tract_config.solve_dtype


class _TrActConvMixin(TrActLayerMixin):
    def _conv_forward(self, input, weight, bias):
        conv = super()._conv_forward
        if not _tract_active(self):
            return conv(input, weight, bias)
        return tract_op(self, lambda w: conv(input, w, bias), weight, input, PatchGeometry.of(self))


class _TrActLinearMixin(TrActLayerMixin):
    def forward(self, input):
        if not _tract_active(self):
            return F.linear(input, self.weight, self.bias)
        return tract_op(self, lambda w: F.linear(input, w, self.bias), self.weight, input, PatchGeometry.of(self))


class TrActLinear(_TrActLinearMixin, nn.Linear):
    """`nn.Linear` (any leading dims) with the TrAct weight gradient."""

    _tract_base_class = nn.Linear


class TrActConv1d(_TrActConvMixin, nn.Conv1d):
    """`nn.Conv1d` with the TrAct weight gradient."""

    _tract_base_class = nn.Conv1d


class TrActConv2d(_TrActConvMixin, nn.Conv2d):
    """`nn.Conv2d` with the TrAct weight gradient."""

    _tract_base_class = nn.Conv2d


class TrActConv3d(_TrActConvMixin, nn.Conv3d):
    """`nn.Conv3d` with the TrAct weight gradient."""

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
            weight = bound.pop("weight")
            return tract_op(self.layer, lambda w: func(weight=w, **bound), weight, bound["input"], geometry)
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
    """The TrAct class that replaces `cls` (a subclass of a supported layer type).

    Plain torch classes map to the importable [`TrActLinear`] / [`TrActConv2d`] / ...;
    subclasses get a class made once per subclass, keeping their own `forward`.
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
