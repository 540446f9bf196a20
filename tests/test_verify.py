"""verify_plain_checkpoint: a saved folder is a plain checkpoint that loads without hf_tract."""

import json

import pytest
import torch

from hf_tract import apply_tract
from hf_tract.hub import (
    verify_plain_checkpoint,
)

from tests.conftest import tiny_vit


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))



@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "modeling_tract.py").write_text("import hf_tract\n"), "Python file"),
        (lambda d: torch.save({}, d / "pytorch_model.bin"), "pickled file"),
        (lambda d: _edit_config(d, auto_map={"AutoModel": "x.Y"}), "auto_map"),
        (lambda d: _edit_config(d, architectures=["TrActViT"]), "mentions TrAct"),
        (lambda d: (d / "model.safetensors").unlink(), "no .safetensors"),
    ],
)
def test_verify_plain_checkpoint_rejects(tmp_path, corrupt, message):
    model = apply_tract(tiny_vit())
    model.save_pretrained(tmp_path)
    verify_plain_checkpoint(tmp_path, load=False)
    corrupt(tmp_path)
    with pytest.raises(ValueError, match=message):
        verify_plain_checkpoint(tmp_path, load=False)
