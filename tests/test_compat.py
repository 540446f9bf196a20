"""Workarounds for other libraries' bugs: each has a test that fails once the bug is fixed."""


import torch
from transformers import Trainer, TrainingArguments

from hf_tract import TrActTrainer

from tests.conftest import make_args, tiny_vit, trainer_kwargs


def test_transformers_still_needs_the_legacy_key_workaround(tmp_path):
    """Plain `Trainer._load_from_checkpoint` (transformers 5.24) resumes a ViT with its initial weights.

    This test fails once transformers converts legacy key names on resume: then delete
    `hf_tract.trainer._resume_with_converted_legacy_keys` and this test.
    """
    saved = tiny_vit(seed=1)
    saved.save_pretrained(tmp_path / "checkpoint")
    fresh = tiny_vit(seed=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs())
    Trainer(model=fresh, args=args)._load_from_checkpoint(str(tmp_path / "checkpoint"))
    lost = [name for name, p in fresh.state_dict().items() if not torch.equal(p, saved.state_dict()[name])]
    assert lost, "transformers fixed it: remove the workaround (_resume_with_converted_legacy_keys)"

    ours = tiny_vit(seed=2)
    TrActTrainer(model=ours, args=make_args(tmp_path / "b"))._load_from_checkpoint(str(tmp_path / "checkpoint"))
    assert all(torch.equal(p, saved.state_dict()[name]) for name, p in ours.state_dict().items())
