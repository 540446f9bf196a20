"""What the test files share: the tiny models and synthetic data, and fixtures.

The builders live in `tests/multiproc/tiny.py` because the multi-process scripts under `tests/multiproc` run
outside pytest and import them too; they are re-exported here so that a test file can take them from one
place: `from tests.conftest import tiny_vit, ...` (the scripts import `tests.multiproc.tiny` directly).
"""

from __future__ import annotations

import os

import pytest
import torch

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


def pytest_configure(config):
    # Under pytest-xdist every worker is a process of its own: one torch thread each, so that two workers do not
    # oversubscribe two cores (the tiny models of the suite are launch-bound; more threads buy them nothing).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables: the test sees a single-process run whatever started pytest (returns `monkeypatch`)."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
