"""Tiny ViT and synthetic image data shared by the Trainer tests and the multi-process scripts."""

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
