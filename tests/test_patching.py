"""apply_tract / remove_tract on transformers models: identity of what is saved, exact undo, bad input."""

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from hf_tract import (
    apply_tract,
    find_first_layer,
    is_tract_applied,
    remove_tract,
    tract_layers,
)
from hf_tract.modules import TrActConv2d

from tests.conftest import tiny_resnet
from tests.conftest import tiny_rgb_vit as tiny_vit


VIT_PATH = "vit.embeddings.patch_embeddings.projection"


def test_apply_keeps_parameters_state_dict_and_forward(caplog):
    model = tiny_vit()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    pixels = torch.randn(2, 3, 16, 16)
    model.eval()
    logits_before = model(pixel_values=pixels).logits
    with caplog.at_level(logging.INFO, logger="hf_tract"):
        assert apply_tract(model, lambda_=0.2) is model
    assert VIT_PATH in caplog.text
    layer = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(layer, TrActConv2d) and layer.tract_lambda == 0.2
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert torch.equal(model(pixel_values=pixels).logits, logits_before)
    assert "tract" in model.model_tags
    assert list(tract_layers(model)) == [VIT_PATH]


def test_apply_twice_updates_lambda_and_never_stacks():
    model = apply_tract(tiny_vit(), lambda_=0.1)
    layer = model.vit.embeddings.patch_embeddings.projection
    apply_tract(model, lambda_=0.3)
    assert type(layer) is TrActConv2d and layer.tract_lambda == 0.3
    assert model.model_tags.count("tract") == 1


def test_remove_is_an_exact_undo():
    model = tiny_vit()
    layer = model.vit.embeddings.patch_embeddings.projection
    attributes = set(vars(layer))
    apply_tract(model, sync_gram=True)
    layer.tract_record_stats = True  # what the Trainer's statistics set
    layer.tract_stats.append({})
    remove_tract(model)
    assert type(layer) is nn.Conv2d
    assert set(vars(layer)) == attributes
    assert not is_tract_applied(model)
    assert not model.model_tags


def test_optimizer_built_before_patching_trains_the_tract_gradient():
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    apply_tract(model)
    layer = model.vit.embeddings.patch_embeddings.projection
    before = layer.weight.detach().clone()
    loss = model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    expected = before.add(layer.weight.grad, alpha=-0.1)
    optimizer.step()
    assert torch.equal(layer.weight.detach(), expected)


def test_explicit_target_list_and_resnet_discovery():
    model = tiny_resnet()
    name, _ = find_first_layer(model)
    assert name == "resnet.embedder.embedder.convolution"
    apply_tract(model, target=[name])
    assert list(tract_layers(model)) == [name]


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf")])
def test_bad_lambda_is_a_value_error(bad):
    with pytest.raises(ValueError, match="finite number > 0"):
        apply_tract(tiny_vit(), lambda_=bad)


@pytest.mark.parametrize("bad", [True, "0.1"])
def test_lambda_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="must be a float"):
        apply_tract(tiny_vit(), lambda_=bad)


def test_unsupported_target_is_a_type_error():
    with pytest.raises(TypeError, match="supports nn.Linear"):
        apply_tract(tiny_vit(), target="vit.embeddings")


def test_frozen_first_layer_warns():
    model = tiny_vit()
    model.vit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="TrAct changes nothing"):
        apply_tract(model)


def test_deepcopy_and_state_dict_of_patched_model():
    model = apply_tract(tiny_vit())
    clone = copy.deepcopy(model)
    assert is_tract_applied(clone)
    plain = tiny_vit()
    plain.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


_VANILLA_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class BlockHfTract(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_tract" or name.startswith("hf_tract."):
                raise ImportError("hf_tract is blocked in this process")
    sys.meta_path.insert(0, BlockHfTract())
    import torch
    from transformers import AutoModelForImageClassification
    try:
        import hf_tract
        raise SystemExit("hf_tract should not be importable here")
    except ImportError:
        pass
    folder, pixels_file = sys.argv[1], sys.argv[2]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    pixels = torch.load(pixels_file, weights_only=True)
    with torch.no_grad():
        torch.save(model(pixel_values=pixels).logits, folder + "/vanilla_logits.pt")
    state = torch.load(folder + "/state_dict.pt", weights_only=True)
    model.load_state_dict(state)
    print(json.dumps(sorted(state)))
    """
)


@pytest.mark.slow  # a clean interpreter loads the checkpoint (~10 s)
def test_save_pretrained_loads_in_vanilla_transformers_without_hf_tract(tmp_path):
    model = apply_tract(tiny_vit())
    model.train()
    model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.eval()
    plain = tiny_vit()
    model.save_pretrained(tmp_path)
    plain.save_pretrained(tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(load_file(tmp_path / "plain" / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert "tract" not in json.dumps(config).lower()
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    pixels = torch.randn(3, 3, 16, 16)
    torch.save(pixels, tmp_path / "pixels.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _VANILLA_LOAD, str(tmp_path), str(tmp_path / "pixels.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == sorted(model.state_dict())
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    assert torch.equal(torch.load(tmp_path / "vanilla_logits.pt", weights_only=True), expected)
