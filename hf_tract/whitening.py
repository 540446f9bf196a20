"""`whiten_first_layer`: initialise the first conv layer from the data by patch whitening.

The CIFAR-10 speedruns' trick (airbench): the filters of the first layer are the eigenvectors of the covariance of
the training images' patches, each scaled by `1/sqrt(eigenvalue + eps)`, so that the layer's outputs start
decorrelated with unit variance. On the benchmark ViT, with the learning rate chosen for each initialisation,
whitening plus TrAct had the best mean of whitening alone, TrAct alone and the plain model (README "Does it help?").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .targets import find_first_layer
from .wrappers import unwrap_model


__all__ = ["whiten_first_layer"]


def _image_batches(images: torch.Tensor | Iterable[Any]) -> Iterable[torch.Tensor]:
    """Image tensors from a tensor, or from the batches of a data loader (tensors, `(images, labels)`, or dicts
    with `pixel_values`)."""
    if isinstance(images, torch.Tensor):
        yield images
        return
    for batch in images:
        if isinstance(batch, Mapping):
            batch = batch["pixel_values"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                "whiten_first_layer needs image tensors: a tensor (N, C, H, W), or batches that are tensors, "
                f"(images, labels) pairs or dicts with 'pixel_values'; got a batch of type {type(batch).__name__}."
            )
        yield batch


@torch.no_grad()
def whiten_first_layer(
    model: nn.Module,
    images: torch.Tensor | Iterable[Any],
    *,
    target: str | None = None,
    eps: float = 5e-4,
    max_images: int = 5000,
    stride: int | tuple[int, int] | None = None,
) -> str:
    """
    Set the first layer's weight to the patch-whitening filters of `images` and its bias to zero.

    The filters are the eigenvectors of the uncentred patch covariance `AᵀA/N` (the patches the layer sees: its
    kernel, padding and stride), each scaled by `1/sqrt(eigenvalue + eps)`, leading eigenvalue first. With
    `n = in_channels · kh · kw` filters for `out_channels` channels, a wider layer gets the `n` filters and then
    negated copies of the leading ones (airbench's layer holds each filter and its negation), cycling until it is
    filled; a narrower one keeps the leading filters. Call it before training (with DDP, before the model is
    wrapped: DDP then copies rank 0's weights to every process); it works on a model patched with TrAct or not.
    To freeze the layer as airbench does, set `requires_grad_(False)` on its weight afterwards.

    Args:
        model (`nn.Module`): The model; its first layer (found like [`apply_tract`] finds it, or `target`) must be
            an `nn.Conv2d` without groups or dilation.
        images (`torch.Tensor` or iterable): Preprocessed training images `(N, C, H, W)` as the model receives
            them (normalised), or a data loader of such batches (tensors, `(images, labels)`, or dicts with
            `pixel_values`). Unaugmented images are what airbench uses.
        target (`str`, *optional*): Dotted name of the layer to whiten; default: discovery.
        eps (`float`, *optional*, defaults to 5e-4): Added to the eigenvalues (airbench's value).
        max_images (`int`, *optional*, defaults to 5000): At most this many images are read.
        stride (`int` or `tuple`, *optional*): Stride of the patches; default the layer's own. The benchmark uses 1
            (every patch, as airbench, whose layer has stride 1).

    Returns:
        `str`: The name of the whitened layer.

    Example:

    ```python
    >>> from hf_tract import apply_tract, whiten_first_layer
    >>> whiten_first_layer(model, train_pixel_values[:5000])  # e.g. 'vit.embeddings.patch_embeddings.projection'
    >>> apply_tract(model)
    ```
    """
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0, got {eps}.")
    if max_images < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}.")
    model = unwrap_model(model)
    name, layer = (target, model.get_submodule(target)) if target is not None else find_first_layer(model)
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.dilation != (1, 1):
        raise TypeError(
            f"whiten_first_layer whitens an nn.Conv2d without groups or dilation; `{name}` is {type(layer).__name__}"
            + (f" (groups={layer.groups}, dilation={layer.dilation})" if isinstance(layer, nn.Conv2d) else "")
            + ". Pass `target=` to name another layer."
        )
    if isinstance(layer.padding, str):
        raise TypeError(f"whiten_first_layer needs numeric padding; `{name}` has padding={layer.padding!r}.")
    out_channels, in_channels, kh, kw = layer.weight.shape
    n = in_channels * kh * kw
    device = layer.weight.device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    rows_seen, images_seen = 0, 0
    for batch in _image_batches(images):
        if batch.ndim != 4 or batch.shape[1] != in_channels:
            raise ValueError(
                f"`images` must be (N, {in_channels}, H, W) for `{name}` ({in_channels} input channels); got a batch "
                f"of shape {tuple(batch.shape)}."
            )
        batch = batch[: max_images - images_seen].to(device)
        images_seen += len(batch)
        for chunk in batch.split(256):  # bounded memory: 256 images' patches at a time
            patches = F.unfold(chunk.float(), (kh, kw), padding=layer.padding, stride=stride or layer.stride)
            patches = patches.transpose(1, 2).reshape(-1, n).double()
            gram += patches.T @ patches
            rows_seen += len(patches)
        if images_seen >= max_images:
            break
    if rows_seen == 0:
        raise ValueError("whiten_first_layer got no images.")
    eigenvalues, eigenvectors = torch.linalg.eigh(gram / rows_seen)
    order = eigenvalues.argsort(descending=True)
    filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order].clamp(min=0) + eps)).T  # one filter per row
    rows = [filters[i % n] * (-1) ** (i // n) for i in range(out_channels)]
    layer.weight.copy_(torch.stack(rows).reshape(out_channels, in_channels, kh, kw).to(layer.weight))
    if layer.bias is not None:
        layer.bias.zero_()
    return name
