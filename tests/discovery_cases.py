"""Models the first-layer probe used to fail on, built offline from tiny configs: open-vocabulary detectors,
video-text models, task inputs, a 4-channel backbone, frames under other names, torchvision's ViT at 32 px and a
user wrapper. Each case gives the model and the first layer(s) discovery must find.
"""

import pytest
import torch
import torch.nn as nn


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
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

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
    from transformers import (
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        SwinConfig,
    )

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


def build_case(name):
    """`(model in eval mode, expected first layers)` of the case `name`; skips if this transformers lacks it."""
    torch.manual_seed(0)
    try:
        model, expected = CASES[name]()
    except (ImportError, AttributeError) as exc:  # a family this transformers version does not have
        pytest.skip(f"{name} cannot be built here: {exc}")
    return model.eval(), expected
