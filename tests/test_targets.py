"""Which layer(s) apply_tract patches: find_first_layer(s), resolve_targets and their errors."""


import warnings

import pytest
import torch
import torch.nn as nn

from hf_tract import (
    apply_tract,
    find_first_layer,
    find_first_layers,
    is_tract_applied,
    tract_layers,
)
from hf_tract.targets import FirstLayerNotFoundError, resolve_targets

from tests.conftest import FIRST_LAYER
from tests.conftest import tiny_rgb_vit as tiny_vit


def test_find_first_layer_without_patching():
    model = tiny_vit()
    name, module = find_first_layer(model)
    assert name == FIRST_LAYER and module is model.vit.embeddings.patch_embeddings.projection
    assert not is_tract_applied(model)


def test_probe_finds_first_layer_of_unknown_model():
    class TwoStems(nn.Module):
        """Parallel convs on the pixels, then a head: both are first layers."""

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first, called last
            self.left = nn.Conv2d(1, 4, 3)
            self.right = nn.Conv2d(1, 4, 5, padding=1)

        def forward(self, x):
            x = x * 2 - 1
            features = torch.cat([self.left(x).mean((2, 3)), self.right(x).mean((2, 3))], dim=1)
            return self.head(features)

    model = TwoStems()
    found = [name for name, _ in find_first_layers(model, example_inputs=torch.randn(1, 1, 8, 8))]
    assert found == ["left", "right"]
    apply_tract(model, example_inputs=torch.randn(1, 1, 8, 8))
    assert sorted(tract_layers(model)) == ["left", "right"]


def test_unknown_target_names_the_model():
    with pytest.raises(ValueError, match="not a submodule"):
        apply_tract(tiny_vit(), target="vit.nope")


def test_no_first_layer_lists_candidates():
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(FirstLayerNotFoundError, match="target="):
        apply_tract(model, example_inputs=torch.randn(1, 3))


@pytest.mark.parametrize("empty", ["", [], [""], "  "])
def test_empty_target_is_a_value_error(empty):
    with pytest.raises(ValueError, match="names no layer; leave it unset"):
        resolve_targets(tiny_vit(), empty)


def test_unknown_target_suggests_close_names_and_the_first_layer():
    with pytest.raises(ValueError) as info:
        resolve_targets(tiny_vit(), "vit.embeddings.patch_embedding.projection")
    message = str(info.value)
    assert "not a submodule of ViTForImageClassification" in message
    assert "Closest names: 'vit.embeddings.patch_embeddings.projection'" in message
    assert "The layer that consumes the pixels is 'vit.embeddings.patch_embeddings.projection'" in message


def test_unknown_target_message_survives_failing_discovery():
    model = nn.Sequential(nn.Flatten(), nn.Identity())  # no first layer anywhere
    with pytest.raises(ValueError, match="not a submodule of Sequential"):
        resolve_targets(model, "conv")


def test_target_that_does_not_consume_the_pixels_warns_with_the_real_first_layer():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="first layer is 'vit.embeddings.patch_embeddings.projection'"):
        resolved = resolve_targets(model, "classifier")
    assert [name for name, _ in resolved] == ["classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_targets(model, "vit.embeddings.patch_embeddings.projection")


def test_target_check_uses_the_probe_on_small_unknown_models():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match="first layer is '0'"):
        resolve_targets(model, "2")
