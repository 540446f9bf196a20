"""Model wrappers (DDP, DataParallel, compile, FSDP, DeepSpeed): refused or looked through."""


import pytest
import torch
import torch.nn as nn

from hf_tract import (
    apply_tract,
    is_tract_applied,
    remove_tract,
    tract_layers,
)

from tests.conftest import FIRST_LAYER
from tests.conftest import tiny_rgb_vit as tiny_vit


def test_wrapped_models_are_refused_or_unwrapped():
    compiled = torch.compile(tiny_vit())
    with pytest.raises(RuntimeError, match="before|first"):
        apply_tract(compiled)
    wrapped = nn.DataParallel(tiny_vit())
    apply_tract(wrapped)
    assert is_tract_applied(wrapped.module)


def test_read_only_queries_and_undo_see_through_wrappers():
    model = apply_tract(tiny_vit())
    compiled = torch.compile(model)
    assert list(tract_layers(compiled)) == [FIRST_LAYER] and is_tract_applied(compiled)
    remove_tract(compiled)
    assert not is_tract_applied(model)
