"""First-layer discovery on the classes of models the probe used to fail on, built offline from tiny
configs, with the registry and timm metadata off (the probe alone) and on (the default path), and the
errors of ``resolve_targets``.

Each case: the model, the first layer(s) it must find. The probe builds its inputs itself from the
forward signature and the configs (text / task dummies, nested sizes, frames under other names).
"""

import warnings

import pytest
import torch
import torch.nn as nn

from hf_tract import apply_tract, find_first_layers
from hf_tract.patching import tract_layers
from hf_tract.targets import candidate_inputs, probe_first_layers, resolve_targets

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

TINY_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _owlvit():
    # Open-vocabulary detector: forward(input_ids, pixel_values) both required; main_input_name is input_ids.
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    config = OwlViTConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 16},
        vision_config={**TINY_VIT, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return OwlViTForObjectDetection(config), ["owlvit.vision_model.embeddings.patch_embedding"]


def _grounding_dino():
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config={"model_type": "bert", **TINY_TEXT},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5, num_feature_levels=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=8,
    )  # fmt: skip
    return GroundingDinoForObjectDetection(config), ["model.backbone.conv_encoder.model.swin.embeddings.patch_embeddings.projection"]


def _xclip():
    # Video-text contrastive model: pixel_values (B, T, C, H, W), frames in vision_config.num_frames.
    from transformers import XCLIPConfig, XCLIPModel

    config = XCLIPConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 16},
        vision_config={**TINY_VIT, "image_size": 32, "patch_size": 16, "num_frames": 3, "mit_hidden_size": 32,
                       "mit_intermediate_size": 64, "mit_num_hidden_layers": 1, "mit_num_attention_heads": 2},
        projection_dim=32, prompt_layers=1, prompt_attention_heads=2, prompt_hidden_act="quick_gelu",
    )  # fmt: skip
    return XCLIPModel(config), ["vision_model.embeddings.patch_embedding"]


def _oneformer():
    # Universal segmentation with a required task input (the tokenised task prompt).
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, SwinConfig

    config = OneFormerConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=64,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, num_queries=4, encoder_layers=1, decoder_layers=2, dim_feedforward=32, num_attention_heads=2,
        mask_dim=32, task_seq_len=8, text_encoder_context_length=8, text_encoder_width=32, text_encoder_num_layers=1,
        text_encoder_vocab_size=99, text_encoder_proj_layers=1, conv_dim=32, encoder_feedforward_dim=32,
        num_classes=3,
    )  # fmt: skip
    return OneFormerForUniversalSegmentation(config), ["model.pixel_level_module.encoder.swin.embeddings.patch_embeddings.projection"]


def _vitmatte():
    # A 4-channel backbone (RGB + trimap): the channel count lives in backbone_config only.
    from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting

    backbone = VitDetConfig(num_channels=4, image_size=32, patch_size=16, **TINY_VIT, out_features=["stage1"])
    config = VitMatteConfig(backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[8, 16, 16],
                            fusion_hidden_sizes=[32, 16, 8, 4])  # fmt: skip
    expected = [
        "backbone.embeddings.projection",
        "decoder.convstream.convs.0.conv",
        "decoder.fusion_blocks.3.conv.conv",
    ]
    return VitMatteForImageMatting(config), expected


def _vjepa2():
    # Video model whose frame count is `frames_per_clip` and image side `crop_size`.
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    config = VJEPA2Config(crop_size=32, frames_per_clip=4, tubelet_size=2, patch_size=16, hidden_size=32,
                          num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=32,
                          pred_num_hidden_layers=1, pred_num_attention_heads=2, num_labels=3)  # fmt: skip
    return VJEPA2ForVideoClassification(config), ["vjepa2.encoder.embeddings.patch_embeddings.proj"]


def _torchvision_vit32():
    return torchvision.models.vit_b_16(weights=None, image_size=32), ["conv_proj"]


class UserWrapper(nn.Module):
    """A user's own module around a transformers vision model built at 48 px (not 224)."""

    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.encoder = ViTModel(ViTConfig(image_size=48, patch_size=16, **TINY_VIT), add_pooling_layer=False)
        self.head = nn.Linear(32, 5)

    def forward(self, images):
        return self.head(self.encoder(pixel_values=images).last_hidden_state[:, 0])


def _user_wrapper():
    return UserWrapper(), ["encoder.embeddings.patch_embeddings.projection"]


CASES = {
    "owlvit_open_vocabulary_detector": _owlvit,
    "grounding_dino_open_vocabulary_detector": _grounding_dino,
    "xclip_video_text": _xclip,
    "oneformer_task_inputs": _oneformer,
    "vitmatte_4_channel_backbone": _vitmatte,
    "vjepa2_frames_per_clip": _vjepa2,
    "torchvision_vit_b_16_at_32px": _torchvision_vit32,
    "user_wrapper_at_48px": _user_wrapper,
}


def _build(name):
    torch.manual_seed(0)
    try:
        model, expected = CASES[name]()
    except (ImportError, AttributeError) as exc:  # a family this transformers version does not have
        pytest.skip(f"{name} cannot be built here: {exc}")
    return model.eval(), expected


SLOW = {"torchvision_vit_b_16_at_32px", "grounding_dino_open_vocabulary_detector"}  # ViT-B/16 itself: 86M parameters


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name) for name in CASES]
)
def test_probe_alone_finds_the_first_layers(name):
    model, expected = _build(name)
    assert [path for path, _ in find_first_layers(model, use_registry=False)] == expected
    # The default path (registry first) agrees, and apply_tract patches exactly these layers.
    assert sorted(path for path, _ in find_first_layers(model)) == sorted(expected)
    apply_tract(model)
    assert sorted(tract_layers(model)) == sorted(expected)


@pytest.mark.parametrize("name", ["xclip_video_text", "vjepa2_frames_per_clip", "vitmatte_4_channel_backbone"])
def test_first_candidate_input_runs_the_whole_model(name):
    """Video and multi-input models: the first dummy input runs the whole forward (no failed-forward
    fallback), with the sizes the nested configs say."""
    model, _ = _build(name)
    candidate = next(iter(candidate_inputs(model)))
    with torch.no_grad():
        candidate.run(model)
    assert candidate.module_path == ""
    pixels = candidate.pixels[0]
    if name == "vitmatte_4_channel_backbone":
        assert pixels.shape == (1, 4, 32, 32)
    elif name == "vjepa2_frames_per_clip":
        assert pixels.shape == (1, 4, 3, 32, 32)
    else:
        assert pixels.shape == (1, 3, 3, 32, 32)


def test_probe_keeps_no_autograd_graph_and_restores_the_mode():
    model, _ = _build("user_wrapper_at_48px")
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


# --- resolve_targets: errors that teach --------------------------------------------------------


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=16, **TINY_VIT)).eval()


@pytest.mark.parametrize("empty", ["", [], [""], "  "])
def test_empty_target_is_a_value_error(empty):
    with pytest.raises(ValueError, match="non-empty"):
        resolve_targets(_tiny_vit(), empty)


def test_unknown_target_suggests_close_names_and_the_first_layer():
    with pytest.raises(ValueError) as info:
        resolve_targets(_tiny_vit(), "vit.embeddings.patch_embedding.projection")
    message = str(info.value)
    assert "not a submodule of ViTForImageClassification" in message
    assert "Closest names: 'vit.embeddings.patch_embeddings.projection'" in message
    assert "The layer that consumes the pixels is 'vit.embeddings.patch_embeddings.projection'" in message


def test_unknown_target_message_survives_failing_discovery():
    model = nn.Sequential(nn.Flatten(), nn.Identity())  # no first layer anywhere
    with pytest.raises(ValueError, match="not a submodule of Sequential"):
        resolve_targets(model, "conv")


def test_target_that_does_not_consume_the_pixels_warns_with_the_real_first_layer():
    model = _tiny_vit()
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
