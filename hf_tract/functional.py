"""The math of TrAct: patch Gram matrices and the preconditioned first-layer weight gradient.

Notation (paper, Eq. 10): for a layer `z = W a` applied to the rows `a` of the patch matrix
`A` (N rows, n columns), TrAct replaces the weight gradient `grad_W` by

    grad_W · (A^T A / N + λ I)^-1

For a convolution, the rows of `A` are the receptive fields (one per output position and image),
flattened in the weight's `(in_channels / groups, *kernel_size)` order, with one matrix per group.

Everything here is pure tensor code without host synchronisation: Gram and solve run in float32
(float64 for float64 inputs) whatever autocast or the parameter dtype says.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .config import FLOAT32_REFINED
from .geometry import PatchGeometry


__all__ = [
    "CPU_FLOAT32_SOLVE_MAX_CONDITION",
    "DEFAULT_CHUNK_ELEMENTS",
    "FLOAT32_REFINED",  # re-exported from hf_tract.config, where the solve-dtype choices live
    "PatchGeometry",  # re-exported: the geometry the functions here take (defined in hf_tract.geometry)
    "default_solve_dtype",
    "gram_dtype",
    "num_patch_rows",
    "patch_gram",
    "patch_matrix",
    "precondition_with_gram",
    "precondition_with_patches",
    "refined_cholesky_solve",
    "weight_gradient",
]

# Upper bound on the elements of the patch-matrix chunk materialised at once when computing the
# Gram of a general convolution (2**25 float32 values = 128 MiB), so the extra memory stays bounded
# whatever the batch and image size.
DEFAULT_CHUNK_ELEMENTS = 2**25


def gram_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half types have no linalg kernels)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _padded_input(x: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    amounts = geometry.pad_amounts()
    if not any(left or right for left, right in amounts):
        return x
    # F.pad takes the last dimension first.
    flat = [p for pair in reversed(amounts) for p in pair]
    if geometry.padding_mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=geometry.padding_mode)


def _patch_view(x: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    """Strided view `(B, C, *out_positions, *kernel)` of the receptive fields (no copy)."""
    x = _padded_input(x, geometry)
    d = geometry.spatial_dims
    for axis, (k, s, dil) in enumerate(zip(geometry.kernel_size, geometry.stride, geometry.dilation)):
        x = x.unfold(2 + axis, dil * (k - 1) + 1, s)
    if any(dil != 1 for dil in geometry.dilation):
        index = (slice(None),) * (2 + d) + tuple(slice(None, None, dil) for dil in geometry.dilation)
        x = x[index]
    return x


def _unbatched_to_batched(x: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    # Conv layers accept unbatched (C, *spatial) input.
    return x.unsqueeze(0) if x.dim() == geometry.spatial_dims + 1 else x


def _conv_patch_chunks(x: torch.Tensor, geometry: PatchGeometry, chunk_elements: int):
    """Yield `(images, A^T)` over chunks of the batch: the chunk's images (a slice of the batch) and its
    transposed patch matrix `A^T` as `(groups, n, rows)`.

    Columns are output positions, rows follow the weight layout `(in/groups, *kernel)`. This
    layout (patch coordinate major) makes both the gather copy and the Gram product `A^T A`
    faster than the row-major `(rows, n)` one (CPU, 1 thread: 5x for a 3x3 stem on 1-channel
    28x28 images, 2x on 3-channel 32x32, equal for ViT patchify).
    """
    x = _unbatched_to_batched(x, geometry)
    d, g = geometry.spatial_dims, geometry.groups
    view = _patch_view(x, geometry)  # (B, C, *out, *k)
    batch, channels = view.shape[:2]
    out_shape = view.shape[2 : 2 + d]
    per_image = math.prod(out_shape) * channels * math.prod(geometry.kernel_size)
    step = max(1, min(batch, chunk_elements // max(per_image, 1)))
    view = view.unflatten(1, (g, channels // g))  # (B, g, C/g, *out, *k)
    order = (1, 2, *range(3 + d, 3 + 2 * d), 0, *range(3, 3 + d))  # (g, C/g, *k, B, *out)
    n = channels // g * math.prod(geometry.kernel_size)
    for start in range(0, batch, step):
        images = slice(start, start + step)
        yield images, view[images].permute(order).reshape(g, n, -1)


def patch_matrix(x: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    """The full patch matrix `A` as `(groups, N, n)` in the Gram dtype.

    Materialises every patch: use it for small N (the Woodbury path) and in tests.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(gram_dtype(x))
        if geometry.spatial_dims == 0:
            return x.reshape(1, -1, x.shape[-1])
        chunks = _conv_patch_chunks(x, geometry, chunk_elements=x.numel() * math.prod(geometry.kernel_size))
        return torch.cat([chunk for _, chunk in chunks], dim=2).transpose(1, 2)


def num_patch_rows(x: torch.Tensor, geometry: PatchGeometry) -> int:
    """N, the number of rows of the patch matrix (computed from shapes only, see [`PatchGeometry.num_rows`])."""
    return geometry.num_rows(x.shape)


def patch_gram(
    x: torch.Tensor, geometry: PatchGeometry, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Unnormalised Gram `A^T A` of the layer's input patches, shape `(groups, n, n)`.

    Accumulated in float32 (float64 for float64 input) with autocast disabled. General
    convolutions are unfolded in chunks of at most `chunk_elements` values.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach()
        dtype = gram_dtype(x)
        if geometry.spatial_dims == 0:
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            return (rows.T @ rows).unsqueeze(0)
        gram = None
        for _, chunk in _conv_patch_chunks(x, geometry, chunk_elements):
            chunk = chunk.to(dtype)
            part = torch.bmm(chunk, chunk.transpose(1, 2))
            gram = part if gram is None else gram.add_(part)
        return gram


def weight_gradient(
    grad_output: torch.Tensor, x: torch.Tensor, geometry: PatchGeometry, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """The plain weight gradient `grad_Z^T A` of a linear / conv op, formed from its input at full precision.

    Under autocast the op's own backward forms this product from the half-precision copy of the input, and the
    preconditioner amplifies that rounding along the Gram's weak directions; here the input keeps its own
    precision, the upstream gradient is used as it is (it is exactly representable in float32), and the
    products are accumulated in float32 (float64 for float64 input) with autocast disabled. General
    convolutions are unfolded in chunks of the batch, as for the Gram (see [`patch_gram`]).

    Args:
        grad_output (`torch.Tensor`): Gradient of the op's output: `(..., out)`, or `(B, out, *positions)` /
            unbatched `(out, *positions)` for a convolution.
        x (`torch.Tensor`): The op's input (before any padding the geometry describes).
        geometry (`PatchGeometry`): How the op turns `x` into patch rows.
        chunk_elements (`int`, *optional*): Upper bound on the patch values materialised at once.

    Returns:
        `torch.Tensor`: The weight gradient, `(out, in)` or `(out, in/groups, *kernel)`, in [`gram_dtype`] of `x`.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach()
        dtype = gram_dtype(x)
        if geometry.spatial_dims == 0:
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            return grad_output.reshape(-1, grad_output.shape[-1]).to(dtype).T @ rows
        x = _unbatched_to_batched(x, geometry)
        grad_output = _unbatched_to_batched(grad_output, geometry)
        g, out_channels = geometry.groups, grad_output.shape[1]
        grad = None
        for images, chunk in _conv_patch_chunks(x, geometry, chunk_elements):
            # Columns in the chunk's row order (image major, then output positions), per group.
            upstream = grad_output[images].unflatten(1, (g, out_channels // g)).flatten(3).permute(1, 2, 0, 3)
            part = torch.bmm(upstream.reshape(g, out_channels // g, -1).to(dtype), chunk.to(dtype).transpose(1, 2))
            grad = part if grad is None else grad.add_(part)
        return grad.reshape(out_channels, x.shape[1] // g, *geometry.kernel_size)


def _grouped(grad_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """`(out, in/groups, *k)` -> `(groups, out/groups, n)`."""
    return grad_weight.reshape(groups, grad_weight.shape[0] // groups, -1)


# Default solve precision on CPU: float32 when the a-priori bound on the condition number of
# G/N + λI keeps the solve's relative error (about bound * 2**-24) below 1e-3 — standardised inputs
# of first layers up to n ≈ 1600 — and float64 otherwise (e.g. pixels in [0, 255]).
CPU_FLOAT32_SOLVE_MAX_CONDITION = 2**24 * 1e-3


def default_solve_dtype(gram: torch.Tensor, num_rows: Union[int, torch.Tensor], lambda_: float) -> torch.dtype:
    """float64, except for a float32 Gram on CPU whose condition bound `1 + trace(G) / (N λ)` is
    small enough for float32 (the eigenvalues of `G/N + λI` lie in `[λ, λ + trace(G)/N]`).

    Reading the trace needs the value on the host: free on CPU, a synchronisation on GPUs, which
    therefore always solve in float64. On CPU a float64 solve costs about twice a float32 one
    (n = 768: 83 ms vs 53 ms, benchmarks/README.md).
    """
    if gram.device.type != "cpu" or gram.dtype != torch.float32 or isinstance(num_rows, torch.Tensor) or not num_rows:
        return torch.float64
    trace = float(gram.diagonal(dim1=1, dim2=2).sum(-1).max())
    bound = 1.0 + trace / (num_rows * lambda_)
    return torch.float32 if bound <= CPU_FLOAT32_SOLVE_MAX_CONDITION else torch.float64


def precondition_with_gram(
    grad_weight: torch.Tensor,
    gram: torch.Tensor,
    num_rows: Union[int, torch.Tensor],
    lambda_: float,
    solve_dtype: Union[torch.dtype, str, None] = None,
) -> torch.Tensor:
    """`grad_W · (G / N + λ I)^-1` for each group, via a Cholesky solve.

    Args:
        grad_weight (`torch.Tensor`): Plain weight gradient, `(out, in/groups, *kernel)` or `(out, in)`.
        gram (`torch.Tensor`): Unnormalised Gram `A^T A`, `(groups, n, n)`.
        num_rows (`int` or `torch.Tensor`): N (a 0-d tensor when it was all-reduced).
        lambda_ (`float`): The TrAct regulariser λ > 0.
        solve_dtype (`torch.dtype`, *optional*): dtype of the factorisation; default [`default_solve_dtype`]
            (float64 on GPUs; on CPU float32 when provably accurate). The regularised Gram's eigenvalues are
            at least λ, but its largest grow with the input scale: float64 keeps un-standardised
            inputs (e.g. pixels in [0, 255]) solvable. float32 is a documented speed option.
            [`FLOAT32_REFINED`] (`"float32_refined"`): a float32 factorisation and one step of iterative
            refinement with the residual in float64 ([`refined_cholesky_solve`]).

    Returns:
        `torch.Tensor`: The TrAct weight gradient, with the dtype and shape of `grad_weight`.

    If the Cholesky factorisation fails, training does not stop:

    - on CPU, where looking at the result costs no device synchronisation, a finite Gram is solved
      again by a float64 eigendecomposition (stable for any symmetric matrix; eigenvalues clamped
      at λ, their exact lower bound);
    - otherwise (a non-finite Gram, or a GPU, where checking would synchronise) the result falls
      back, per group, to the plain gradient scaled by `1 / (trace(G)/(N n) + λ)`, the
      preconditioner with the Gram replaced by its mean eigenvalue.
    """
    groups, n, _ = gram.shape
    refine = solve_dtype == FLOAT32_REFINED
    # The refined solve keeps the system in float64 for its residual and factorises a float32 copy.
    dtype = torch.float64 if refine else solve_dtype or default_solve_dtype(gram, num_rows, lambda_)
    with torch.autocast(grad_weight.device.type, enabled=False):
        eye = torch.eye(n, dtype=dtype, device=gram.device)
        if isinstance(num_rows, torch.Tensor):
            num_rows = num_rows.to(dtype)
        regularized = gram.to(dtype) / num_rows + lambda_ * eye
        rhs = _grouped(grad_weight, groups).to(dtype).transpose(1, 2)  # (g, n, out/g)
        if refine:
            solved, info = refined_cholesky_solve(regularized, rhs)
        else:
            factor, info = torch.linalg.cholesky_ex(regularized)
            solved = torch.cholesky_solve(rhs, factor)
        failed = (info != 0).reshape(groups, 1, 1)
        if gram.device.type == "cpu" and failed.any() and torch.isfinite(regularized).all():
            solved = torch.where(failed, _eigh_solve(regularized, rhs, lambda_).to(solved.dtype), solved)
        else:
            mean_eig = regularized.diagonal(dim1=1, dim2=2).mean(-1).reshape(groups, 1, 1)
            solved = torch.where(failed, rhs / mean_eig, solved)
        return solved.transpose(1, 2).reshape(grad_weight.shape).to(grad_weight.dtype)


def refined_cholesky_solve(
    matrix: torch.Tensor, rhs: torch.Tensor, steps: int = 1, residual_dtype: Optional[torch.dtype] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`matrix^-1 rhs` by a float32 Cholesky factorisation and `steps` steps of iterative refinement.

    Each step computes the residual `rhs - matrix @ x` in `residual_dtype` and adds the float32 solution of the
    correction. The factorisation and triangular solves run in float32 (fast on every GPU); only the residual
    product runs in the higher precision. A residual in float32 does not improve the forward error (its own
    rounding is as large as the residual); `benchmarks/solve_precision.py` measures both. Everything stays on
    the device: no host synchronisation.

    Args:
        matrix (`torch.Tensor`): Symmetric positive definite `(..., n, n)` (its lower triangle is read), in the
            residual's precision.
        rhs (`torch.Tensor`): Right-hand sides `(..., n, k)`.
        steps (`int`, *optional*, defaults to `1`): Refinement steps (0: the plain float32 solve).
        residual_dtype (`torch.dtype`, *optional*): dtype of the residual; default `matrix.dtype`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: The float32 solution and the factorisation's `info` (non-zero where
        it failed, as `torch.linalg.cholesky_ex` returns it).
    """
    residual_dtype = residual_dtype or matrix.dtype
    factor, info = torch.linalg.cholesky_ex(matrix.float())
    solved = torch.cholesky_solve(rhs.float(), factor)
    if steps:
        # The factorisation reads the lower triangle only; a Gram accumulated in float32 is symmetric only up to
        # its rounding (5e-6 relative on 2e5 Fashion-MNIST rows), so the residual uses that same triangle.
        lower = matrix.tril()
        high_matrix, high_rhs = (lower + lower.tril(-1).mT).to(residual_dtype), rhs.to(residual_dtype)
        for _ in range(steps):
            residual = high_rhs - high_matrix @ solved.to(residual_dtype)
            solved = solved + torch.cholesky_solve(residual.float(), factor)
    return solved, info


def _eigh_solve(regularized: torch.Tensor, rhs: torch.Tensor, lambda_: float) -> torch.Tensor:
    """`regularized^-1 rhs` by a float64 eigendecomposition, eigenvalues clamped at λ."""
    eigenvalues, eigenvectors = torch.linalg.eigh(regularized.double())
    inverse_values = 1.0 / eigenvalues.clamp_min(lambda_)
    return eigenvectors @ (inverse_values.unsqueeze(-1) * (eigenvectors.transpose(1, 2) @ rhs.double()))


def precondition_with_patches(
    grad_weight: torch.Tensor,
    patches: torch.Tensor,
    lambda_: float,
    solve_dtype: Union[torch.dtype, str, None] = None,
) -> torch.Tensor:
    """Woodbury form of [`precondition_with_gram`], cheaper when N < n.

    `(A^T A / N + λ I)^-1 = (I - A^T (N λ I + A A^T)^-1 A) / λ`, so only an N×N system is
    solved. `patches` is `A` as `(groups, N, n)`.
    """
    groups, rows, _ = patches.shape
    # The N x N system is small (N < n): float64 also for the refined option.
    dtype = torch.float64 if solve_dtype in (None, FLOAT32_REFINED) else solve_dtype
    with torch.autocast(grad_weight.device.type, enabled=False):
        a = patches.to(dtype)
        g = _grouped(grad_weight, groups).to(dtype)  # (g, out/g, n)
        kernel = a @ a.transpose(1, 2) + (rows * lambda_) * torch.eye(rows, dtype=dtype, device=a.device)
        factor, info = torch.linalg.cholesky_ex(kernel)
        projected = torch.cholesky_solve(a, factor)  # (g, N, n)
        result = (g - (g @ a.transpose(1, 2)) @ projected) / lambda_
        mean_eig = (a * a).sum((1, 2)).reshape(groups, 1, 1) / (rows * a.shape[-1]) + lambda_
        result = torch.where((info == 0).reshape(groups, 1, 1), result, g / mean_eig)
        return result.reshape(grad_weight.shape).to(grad_weight.dtype)
