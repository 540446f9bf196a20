"""Independent references for tests: the closed-form TrAct gradient in float64.

The patch matrix ``A`` is obtained from torch's own convolution with one-hot filters (one output
channel per patch coordinate), so it shares no code with ``hf_tract.functional``: padding modes,
string padding, dilation and groups are applied by torch exactly as in the layer.
"""

import math

import torch
import torch.nn as nn


def patch_matrix_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``A`` as ``(groups, N, n)`` for ``layer``'s input ``x`` (float64)."""
    x = x.detach().double()
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    groups = layer.groups
    per_group_in = layer.in_channels // groups
    n = per_group_in * math.prod(layer.kernel_size)
    conv_cls = type(layer)._tract_base_class if hasattr(type(layer), "_tract_base_class") else type(layer)
    extractor = conv_cls(
        layer.in_channels,
        groups * n,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=False,
        padding_mode=layer.padding_mode,
    ).double()
    with torch.no_grad():
        one_hot = torch.eye(n, dtype=torch.float64).reshape(n, per_group_in, *layer.kernel_size)
        extractor.weight.copy_(one_hot.repeat(groups, *([1] * (one_hot.dim() - 1))))
        out = extractor(x if x.dim() == len(layer.kernel_size) + 2 else x.unsqueeze(0))
    out = out.reshape(out.shape[0], groups, n, -1)  # (B, g, n, positions)
    return out.permute(1, 0, 3, 2).reshape(groups, -1, n)


def tract_grad_reference(grad_weight: torch.Tensor, patches: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``grad_W · (A^T A / N + λ I)^-1`` per group, by an explicit float64 inverse."""
    groups, rows, n = patches.shape
    g = grad_weight.double().reshape(groups, grad_weight.shape[0] // groups, n)
    preconditioner = torch.linalg.inv(patches.transpose(1, 2) @ patches / rows + lambda_ * torch.eye(n, dtype=torch.float64))
    return (g @ preconditioner).reshape(grad_weight.shape)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300)).item()
