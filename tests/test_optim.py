"""Optimizer plumbing: the TrAct layer's own parameter groups, the SGD ablation, CombinedOptimizer."""

import copy

import pytest
import torch

from hf_tract import (
    TrActTrainer,
)
from hf_tract.optim import CombinedOptimizer

from tests.conftest import (
    FIRST_LAYER,
    TinyImages,
    make_args,
    tiny_vit,
)


def _groups_of(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("name"), g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


def test_tract_param_groups(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=1, tract_learning_rate=1e-2, tract_weight_decay=0.5, weight_decay=0.01)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    optimizer = trainer.create_optimizer()
    groups = _groups_of(optimizer, model)
    tract_groups = [g for g in groups if g[0] == "tract"]
    assert sorted((g[2], tuple(g[3])) for g in tract_groups) == [
        (0.0, (f"{FIRST_LAYER}.bias",)),
        (0.5, (f"{FIRST_LAYER}.weight",)),
    ]
    assert all(g[1] == 1e-2 for g in tract_groups)
    listed = [n for g in groups for n in g[3]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    trainer.train()


def test_sgd_ablation_optimizer(tmp_path):
    model = tiny_vit()
    args = make_args(tmp_path, max_steps=2, tract_optimizer="sgd", tract_learning_rate=0.05, tract_momentum=0.5)
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    trainer.train()
    combined = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    assert isinstance(combined, CombinedOptimizer)
    adamw, sgd = combined.optimizers
    weight = model.get_submodule(FIRST_LAYER).weight
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert "momentum_buffer" in sgd.state[weight] and weight not in adamw.state
    assert len(adamw.state) == sum(1 for n, _ in model.named_parameters() if not n.startswith(FIRST_LAYER))
    # The scheduler drives both: linear decay over 2 steps leaves every lr at 0.
    assert all(g["lr"] == 0.0 for g in combined.param_groups)
    assert [g["initial_lr"] for g in sgd.param_groups] == [0.05, 0.05]


def test_combined_optimizer_state_round_trip():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    combined = CombinedOptimizer([torch.optim.AdamW([a], lr=0.1), torch.optim.SGD([b], lr=0.1, momentum=0.9)])
    (a.sum() + b.sum()).backward()
    combined.step()
    state = copy.deepcopy(combined.state_dict())
    restored = CombinedOptimizer([torch.optim.AdamW([a], lr=0.3), torch.optim.SGD([b], lr=0.3, momentum=0.9)])
    restored.load_state_dict(state)
    assert [g["lr"] for g in restored.param_groups] == [0.1, 0.1]
    assert restored.param_groups[1] is restored.optimizers[1].param_groups[0]
    assert torch.equal(restored.optimizers[1].state[b]["momentum_buffer"], combined.optimizers[1].state[b]["momentum_buffer"])
    with pytest.raises(ValueError, match="CombinedOptimizer"):
        restored.load_state_dict(restored.optimizers[0].state_dict())
