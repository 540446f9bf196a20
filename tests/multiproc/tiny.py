"""Tiny models and synthetic image data shared by the tests (through tests/conftest.py) and the multi-process scripts.

Plain functions in a module, not fixtures, because the scripts under tests/multiproc run outside pytest.
"""

import torch
from transformers import ViTConfig, ViTForImageClassification


FIRST_LAYER = "vit.embeddings.patch_embeddings.projection"
NUM_LABELS = 3


def tiny_vit_config() -> ViTConfig:
    # One channel: grayscale repeated to 3 channels would make the patch Gram rank-deficient.
    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=1,
        num_labels=NUM_LABELS,
    )


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config())


class TinyImages(torch.utils.data.Dataset):
    """Standardised random images with random labels, the same for every process with the same seed."""

    def __init__(self, num_examples: int = 16, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        # A per-pixel offset makes the patch Gram non-diagonal, so TrAct differs visibly from plain SGD.
        self.pixel_values = torch.randn(num_examples, 1, 16, 16, generator=generator) + torch.linspace(-1, 1, 16)
        self.labels = torch.randint(0, NUM_LABELS, (num_examples,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def trainer_kwargs(**overrides) -> dict:
    """Common TrActTrainingArguments for short CPU runs (no logging integrations, no saving)."""
    kwargs = dict(
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_rgb_vit(**overrides) -> ViTForImageClassification:
    """A 3-channel, 1-layer ViT (16x16 images, 4x4 patches): discovery and patching tests."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=NUM_LABELS, **overrides,
    )  # fmt: skip
    return ViTForImageClassification(config)


def tiny_resnet():
    """A 1-channel, 2-stage ResNet: a conv stem found by the registry."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS)
    return ResNetForImageClassification(config)


def conv_stem() -> torch.nn.Conv2d:
    """A bare strided, padded conv (3 -> 8 channels, kernel 4), found as its own first layer."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 8, 4, stride=2, padding=1, bias=False)


def make_args(tmp_path, **overrides):
    """`TrActTrainingArguments` for a short CPU run writing under `tmp_path / "out"`."""
    from hf_tract import TrActTrainingArguments

    return TrActTrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs(**overrides))


def first_weight(model) -> torch.Tensor:
    """A copy of the tiny ViT's first-layer weight."""
    return model.get_submodule(FIRST_LAYER).weight.detach().clone()
