"""TrAct on models that do not come from transformers' own families: raw timm models (plain conv,
``Conv2dSame``, ``StdConv2d`` stems, ViT), ``TimmWrapperForImageClassification``, a transformers
model with a timm backbone (DETR), and torchvision models, all built offline with random weights.

Per model: discovery finds the stem, the patched forward is bit-identical, the stem's weight
gradient is the closed-form TrAct gradient (every other gradient bit-identical), one optimizer
step runs, state_dict keys are unchanged, and a safetensors round trip into a fresh unpatched
model gives identical outputs.
"""

import copy
import functools
import os

import pytest
import torch
import torch.nn as nn

from hf_tract import apply_tract, find_first_layers
from hf_tract.patching import tract_layers

from tests import model_zoo as zoo
from tests.oracle import relative_error


os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

LAMBDA = 0.1


def _timm(name, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _timm_bit():
    # The BiT ResNetV2 (StdConv2d stem, weight standardisation in its forward), one block per stage.
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1, 1, 1], channels=(128, 256, 256, 256), stem_type="fixed", conv_layer=functools.partial(StdConv2d, eps=1e-8), num_classes=10)


def _timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return TimmWrapperForImageClassification._from_config(TimmWrapperConfig(architecture="resnet18", num_labels=10))


def _detr_timm_backbone():
    from transformers import DetrConfig, DetrModel

    config = DetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, num_queries=5, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2,
    )  # fmt: skip
    return DetrModel(config)


def _torchvision_vit():
    # vit_b_16's class (conv_proj patchify) at a tiny width and depth.
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: no gradient would reach the stem
    return model


# name -> (builder, stem path, input shape, input key or None for positional)
MODELS = {
    "timm_resnet18": (lambda: _timm("resnet18"), "conv1", (2, 3, 64, 64), None),
    "timm_vit_tiny": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), "patch_embed.proj", (2, 3, 32, 32), None),
    "timm_tf_mobilenetv3_conv2dsame": (lambda: _timm("tf_mobilenetv3_small_075"), "conv_stem", (2, 3, 64, 64), None),
    "timm_resnetv2_bit_stdconv": (_timm_bit, "stem.conv", (2, 3, 64, 64), None),
    "timm_wrapper_resnet18": (_timm_wrapper, "timm_model.conv1", (2, 3, 64, 64), "pixel_values"),
    "detr_timm_backbone": (_detr_timm_backbone, "backbone.model.conv1", (2, 3, 64, 64), "pixel_values"),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), "conv1", (2, 3, 64, 64), None),
    "torchvision_vit": (_torchvision_vit, "conv_proj", (2, 3, 224, 224), None),
    "torchvision_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), "features.0.0", (2, 3, 64, 64), None),
    "torchvision_convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None, num_classes=10), "features.0.0", (2, 3, 32, 32), None),
}  # fmt: skip
SLOW = {"torchvision_convnext_tiny", "detr_timm_backbone", "timm_tf_mobilenetv3_conv2dsame", "torchvision_mobilenet_v3_small"}


def _build(name, seed=0, dtype=torch.float64):
    builder, stem, shape, key = MODELS[name]
    torch.manual_seed(seed)
    model = builder().to(dtype).eval()
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    inputs = {key: x} if key else {"x": x}
    run = (lambda m, inp: m(**inp)) if key else (lambda m, inp: m(inp["x"]))
    return model, stem, inputs, run


def _params():
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name) for name in MODELS]


def _outputs_equal(a, b):
    a, b = zoo.output_tensors(a), zoo.output_tensors(b)
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", _params())
def test_discovery_finds_the_stem(name):
    model, stem, inputs, _ = _build(name, dtype=torch.float32)  # the default probe input is float32
    assert [path for path, _ in find_first_layers(model)] == [stem]
    probe_inputs = inputs if "x" not in inputs else inputs["x"]
    assert [path for path, _ in find_first_layers(model, example_inputs=probe_inputs)] == [stem]


@pytest.mark.parametrize("name", _params())
def test_tract_gradient_training_step_and_plain_checkpoint(name, tmp_path):
    plain, stem, inputs, run = _build(name)
    patched = apply_tract(copy.deepcopy(plain), lambda_=LAMBDA)
    assert list(tract_layers(patched)) == [stem]
    assert list(patched.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert _outputs_equal(run(patched, inputs), run(plain, inputs))

    for model in (plain, patched):
        zoo.set_dropout_off(model)
        model.train()
    layer = plain.get_submodule(stem)
    with zoo.record_weight_use(layer) as calls:
        torch.manual_seed(0)
        plain_out = run(plain, inputs)
    torch.manual_seed(0)
    patched_out = run(patched, inputs)
    assert _outputs_equal(patched_out, plain_out)
    zoo.scalar_loss(plain_out).backward(retain_graph=True)
    zoo.scalar_loss(patched_out).backward()

    plain_params = dict(plain.named_parameters())
    for param_name, param in patched.named_parameters():
        if param_name != f"{stem}.weight" and plain_params[param_name].grad is not None:
            assert torch.equal(param.grad, plain_params[param_name].grad), param_name
    expected = zoo.first_layer_oracle(layer, calls, LAMBDA)
    stem_grad = patched.get_submodule(stem).weight.grad
    assert relative_error(stem_grad, expected) <= 1e-8
    assert not torch.equal(stem_grad, layer.weight.grad)

    before = patched.get_submodule(stem).weight.detach().clone()
    torch.optim.SGD(patched.parameters(), lr=0.1).step()
    after = patched.get_submodule(stem).weight.detach()
    torch.testing.assert_close(after, before - 0.1 * stem_grad, rtol=0, atol=1e-12)

    patched.eval()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in patched.state_dict().items()}, str(path))
    fresh, _, _, _ = _build(name, seed=1)
    fresh.load_state_dict(safetensors_torch.load_file(str(path)))
    assert not tract_layers(fresh)
    with torch.no_grad():
        assert _outputs_equal(run(fresh, inputs), run(patched, inputs))
