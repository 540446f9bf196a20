"""What the test files share: the tiny models and synthetic data, and fixtures.

The builders live in `tests/multiproc/tiny.py` because the multi-process scripts under `tests/multiproc` run
outside pytest and import them too; they are re-exported here so that a test file can take them from one
place (`from tests.conftest import tiny_vit, ...` or `from tests.multiproc.tiny import ...`, the same objects).
"""

from __future__ import annotations

import pytest

from hf_tract.environment import LAUNCHER_VARIABLES

from tests.multiproc.tiny import (
    FIRST_LAYER,
    TinyImages,
    conv_stem,
    first_weight,
    make_args,
    tiny_resnet,
    tiny_rgb_vit,
    tiny_vit,
    trainer_kwargs,
)


__all__ = [
    "FIRST_LAYER",
    "TinyImages",
    "conv_stem",
    "first_weight",
    "make_args",
    "tiny_resnet",
    "tiny_rgb_vit",
    "tiny_vit",
    "trainer_kwargs",
]


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: the test sees a single-process run whatever started pytest (returns `monkeypatch`)."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
