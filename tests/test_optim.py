"""Optimizer plumbing: the TrAct layer's own parameter groups, the SGD ablation, Muon for the hidden weights,
CombinedOptimizer."""

import copy

import pytest
import torch

from hf_tract import (
    TrActTrainer,
    apply_tract,
)
from hf_tract.optim import CombinedOptimizer, muon_parameter_names, split_muon_optimizer

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


def _vit_hidden_linears(model):
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("vit.")]


def test_muon_parameters_are_the_hidden_linear_weights():
    model = tiny_vit()
    hidden = _vit_hidden_linears(model)
    assert hidden and muon_parameter_names(model) == hidden  # not the patch embedding, the head, norms or biases
    apply_tract(model)
    assert muon_parameter_names(model) == hidden
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    assert muon_parameter_names(vit) == [  # the stacked q/k/v matrix counts; `heads.head` is the head
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
        "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
        "encoder.layers.encoder_layer_0.mlp.0.weight",
        "encoder.layers.encoder_layer_0.mlp.3.weight",
    ]
    timm = pytest.importorskip("timm")
    mixer = timm.models.mlp_mixer.MlpMixer(num_classes=3, img_size=32, patch_size=16, num_blocks=1, embed_dim=16)
    assert muon_parameter_names(mixer) == [n for n, p in mixer.named_parameters() if n.startswith("blocks.") and p.ndim == 2]


def test_split_muon_optimizer_moves_the_hidden_weights():
    model = tiny_vit()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-6)
    muon = split_muon_optimizer(adamw, model, lr=0.02, momentum=0.9)
    moved = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert moved == muon_parameter_names(model)
    assert not {id(p) for g in adamw.param_groups for p in g["params"]} & {id(p) for g in muon.param_groups for p in g["params"]}
    assert len(moved) + sum(len(g["params"]) for g in adamw.param_groups) == len(names)
    group = muon.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"], group["eps"], group["name"]) == (0.02, 0.1, 0.9, 1e-7, "muon")
    combined = CombinedOptimizer([adamw, muon])
    model(pixel_values=torch.randn(2, 1, 16, 16)).logits.sum().backward()
    combined.step()
    assert all("momentum_buffer" in muon.state[p] for p in muon.param_groups[0]["params"])
    with pytest.raises(RuntimeError, match="before the optimizer's first step"):
        split_muon_optimizer(adamw, model, lr=0.02)


def test_split_muon_optimizer_errors():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=3)  # only convolutions besides the head `fc`
    with pytest.raises(ValueError, match="no hidden `nn.Linear` weight"):
        split_muon_optimizer(torch.optim.AdamW(resnet.parameters()), resnet, lr=0.02)
    model = tiny_vit()
    with pytest.raises(ValueError, match="does not hold"):
        split_muon_optimizer(torch.optim.AdamW(model.classifier.parameters()), model, lr=0.02)


@pytest.mark.parametrize("tract_optimizer", ["same", "sgd"])
def test_muon_option(tmp_path, tract_optimizer):
    model = tiny_vit()
    args = make_args(
        tmp_path, max_steps=2, muon_learning_rate=0.02, weight_decay=0.01, tract_optimizer=tract_optimizer,
        tract_learning_rate=0.05 if tract_optimizer == "sgd" else None,
    )  # fmt: skip
    trainer = TrActTrainer(model=model, args=args, train_dataset=TinyImages())
    trainer.train()
    combined = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    *others, muon = combined.optimizers
    assert [type(o).__name__ for o in others] == (["AdamW", "SGD"] if tract_optimizer == "sgd" else ["AdamW"])
    assert isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for g in muon.param_groups for p in g["params"]] == _vit_hidden_linears(model)
    assert all(g["weight_decay"] == 0.01 for g in muon.param_groups)  # Trainer's decay group
    weight = model.get_submodule(FIRST_LAYER).weight
    assert weight in others[-1].state and all(p in muon.state for g in muon.param_groups for p in g["params"])
    # The scheduler drives Muon too: linear decay over 2 steps from 0.02 leaves 0.
    assert [g["initial_lr"] for g in muon.param_groups] == [0.02] and all(g["lr"] == 0.0 for g in combined.param_groups)


def test_muon_option_plain_baseline(tmp_path):
    model = tiny_vit()
    trainer = TrActTrainer(model=model, args=make_args(tmp_path, max_steps=1, use_tract=False, muon_learning_rate=0.02),
                           train_dataset=TinyImages())
    trainer.train()
    adamw, muon = trainer.optimizer.optimizer.optimizers
    assert model.get_submodule(FIRST_LAYER).weight in adamw.state  # the discovered first layer stays on AdamW
    assert len(muon.state) == len(_vit_hidden_linears(model))
