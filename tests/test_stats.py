"""tract_log_stats: what TrAct does, in the training logs (logging steps only, equal to the closed form)."""

import copy

import pytest
from transformers import TrainerCallback

from hf_tract import (
    TrActTrainer,
)

from tests.conftest import (
    FIRST_LAYER,
    TinyImages,
    make_args,
    tiny_vit,
)
from tests.oracle import patch_matrix_reference, tract_grad_reference


def test_log_stats_at_logging_steps_only(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=4, logging_steps=2, tract_log_stats=True)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages(16))
    recorded_at = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorded_at.append(len(model.get_submodule(FIRST_LAYER).tract_stats))

    trainer.add_callback(Spy())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["tract/grad_norm_plain"] > 0 and entry["tract/grad_norm"] > 0
        assert entry["tract/condition_bound"] > 1
    # Recorded in the backward of steps 2 and 4 only (one micro-batch each), read and cleared by their log.
    assert recorded_at == [0, 1, 0, 1] and not model.get_submodule(FIRST_LAYER).tract_stats and not model.get_submodule(FIRST_LAYER).tract_record_stats


def test_log_stats_values_match_the_closed_form(tmp_path):
    """One step, one batch: the logged norms are those of the plain and the closed-form TrAct gradient."""
    initial = tiny_vit()
    model = copy.deepcopy(initial)
    args = make_args(
        tmp_path, max_steps=1, logging_steps=1, tract_log_stats=True, per_device_train_batch_size=8,
        train_sampling_strategy="sequential", max_grad_norm=0.0,
    )  # fmt: skip
    dataset = TinyImages(8)
    trainer = TrActTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    probe = copy.deepcopy(initial).train()
    probe(**dataset[0:8]).loss.backward()
    layer = probe.get_submodule(FIRST_LAYER)
    patches = patch_matrix_reference(layer, dataset[0:8]["pixel_values"])
    tract = tract_grad_reference(layer.weight.grad, patches, 0.1)
    assert entry["tract/grad_norm_plain"] == pytest.approx(layer.weight.grad.norm().item(), rel=1e-5)
    assert entry["tract/grad_norm"] == pytest.approx(tract.norm().item(), rel=1e-4)
    bound = 1 + (patches.double() ** 2).sum().item() / (patches.shape[-2] * 0.1)
    assert entry["tract/condition_bound"] == pytest.approx(bound, rel=1e-5)
