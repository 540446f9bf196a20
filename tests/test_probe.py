"""First-layer discovery on the classes of models the probe used to fail on, built offline from tiny
configs, with the registry and timm metadata off (the probe alone) and on (the default path), and the
errors of ``resolve_targets``.

Each case: the model, the first layer(s) it must find. The probe builds its inputs itself from the
forward signature and the configs (text / task dummies, nested sizes, frames under other names).
"""


import pytest
import torch
import torch.nn as nn

from hf_tract import apply_tract, find_first_layers
from hf_tract.patching import tract_layers
from hf_tract.probe import probe_first_layers

from tests.discovery_cases import CASES, build_case


SLOW = {"torchvision_vit_b_16_at_32px", "grounding_dino_open_vocabulary_detector"}  # ViT-B/16 itself: 86M parameters


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name) for name in CASES]
)
def test_probe_alone_finds_the_first_layers(name):
    model, expected = build_case(name)
    assert [path for path, _ in find_first_layers(model, use_registry=False)] == expected
    # The default path (registry first) agrees, and apply_tract patches exactly these layers.
    assert sorted(path for path, _ in find_first_layers(model)) == sorted(expected)
    apply_tract(model)
    assert sorted(tract_layers(model)) == sorted(expected)


def test_probe_keeps_no_autograd_graph_and_restores_the_mode():
    model, _ = build_case("user_wrapper_at_48px")
    model.train()
    seen = []
    layer = model.encoder.embeddings.patch_embeddings.projection
    handle = layer.register_forward_hook(lambda m, a, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    try:
        assert probe_first_layers(model) == ["encoder.embeddings.patch_embeddings.projection"]
    finally:
        handle.remove()
    assert seen == [(False, False)]
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_error_after_the_first_layer_never_hides_it():
    class FailingHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(7, 2)  # does not fit: the forward fails after the stem

        def forward(self, x):
            return self.head(self.stem(x).flatten(1))

    assert probe_first_layers(FailingHead()) == ["stem"]


def test_views_and_in_place_writes_carry_the_pixels():
    class Scatter(nn.Module):
        """The pixels reach the conv only through a buffer written in place through a view."""

        def __init__(self):
            super().__init__()
            self.bias_net = nn.Linear(3, 3)
            self.conv = nn.Conv2d(6, 4, 3)

        def forward(self, x):
            canvas = torch.zeros(x.shape[0], 6, *x.shape[2:])
            canvas[:, 3:].copy_(x.flip(1))  # a view of canvas receives the pixels
            canvas[:, :3] += self.bias_net(torch.ones(3))[None, :, None, None]
            return self.conv(canvas)

    model = Scatter()
    assert probe_first_layers(model, torch.randn(1, 3, 8, 8)) == ["conv"]


def test_layers_after_a_weight_layer_are_not_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert probe_first_layers(model, torch.randn(1, 3, 8, 8)) == ["0"]
