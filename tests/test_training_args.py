"""TrActTrainingArguments: defaults, validation, command line / JSON / YAML, what a run was given."""

import json

import pytest
import torch
import yaml
from transformers import HfArgumentParser

from hf_tract import (
    TrActConfig,
    TrActTrainingArguments,
)

from tests.conftest import (
    make_args,
)


def test_arguments_defaults_and_to_dict(tmp_path):
    args = make_args(tmp_path)
    # The TrActConfig options are "not given" by default: the model's patch, else TrActConfig's defaults.
    assert (args.use_tract, args.tract_lambda, args.tract_target, args.tract_sync_gram) == (True, None, None, None)
    assert args.tract_solve_dtype is None and args.tract_options == {} and args.tract_config == TrActConfig()
    assert args.tract_config.lambda_ == 0.1
    assert args.tract_optimizer == "same" and args.tract_learning_rate is None and args.tract_log_stats is False
    d = args.to_dict()
    for key in ("use_tract", "tract_lambda", "tract_target", "tract_sync_gram", "tract_solve_dtype", "tract_optimizer"):
        assert key in d
    assert json.loads(args.to_json_string())["tract_lambda"] is None


def test_arguments_json_round_trip_keeps_what_was_given(tmp_path):
    """to_json_string -> HfArgumentParser.parse_dict gives the same explicitly-set options, and only them."""
    parser = HfArgumentParser(TrActTrainingArguments)
    cases = [
        ({}, set()),
        ({"tract_lambda": 0.3}, {"lambda_"}),
        ({"tract_target": ["a.b", "c"], "tract_solve_dtype": "float64"}, {"targets", "solve_dtype"}),
        ({"tract_sync_gram": False}, {"sync_gram"}),
    ]
    for given, expected in cases:
        args = make_args(tmp_path, **given)
        (again,) = parser.parse_dict(json.loads(args.to_json_string()))
        assert set(args.tract_options) == expected
        assert again.tract_options == args.tract_options and again.tract_config == args.tract_config


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"tract_lambda": 0.0}, ValueError, "tract_lambda"),
        ({"tract_lambda": -1.0}, ValueError, "tract_lambda"),
        ({"tract_lambda": float("nan")}, ValueError, "tract_lambda"),
        ({"tract_lambda": float("inf")}, ValueError, "tract_lambda.*use_tract=False"),
        ({"tract_lambda": "0.1"}, TypeError, "tract_lambda"),
        ({"tract_lambda": True}, TypeError, "tract_lambda"),
        ({"tract_target": " , "}, ValueError, "tract_target"),
        ({"tract_solve_dtype": "float16"}, ValueError, "tract_solve_dtype"),
        ({"tract_sync_gram": "yes"}, TypeError, "tract_sync_gram"),
        ({"tract_optimizer": "adam"}, ValueError, "tract_optimizer"),
        ({"tract_optimizer": "sgd"}, ValueError, "tract_learning_rate"),
        ({"tract_learning_rate": 0.0}, ValueError, "tract_learning_rate"),
        ({"tract_weight_decay": -0.1}, ValueError, "tract_weight_decay"),
        ({"tract_momentum": 1.0}, ValueError, "tract_momentum"),
        ({"muon_learning_rate": 0.0}, ValueError, "muon_learning_rate"),
        ({"muon_learning_rate": 0.01, "fsdp": True}, ValueError, "not with FSDP|with FSDP or DeepSpeed"),
    ],
)
def test_arguments_validation(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        make_args(tmp_path, **overrides)


def test_arguments_target_list(tmp_path):
    args = make_args(tmp_path, tract_target=["a.b", "c.d"])
    assert args.tract_target == "a.b,c.d" and args.tract_targets == ("a.b", "c.d")
    assert make_args(tmp_path, tract_target=" a.b ").tract_targets == ("a.b",)
    assert args.tract_config.targets == ("a.b", "c.d")


def test_arguments_cli_json_yaml(tmp_path):
    parser = HfArgumentParser(TrActTrainingArguments)
    cli = [
        "--output_dir", str(tmp_path), "--tract_lambda", "0.2", "--tract_target", "x.y,z",
        "--tract_sync_gram", "--tract_optimizer", "sgd", "--tract_learning_rate", "0.05", "--use_tract", "false",
        "--tract_solve_dtype", "float32", "--tract_log_stats",
    ]  # fmt: skip
    (args,) = parser.parse_args_into_dataclasses(args=cli)
    assert (args.tract_lambda, args.tract_targets, args.tract_sync_gram) == (0.2, ("x.y", "z"), True)
    assert args.tract_config == TrActConfig(0.2, ("x.y", "z"), True, torch.float32) and args.tract_log_stats
    (off,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--tract_sync_gram", "false"])
    assert off.tract_options == {"sync_gram": False}
    assert (args.tract_optimizer, args.tract_learning_rate, args.use_tract) == ("sgd", 0.05, False)

    values = {"output_dir": str(tmp_path), "tract_lambda": 0.05, "tract_sync_gram": True, "tract_weight_decay": 0.0}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(values))
    for parsed in (parser.parse_json_file(tmp_path / "a.json")[0], parser.parse_yaml_file(tmp_path / "a.yaml")[0]):
        assert (parsed.tract_lambda, parsed.tract_sync_gram, parsed.tract_weight_decay) == (0.05, True, 0.0)
    for bad in ("0", "inf", "nan"):
        with pytest.raises(ValueError, match="tract_lambda"):
            parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--tract_lambda", bad])
