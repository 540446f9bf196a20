"""Patch geometry of a first layer, and what TrAct costs on it per training step.

A layer `z = W a` sees its input as the rows `a` of a patch matrix `A` (N rows, n columns): for a
linear layer the rows are the input's last dimension; for a convolution they are the receptive
fields (one per output position and image), one matrix per group. [`PatchGeometry`] says how a
layer forms these rows; [`gram_size`], [`PatchGeometry.num_rows`] and [`step_cost`] are the shape
arithmetic that the layers, `hf-tract inspect` and the benchmarks share. The tensor maths on the
patches lives in `hf_tract.functional`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

from torch import nn


__all__ = ["PaddingArg", "PatchGeometry", "StepCost", "gram_size", "step_cost"]

PaddingArg = Union[str, int, Sequence[int]]


@dataclass(frozen=True)
class PatchGeometry:
    """How a layer turns its input into patch rows.

    `spatial_dims == 0` means a linear layer (the rows are the input's last dimension).
    Convolution attributes use the `torch.nn.ConvNd` conventions; `padding` may be a string
    (`"same"` / `"valid"`) or one int per spatial dimension.

    Args:
        spatial_dims (`int`, *optional*, defaults to `0`): 0 for a linear layer, else the convolution's 1, 2 or 3.
        kernel_size (`tuple[int, ...]`): Kernel size per spatial dimension.
        stride (`tuple[int, ...]`): Stride per spatial dimension.
        padding (`str` or `tuple[int, ...]`): `"same"`, `"valid"` or the padding per spatial dimension.
        dilation (`tuple[int, ...]`): Dilation per spatial dimension.
        groups (`int`, *optional*, defaults to `1`): Convolution groups; there is one patch matrix per group.
        padding_mode (`str`, *optional*, defaults to `"zeros"`): `"zeros"`, `"reflect"`, `"replicate"` or `"circular"`.
    """

    spatial_dims: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Union[str, tuple[int, ...]] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def linear(cls) -> "PatchGeometry":
        """The geometry of a linear layer: each input vector (last dimension) is one patch row."""
        return cls()

    @classmethod
    def conv(
        cls,
        kernel_size: Sequence[int],
        stride: Union[int, Sequence[int]] = 1,
        padding: PaddingArg = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "PatchGeometry":
        """The geometry of a convolution with these arguments (ints are expanded to every spatial dimension).

        Args:
            kernel_size (`Sequence[int]`): Kernel size, one entry per spatial dimension (fixes `spatial_dims`).
            stride (`int` or `Sequence[int]`, *optional*, defaults to `1`): As `torch.nn.Conv2d` takes it.
            padding (`str`, `int` or `Sequence[int]`, *optional*, defaults to `0`): As `torch.nn.Conv2d` takes it.
            dilation (`int` or `Sequence[int]`, *optional*, defaults to `1`): As `torch.nn.Conv2d` takes it.
            groups (`int`, *optional*, defaults to `1`): As `torch.nn.Conv2d` takes it.
            padding_mode (`str`, *optional*, defaults to `"zeros"`): As `torch.nn.Conv2d` takes it.

        Returns:
            [`PatchGeometry`]: The geometry, with tuples of ints.
        """
        dims = len(kernel_size)

        def expand(value):
            return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims

        if not isinstance(padding, str):
            padding = expand(padding)
        return cls(dims, tuple(int(k) for k in kernel_size), expand(stride), padding, expand(dilation), int(groups), padding_mode)

    @classmethod
    def of(cls, layer: nn.Module) -> "PatchGeometry":
        """The geometry of an `nn.Linear` or `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` (or a subclass, patched or not).

        The layer's attributes are read as its standard forward uses them. A subclass whose own `forward`
        pads or strides differently is described by the arguments of the op it calls instead (see
        [`PatchGeometry.conv`]).

        Args:
            layer (`nn.Module`): The layer.

        Returns:
            [`PatchGeometry`]: Its geometry.

        Raises:
            TypeError: If `layer` is neither a linear layer nor a 1-3d convolution (transposed ones included).
        """
        if isinstance(layer, nn.Linear):
            return cls.linear()
        if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
            return cls.conv(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
        raise TypeError(f"TrAct supports nn.Linear and nn.Conv1d/2d/3d layers, not {type(layer).__name__}")

    def pad_amounts(self) -> tuple[tuple[int, int], ...]:
        """(left, right) padding per spatial dimension, as the convolution applies it.

        Returns:
            `tuple[tuple[int, int], ...]`: One pair per spatial dimension (`"same"` puts the odd one on the right).
        """
        if self.padding == "valid":
            return tuple((0, 0) for _ in self.kernel_size)
        if self.padding == "same":
            amounts = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                amounts.append((total // 2, total - total // 2))
            return tuple(amounts)
        return tuple((p, p) for p in self.padding)

    def output_size(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Output positions per spatial dimension for an input of `spatial_size` (the convolution's output shape).

        Args:
            spatial_size (`Sequence[int]`): The input's spatial sizes (`()` for a linear layer).

        Returns:
            `tuple[int, ...]`: The output's spatial sizes.
        """
        return tuple(
            (size + left + right - dil * (k - 1) - 1) // s + 1
            for size, (left, right), k, s, dil in zip(
                spatial_size, self.pad_amounts(), self.kernel_size, self.stride, self.dilation
            )
        )

    def num_rows(self, input_shape: Sequence[int]) -> int:
        """N, the number of patch rows for an input of this shape (per group).

        Args:
            input_shape (`Sequence[int]`): Shape of the layer's input: `(..., in_features)` for a linear
                layer, `(B, C, *spatial)` or unbatched `(C, *spatial)` for a convolution.

        Returns:
            `int`: The number of rows of the patch matrix.
        """
        input_shape = tuple(input_shape)
        if self.spatial_dims == 0:
            return math.prod(input_shape[:-1]) if input_shape[-1] else 0
        batch = 1 if len(input_shape) == self.spatial_dims + 1 else input_shape[0]
        return batch * math.prod(self.output_size(input_shape[-self.spatial_dims :]))


def gram_size(layer: nn.Module) -> tuple[int, int]:
    """The size `n` of the layer's `n x n` patch Gram and its number of groups (one Gram per group).

    Args:
        layer (`nn.Module`): An `nn.Linear` or 1-3d convolution.

    Returns:
        `tuple[int, int]`: `(n, groups)`, `n = in_channels / groups * prod(kernel_size)` or `in_features`.

    Raises:
        TypeError: If `layer` is neither a linear layer nor a 1-3d convolution.
    """
    geometry = PatchGeometry.of(layer)
    if geometry.spatial_dims == 0:
        return layer.in_features, 1
    return layer.in_channels // geometry.groups * math.prod(geometry.kernel_size), geometry.groups


@dataclass(frozen=True)
class StepCost:
    """What TrAct adds to one training step on one layer (FLOP counts of dense fp32 products).

    Args:
        n (`int`): Size of each `n x n` patch Gram.
        groups (`int`): Number of Grams (convolution groups).
        patch_rows (`int`): N, the patch rows of one step.
        gram_flops (`int`): FLOPs of the Grams `A^T A`: `2 * groups * N * n^2`.
        solve_flops (`float`): FLOPs of the Cholesky factorisations (`n^3 / 3`) and of the two triangular
            solves for `out / groups` right-hand sides (`2 * n^2 * out / groups`), per group.
        layer_train_flops (`int`): FLOPs of the layer's own forward (`2 * N * n * out`) and backward
            (twice that: input and weight gradients), for comparison.
        gram_bytes (`int`): Memory of the fp32 Grams.
    """

    n: int
    groups: int
    patch_rows: int
    gram_flops: int
    solve_flops: float
    layer_train_flops: int
    gram_bytes: int


def step_cost(layer: nn.Module, patch_rows: int) -> StepCost:
    """The extra work of TrAct on `layer` in a step with `patch_rows` patch rows.

    Args:
        layer (`nn.Module`): An `nn.Linear` or 1-3d convolution.
        patch_rows (`int`): N for the whole step (e.g. batch size x [`PatchGeometry.num_rows`] of one image).

    Returns:
        [`StepCost`]: FLOPs and memory.

    Raises:
        TypeError: If `layer` is neither a linear layer nor a 1-3d convolution.
    """
    n, groups = gram_size(layer)
    out_per_group = layer.weight.shape[0] // groups
    return StepCost(
        n=n,
        groups=groups,
        patch_rows=patch_rows,
        gram_flops=2 * groups * patch_rows * n * n,
        solve_flops=groups * (n**3 / 3 + 2 * n * n * out_per_group),
        layer_train_flops=6 * patch_rows * n * out_per_group * groups,
        gram_bytes=4 * groups * n * n,
    )
