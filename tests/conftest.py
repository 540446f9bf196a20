"""Fixtures shared by the test files: tiny models, synthetic data and short-run Trainer arguments.

The builders live in `tests/multiproc/tiny.py` (the multi-process scripts run outside pytest and import them
too); the fixtures here give each test a fresh model or argument factory.
"""

from __future__ import annotations

import pytest

from tests.multiproc.tiny import FIRST_LAYER, TinyImages, conv_stem, tiny_resnet, tiny_rgb_vit, tiny_vit, trainer_kwargs

__all__ = ["FIRST_LAYER", "TinyImages", "conv_stem", "tiny_resnet", "tiny_rgb_vit", "tiny_vit", "trainer_kwargs"]


@pytest.fixture
def vit():
    """A fresh 1-channel tiny ViT (seed 0); its first layer is `FIRST_LAYER`."""
    return tiny_vit()


@pytest.fixture
def images():
    """16 standardised synthetic 16x16 images with 3 random labels."""
    return TinyImages()


@pytest.fixture
def tract_args(tmp_path):
    """Factory of `TrActTrainingArguments` for short CPU runs writing to `tmp_path/out`."""
    from hf_tract.trainer import TrActTrainingArguments

    def make(**overrides) -> TrActTrainingArguments:
        return TrActTrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs(**overrides))

    return make


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: the test sees a single-process run whatever started pytest."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
