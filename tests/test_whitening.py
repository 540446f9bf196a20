"""`whiten_first_layer`: the patch-whitening initialisation of the first layer."""

import pytest
import torch

from hf_tract import apply_tract, find_first_layer, whiten_first_layer

from tests.conftest import FIRST_LAYER, tiny_vit


class _ConvNet(torch.nn.Module):
    def __init__(self, out_channels: int = 12, **conv):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, out_channels, 3, bias=True, **conv)
        self.head = torch.nn.Linear(out_channels, 2)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def _images(n: int = 64) -> torch.Tensor:
    return (torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(0)) @ torch.randn(12, 12)).contiguous()


def test_whitened_outputs_are_white():
    images, model = _images(), _ConvNet()
    assert whiten_first_layer(model, images, eps=0.0) == "stem"
    out = model.stem(images).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out[:, :9].T @ out[:, :9] / len(out)  # the n = 9 whitening filters: identity covariance (uncentred)
    assert torch.allclose(cov, torch.eye(9, dtype=torch.float64), atol=1e-3)
    weight = model.stem.weight
    assert torch.allclose(weight[9:], -weight[:3]) and not model.stem.bias.any()  # negated leading filters fill the rest
    narrow = _ConvNet(out_channels=4)
    whiten_first_layer(narrow, images, eps=0.0)
    assert torch.allclose(narrow.stem.weight.abs(), weight[:4].abs(), atol=1e-5)  # the leading filters (up to sign)


def test_patches_follow_the_layer_or_the_given_stride():
    images = _images()
    strided, every = _ConvNet(stride=3, padding=1), _ConvNet(stride=3, padding=1)
    whiten_first_layer(strided, images, eps=0.0)  # the patches the layer sees: stride 3, padding 1
    out = strided.stem(images).permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert torch.allclose(out[:, :9].T @ out[:, :9] / len(out), torch.eye(9, dtype=torch.float64), atol=1e-3)
    whiten_first_layer(every, images, eps=0.0, stride=1)
    assert not torch.allclose(every.stem.weight, strided.stem.weight)


def test_data_loader_batches_and_max_images():
    images = _images(96)
    reference, from_loader, first_half = _ConvNet(), _ConvNet(), _ConvNet()
    whiten_first_layer(reference, images)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(96)), batch_size=40)
    whiten_first_layer(from_loader, pairs)
    assert torch.allclose(from_loader.stem.weight, reference.stem.weight, atol=1e-5)  # other summation order only
    dicts = [{"pixel_values": images[:40]}, {"pixel_values": images[40:]}]
    whiten_first_layer(first_half, dicts, max_images=48)
    whiten_first_layer(reference, images[:48])
    assert torch.allclose(first_half.stem.weight, reference.stem.weight, atol=1e-5)


def test_vit_patch_embedding_before_or_after_tract():
    images = torch.randn(32, 1, 16, 16)
    model, patched = tiny_vit(), apply_tract(tiny_vit())
    assert whiten_first_layer(model, images) == whiten_first_layer(patched, images) == FIRST_LAYER
    assert torch.equal(model.get_submodule(FIRST_LAYER).weight, patched.get_submodule(FIRST_LAYER).weight)
    assert find_first_layer(patched)[0] == FIRST_LAYER and patched(pixel_values=images).logits.isfinite().all()


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match="Pass `target=`"):
        whiten_first_layer(_ConvNet(), _images(), target="head")
    with pytest.raises(TypeError, match="groups=2"):
        whiten_first_layer(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2)), torch.randn(4, 2, 8, 8), target="0")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        whiten_first_layer(_ConvNet(), torch.randn(4, 3, 12, 12))
    with pytest.raises(TypeError, match="pixel_values"):
        whiten_first_layer(_ConvNet(), [[1, 2]])
    with pytest.raises(ValueError, match="no images"):
        whiten_first_layer(_ConvNet(), [])
