"""Patch-whitening initialisation of a first conv layer (the CIFAR-10 speedruns' trick, as in airbench)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["whiten_first_layer"]


@torch.no_grad()
def whiten_first_layer(layer: torch.nn.Conv2d, inputs: torch.Tensor, eps: float = 5e-4) -> None:
    """Sets `layer`'s weight to the whitening filters of the patches of `inputs`, its bias to zero.

    The filters are the eigenvectors of the uncentred patch covariance `AᵀA/N` (every kernel-sized patch,
    stride 1, as airbench computes it), each scaled by `1/sqrt(eigenvalue + eps)`, leading eigenvalue first.
    airbench's layer has `2n` output channels (each filter and its negation); a layer with another width gets
    the `n` filters, then negated copies of the leading ones, cycling until its output channels are filled
    (a layer narrower than `n` keeps the leading filters only).

    Args:
        layer (`torch.nn.Conv2d`): the first layer (weight `(out, in, kh, kw)`).
        inputs (`torch.Tensor`): preprocessed training images `(N, in, H, W)`.
        eps (`float`): added to the eigenvalues (airbench: 5e-4).
    """
    out_channels, in_channels, kh, kw = layer.weight.shape
    n = in_channels * kh * kw
    gram, rows_seen = torch.zeros(n, n, dtype=torch.float64, device=inputs.device), 0
    for chunk in inputs.split(256):  # bounded memory: 256 images' patches at a time
        patches = F.unfold(chunk.float(), (kh, kw)).transpose(1, 2).reshape(-1, n).double()
        gram += patches.T @ patches
        rows_seen += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram / rows_seen)
    order = eigenvalues.argsort(descending=True)
    filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + eps)).T  # (n, n), one filter per row
    rows = [filters[i % n] * (-1) ** (i // n) for i in range(out_channels)]
    layer.weight.copy_(torch.stack(rows).reshape(out_channels, in_channels, kh, kw).to(layer.weight))
    if layer.bias is not None:
        layer.bias.zero_()
