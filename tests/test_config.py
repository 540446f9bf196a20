"""TrActConfig: the one description of a TrAct setup, validated once; what the patched layers carry."""

import dataclasses

import pytest
import torch

from hf_tract import (
    TrActConfig,
    apply_tract,
    remove_tract,
    tract_config_of,
    tract_layers,
)

from tests.conftest import FIRST_LAYER, conv_stem, tiny_vit


def test_defaults_live_here():
    config = TrActConfig()
    assert (config.lambda_, config.targets, config.sync_gram, config.solve_dtype) == (0.1, None, False, None)
    assert config.to_dict() == {"lambda": 0.1, "targets": None, "sync_gram": False, "solve_dtype": "auto"}


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("a.b", ("a.b",)),
        ("a.b, c.d", ("a.b", "c.d")),
        (["a.b", "c.d", "a.b"], ("a.b", "c.d")),
        (("x",), ("x",)),
        (("",), ("",)),  # how a patched bare layer's config names it (the model itself)
        (None, None),
    ],
)
def test_targets_are_normalised_once(targets, expected):
    assert TrActConfig(targets=targets).targets == expected


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"lambda_": float("inf")}, ValueError, "finite.*use_tract=False"),
        ({"lambda_": float("nan")}, ValueError, "finite"),
        ({"lambda_": 0}, ValueError, "> 0"),
        ({"lambda_": -1.0}, ValueError, "> 0"),
        ({"lambda_": True}, TypeError, "float"),
        ({"lambda_": "0.1"}, TypeError, "float"),
        ({"targets": " , "}, ValueError, "names no layer"),
        ({"targets": []}, ValueError, "names no layer"),
        ({"targets": ""}, ValueError, "names no layer"),
        ({"targets": [""]}, ValueError, "names no layer"),
        ({"targets": [1]}, TypeError, "module name"),
        ({"sync_gram": 1}, TypeError, "sync_gram"),
        ({"sync_gram": "true"}, TypeError, "sync_gram"),
        ({"solve_dtype": torch.float16}, ValueError, "solve_dtype"),
        ({"solve_dtype": "bfloat16"}, ValueError, "solve_dtype"),
    ],
)
def test_invalid_options_name_the_fix(options, error, match):
    with pytest.raises(error, match=match):
        TrActConfig(**options)


def test_frozen_and_replace_validates():
    config = TrActConfig(lambda_=0.2, solve_dtype="float32")
    assert config.solve_dtype is torch.float32 and TrActConfig(solve_dtype="auto").solve_dtype is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lambda_ = 0.3
    assert config.replace(lambda_=0.3).lambda_ == 0.3 and config.lambda_ == 0.2
    with pytest.raises(ValueError, match="finite"):
        config.replace(lambda_=float("inf"))
    assert hash(config) == hash(TrActConfig(0.2, None, False, torch.float32))


def test_sync_group_is_none_without_a_process_group():
    assert TrActConfig().sync_group() is None
    assert TrActConfig(sync_gram=True).sync_group() is None  # not initialised: per-process Gram


def test_each_patched_layer_holds_the_config():
    model = apply_tract(tiny_vit(), TrActConfig(lambda_=0.2, solve_dtype=torch.float64))
    layer = tract_layers(model)[FIRST_LAYER]
    assert layer.tract_config == TrActConfig(0.2, (FIRST_LAYER,), False, torch.float64)
    assert (layer.tract_lambda, layer.tract_sync_gram, layer.tract_solve_dtype) == (0.2, False, torch.float64)
    assert tract_config_of(model) == layer.tract_config
    # Keyword options override the config; without a config, the model's own patch is the base.
    apply_tract(model, lambda_=0.3)
    assert tract_config_of(model) == TrActConfig(0.3, (FIRST_LAYER,), False, torch.float64)
    apply_tract(model, TrActConfig(), lambda_=0.05)
    assert tract_config_of(model) == TrActConfig(0.05, (FIRST_LAYER,))
    remove_tract(model)
    assert tract_config_of(model) is None and "tract_config" not in vars(model.get_submodule(FIRST_LAYER))


def test_positional_lambda_still_works():
    model = apply_tract(tiny_vit(), 0.2)
    assert tract_config_of(model).lambda_ == 0.2
    with pytest.raises(TypeError, match="TrActConfig"):
        apply_tract(tiny_vit(), "0.2")


def test_bad_solve_dtype_is_rejected():
    with pytest.raises(ValueError, match="solve_dtype"):
        apply_tract(conv_stem(), solve_dtype=torch.bfloat16)
