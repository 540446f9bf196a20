"""Model card creation/update and the plain-checkpoint check; push_to_hub up to the upload (offline)."""

import shutil

import pytest
import torch
import transformers.trainer as hf_trainer_module
from huggingface_hub import ModelCard

from hf_tract import apply_tract
from hf_tract.hub import (
    SECTION_END,
    TRACT_BIBTEX,
    create_or_update_model_card,
    verify_plain_checkpoint,
)
from hf_tract.trainer import TrActTrainer, TrActTrainingArguments

from tests.conftest import FIRST_LAYER, TinyImages, tiny_vit, trainer_kwargs


USER_CARD = """---
license: mit
tags:
- vision
---

# My model

Text the user wrote, which must survive.
"""


def test_new_card_from_model(tmp_path):
    model = apply_tract(tiny_vit(), lambda_=0.05, sync_gram=True, solve_dtype=torch.float32)
    card = create_or_update_model_card(tmp_path, model=model)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.tags == ["tract"] and loaded.data.library_name == "transformers"
    assert "| λ (`tract_lambda`) | 0.05 |" in loaded.text
    assert f"`{FIRST_LAYER}`" in loaded.text and "(`tract_sync_gram`) | yes |" in loaded.text
    assert "(`tract_solve_dtype`) | float32 |" in loaded.text  # read from the layer's TrActConfig
    assert TRACT_BIBTEX in loaded.text and "arxiv.org/abs/2410.23970" in loaded.text
    assert card.content == loaded.content


def test_update_keeps_user_text_and_is_idempotent(tmp_path):
    (tmp_path / "README.md").write_text(USER_CARD)
    model = apply_tract(tiny_vit(), 0.1)
    create_or_update_model_card(tmp_path, model=model)
    first = (tmp_path / "README.md").read_text()
    create_or_update_model_card(tmp_path, model=model)
    assert (tmp_path / "README.md").read_text() == first  # same settings: byte-identical

    apply_tract(model, lambda_=0.2)  # λ changed: the section is replaced, not appended
    create_or_update_model_card(tmp_path, model=model)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.text.count(SECTION_END) == 1
    assert "| λ (`tract_lambda`) | 0.2 |" in card.text and "| 0.1 |" not in card.text
    assert "Text the user wrote, which must survive." in card.text and "# My model" in card.text
    assert card.data.license == "mit" and card.data.tags == ["vision", "tract"]


def test_settings_from_args_and_overrides(tmp_path):
    args = TrActTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, tract_lambda=0.2, tract_target="a.b,c.d",
        tract_optimizer="sgd", tract_learning_rate=0.5,
    )  # fmt: skip
    card = create_or_update_model_card(tmp_path, model=tiny_vit(), args=args)  # model not patched: from args
    assert "| 0.2 |" in card.text and "`a.b`, `c.d`" in card.text and "SGD (lr 0.5" in card.text
    assert "(`tract_solve_dtype`) | auto |" in card.text
    args = TrActTrainingArguments(output_dir=str(tmp_path), use_cpu=True, muon_learning_rate=0.02)
    card = create_or_update_model_card(tmp_path, model=tiny_vit(), args=args)
    assert "same as the other parameters (`adamw_torch" in card.text
    assert "; the hidden Linear weights: `torch.optim.Muon` (lr 0.02) |" in card.text
    card = create_or_update_model_card(tmp_path, lambda_=0.3, layers=["x"], sync_gram=True)
    assert "| 0.3 |" in card.text and "`x`" in card.text and "| yes |" in card.text
    with pytest.raises(ValueError, match="No TrAct settings"):
        create_or_update_model_card(tmp_path, model=tiny_vit())


def _train(tmp_path, **overrides):
    args = TrActTrainingArguments(output_dir=str(tmp_path / "out"), **trainer_kwargs(max_steps=2, **overrides))
    trainer = TrActTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    trainer.train()
    return trainer


def test_trainer_card_keeps_trainer_content(tmp_path):
    trainer = _train(tmp_path, tract_lambda=0.2)
    trainer.create_model_card(model_name="tiny-vit-tract")
    trainer.create_model_card(model_name="tiny-vit-tract")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "### Training hyperparameters" in card.text and "tiny-vit-tract" in card.text  # written by Trainer
    assert card.text.count(SECTION_END) == 1 and "| 0.2 |" in card.text
    assert "tract" in card.data.tags


def test_save_model_writes_plain_weights_and_card(tmp_path):
    trainer = _train(tmp_path)
    out = tmp_path / "out"
    (out / "README.md").write_text(USER_CARD)
    trainer.save_model()
    card = ModelCard.load(out / "README.md")
    assert "Text the user wrote" in card.text and "tract" in card.data.tags
    report = verify_plain_checkpoint(out, load=False)
    assert report.weight_files == ["model.safetensors"] and report.num_tensors == len(trainer.model.state_dict())
    # Checkpoints (internal saves) get no card.
    trainer.save_model(str(tmp_path / "ckpt"), _internal_call=True)
    assert not (tmp_path / "ckpt" / "README.md").exists()


def test_push_to_hub_offline(tmp_path, monkeypatch):
    """Everything `push_to_hub` does before the network: the folder it would upload is plain and carded."""
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = repo_id
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
            staged = tmp_path / "uploaded"
            shutil.copytree(folder_path, staged, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
            calls["upload_folder"] = {"repo_id": repo_id, "files": sorted(p.name for p in staged.iterdir())}
            return "commit-info"

    monkeypatch.setattr(hf_trainer_module, "hf_api", lambda: FakeApi())
    trainer = _train(tmp_path, tract_lambda=0.05)
    assert trainer.push_to_hub() == "commit-info"
    assert calls["create_repo"] == "out"
    assert calls["upload_folder"]["repo_id"] == "user/out"
    assert {"config.json", "model.safetensors", "README.md"} <= set(calls["upload_folder"]["files"])
    staged = tmp_path / "uploaded"
    card = ModelCard.load(staged / "README.md")
    assert "tract" in card.data.tags and "| 0.05 |" in card.text and "### Training hyperparameters" in card.text
    verify_plain_checkpoint(staged, load=False)
