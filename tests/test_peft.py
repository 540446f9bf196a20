"""PEFT: a LoRA model whose first layer is trainable through ``modules_to_save``."""

import copy

import pytest
import torch

from hf_tract import apply_tract, remove_tract, tract_layers

from tests.conftest import tiny_rgb_vit as tiny_vit
from tests.oracle import patch_matrix_reference, relative_error, tract_grad_reference


peft = pytest.importorskip("peft")

TRAINABLE_COPY = "base_model.model.vit.embeddings.patch_embeddings.projection.modules_to_save.default"


def _lora_model():
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["projection", "classifier"])
    return peft.get_peft_model(tiny_vit(), config)


def test_tract_goes_on_the_trainable_copy_and_adapters_round_trip(tmp_path):
    model = _lora_model()
    reference = copy.deepcopy(model)
    apply_tract(model, lambda_=0.1)
    assert list(tract_layers(model)) == [TRAINABLE_COPY]
    layer = model.get_submodule(TRAINABLE_COPY)

    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    captured = {}
    hook = reference.get_submodule(TRAINABLE_COPY).register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
    model.train(), reference.train()
    torch.manual_seed(0)
    model(pixel_values=pixels, labels=labels).loss.backward()
    torch.manual_seed(0)
    reference(pixel_values=pixels, labels=labels).loss.backward()
    hook.remove()
    plain_grad = reference.get_submodule(TRAINABLE_COPY).weight.grad
    expected = tract_grad_reference(plain_grad, patch_matrix_reference(layer, captured["x"]), 0.1)
    assert relative_error(layer.weight.grad, expected) <= 1e-5
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.grad is not None and name != TRAINABLE_COPY + ".weight":
            assert torch.equal(p.grad, q.grad), name

    with torch.no_grad():
        layer.weight -= 0.1 * layer.weight.grad
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)

    merged = model.merge_and_unload()
    remove_tract(merged)
    assert not tract_layers(merged)
    assert sorted(merged.state_dict()) == sorted(tiny_vit().state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=pixels).logits, model(pixel_values=pixels).logits, atol=1e-6)
