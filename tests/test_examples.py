"""End-to-end checks of the examples, the shipped top-k metric and the `hf-tract inspect` command.

The example scripts run in a subprocess, offline, on the embedded Fashion-MNIST subset with a tiny ViT and
a few steps: what CI can afford, and still the whole path a user takes (argument parsing, data, TrAct,
training, evaluation, saving, model card), checked from the files it leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
TINY_VIT = (
    "image_size=28,patch_size=7,num_channels=1,hidden_size=32,num_hidden_layers=1,"
    "num_attention_heads=2,intermediate_size=64"
)


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"),
        OMP_NUM_THREADS="1",
        # The checkout under test, whether or not (and however) the package is installed.
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run_example(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def assert_plain_checkpoint(output_dir: Path, num_labels: int = 10) -> None:
    """The checkpoint loads in vanilla transformers, with a plain first layer and no TrAct state in it."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert type(model.vit.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    assert model.config.num_channels == 1 and model.config.num_labels == num_labels
    # Same tensors under the same names as a never-patched model of the same config saves.
    plain_dir = output_dir.parent / "plain"
    AutoModelForImageClassification.from_config(model.config).save_pretrained(plain_dir)
    saved, plain = load_file(output_dir / "model.safetensors"), load_file(plain_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert len(processor.image_mean) == 1  # grayscale stays one channel


@pytest.mark.slow
def test_train_image_classification_tiny(tmp_path):
    output_dir = tmp_path / "out"
    result = run_example(
        "train_image_classification.py",
        [
            "--output_dir", str(output_dir),
            "--config_overrides", TINY_VIT,
            "--max_steps", "5",
            "--max_train_samples", "80",
            "--max_eval_samples", "64",
            "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "32",
            "--tract_lambda", "0.05",
            "--muon_learning_rate", "0.01",
        ],
        tmp_path,
    )
    assert "top-1 / top-5 accuracy on the 'test' split (64 images)" in result.stdout
    # At the default verbosity: one line that TrAct is on (lambda, layer), one where the model went; no noise.
    assert result.stdout.count("TrAct is on: lambda=0.05") == 1
    assert "on vit.embeddings.patch_embeddings.projection." in result.stdout
    assert result.stdout.count(f"saved to {output_dir}") == 1
    assert "pin_memory" not in result.stdout + result.stderr

    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"] <= 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert_plain_checkpoint(output_dir)

    card = (output_dir / "README.md").read_text()
    assert "- tract" in card  # Hub tag
    assert "0.05" in card  # lambda recorded in the TrAct section
    assert "vit.embeddings.patch_embeddings.projection" in card
    assert "trained from scratch" in card
    assert "the hidden Linear weights: `torch.optim.Muon` (lr 0.01)" in card


@pytest.mark.slow
def test_train_image_classification_without_tract(tmp_path):
    output_dir = tmp_path / "out"
    run_example(
        "train_image_classification.py",
        [
            "--output_dir", str(output_dir),
            "--config_overrides", TINY_VIT,
            "--max_steps", "2",
            "--max_train_samples", "32",
            "--max_eval_samples", "32",
            "--per_device_train_batch_size", "16",
            "--use_tract", "False",
        ],
        tmp_path,
    )
    assert "- tract" not in (output_dir / "README.md").read_text()
    assert_plain_checkpoint(output_dir)


@pytest.mark.slow
def test_train_no_trainer_tiny(tmp_path):
    output_dir = tmp_path / "out"
    result = run_example(
        "train_no_trainer.py",
        [
            "--output_dir", str(output_dir),
            "--config_overrides", TINY_VIT,
            "--max_train_steps", "5",
            "--max_train_samples", "80",
            "--max_eval_samples", "64",
            "--per_device_train_batch_size", "16",
        ],
        tmp_path,
    )
    assert "top-1 / top-5 accuracy on the 'test' split (64 images)" in result.stdout
    assert result.stdout.count("TrAct is on: lambda=0.1") == 1
    assert result.stdout.count(f"saved to {output_dir}") == 1
    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"] <= 1
    assert_plain_checkpoint(output_dir)


@pytest.mark.slow
def test_fine_tune_from_a_folder_saved_without_image_processor(tmp_path):
    """`model.save_pretrained(folder)` alone, then `--model_name_or_path folder`: a default image processor
    from the config (one log line naming --image_processor_name), and a card without a local base model."""
    from huggingface_hub import ModelCard
    from transformers import ViTConfig, ViTForImageClassification

    values = dict(item.split("=") for item in TINY_VIT.split(","))
    checkpoint = tmp_path / "pretrained"
    config = ViTConfig(**{key: int(value) for key, value in values.items()}, num_labels=5)
    ViTForImageClassification(config).save_pretrained(checkpoint)
    output_dir = tmp_path / "out"
    result = run_example(
        "train_image_classification.py",
        [
            "--model_name_or_path", str(checkpoint), "--ignore_mismatched_sizes", "True", "--use_tract",
            "--output_dir", str(output_dir), "--max_steps", "2", "--max_train_samples", "32",
            "--max_eval_samples", "32", "--per_device_train_batch_size", "16",
        ],
        tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert output.count("has no image processor") == 1 and "--image_processor_name" in output
    assert_plain_checkpoint(output_dir)

    card = ModelCard.load(output_dir / "README.md")  # the metadata parses
    assert "base_model" not in card.data.to_dict()
    assert str(tmp_path) not in card.content and "huggingface.co//" not in card.content
    assert "fine-tuned from a local checkpoint (`pretrained`" in card.text
    assert "trained from scratch" not in card.text
    assert "- tract" in card.content


@pytest.mark.slow  # loads the data and the checkpoint first
def test_checkpoint_head_of_another_size_is_a_one_line_error_naming_the_flag(capsys, monkeypatch, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    values = {key: int(value) for key, value in (item.split("=") for item in TINY_VIT.split(","))}
    ViTForImageClassification(ViTConfig(**values, num_labels=5)).save_pretrained(tmp_path / "pretrained")
    example = _load_example("train_image_classification")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    argv = ["--model_name_or_path", str(tmp_path / "pretrained"), "--max_train_samples", "16",
            "--max_eval_samples", "16", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        _run_main(example, argv, monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("pass --ignore_mismatched_sizes True to start a new classifier head")


def _run_main(module, argv: list[str], monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_image_classification.py", *argv])
    return module.main()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--tract_lambda", "-1"], "`tract_lambda` must be a finite number > 0"),
        (["--tract_lambda", "nan"], "`tract_lambda` must be a finite number > 0"),
        (["--tract_target", ""], "`tract_target`"),
        (["--tract_solve_dtype", "float16"], "invalid choice: 'float16'"),
        (["--tract_optimizer", "sgd"], "needs an explicit `tract_learning_rate`"),
        # Found when the Trainer patches the model: after loading the data and building the model.
        pytest.param(["--tract_target", "nope"], "'nope' is not a submodule", marks=pytest.mark.slow),
    ],
)
def test_bad_tract_options_are_one_line_errors(argv, expected, capsys, monkeypatch, tmp_path):
    example = _load_example("train_image_classification")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    tiny_run = ["--config_overrides", TINY_VIT, "--max_train_samples", "16", "--max_eval_samples", "16",
                "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        _run_main(example, [*tiny_run, *argv], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert err.startswith("train_image_classification.py: error: ")


def test_unreachable_hub_fails_at_once_naming_offline_mode(capsys, monkeypatch, tmp_path):
    import time

    import huggingface_hub

    example = _load_example("train_image_classification")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        _run_main(example, ["--model_name_or_path", "someone/some-vit"], monkeypatch, tmp_path)
    assert time.perf_counter() - start < 2  # huggingface_hub alone retries for ~30 s
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot reach the Hub" in err and "HF_HUB_OFFLINE=1" in err


def test_ddp_looks_for_unused_parameters_only_where_there_are_some():
    from transformers import ViTConfig, ViTForImageClassification

    example = _load_example("train_image_classification")
    values = {k: int(v) for k, v in (item.split("=") for item in TINY_VIT.split(","))}
    model = ViTForImageClassification(ViTConfig(**values, num_labels=3))
    batch = {"pixel_values": torch.randn(2, 1, 28, 28), "labels": torch.tensor([0, 2])}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert example.every_parameter_gets_a_gradient(model, batch)
    # The check leaves the model and the random state as they were.
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training

    model.unused = torch.nn.Linear(2, 2)  # a parameter the loss never reaches
    assert not example.every_parameter_gets_a_gradient(model, batch)


def test_no_trainer_script_adds_only_the_tract_lines():
    """The accelerate example shows users the two TrAct lines: the import and the apply_tract call."""
    source = (REPO / "examples" / "train_no_trainer.py").read_text()
    code = source.split('"""', 2)[2]  # after the module docstring, which shows the lines too
    assert code.count("from hf_tract import apply_tract") == 1
    assert code.count("apply_tract(model,") == 1
    # Patching must come before accelerate wraps the model.
    assert code.index("apply_tract(model,") < code.index("accelerator.prepare(")


# --- hf-tract inspect ----------------------------------------------------------------------------------


# --- What the examples share and need -------------------------------------------------------------------


def _load_example(name: str):
    import importlib.util

    sys.path.insert(0, str(REPO / "examples"))  # train_no_trainer imports train_image_classification
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "examples"))


def test_no_trainer_defaults_are_the_main_scripts():
    """train_no_trainer.py trains what the main script trains by default (it once said so and ran 5 epochs, not 15)."""
    import dataclasses

    main = _load_example("train_image_classification")
    loop = _load_example("train_no_trainer")
    defaults = {f.name: f.default for f in dataclasses.fields(loop.LoopArguments)}
    for key in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
                "weight_decay", "lr_scheduler_type", "seed"):  # fmt: skip
        assert defaults[key] == main.DEFAULT_TRAINING_ARGS[key], key
    assert defaults["warmup_ratio"] == main.DEFAULT_TRAINING_ARGS["warmup_steps"]
    assert defaults["num_train_epochs"] == 10
    # TrAct options left to TrActConfig's defaults (λ's default lives there only).
    assert defaults["tract_lambda"] is None and defaults["tract_solve_dtype"] is None


def test_examples_extra_installs_what_the_examples_import():
    import ast

    import tomllib
    import transformers

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    installed = names(project["dependencies"]) | names(project["optional-dependencies"]["examples"])
    distribution = {"PIL": "pillow", "yaml": "pyyaml"}
    local = {"hf_tract", "train_image_classification"}
    for script in (REPO / "examples").rglob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                assert distribution.get(top, top).lower() in installed, f"{script.name} imports {top}"
    # The image processor the examples build needs torchvision (transformers falls back with a warning without).
    backends = [cls.__name__ for cls in transformers.ViTImageProcessor.__mro__]
    assert "TorchvisionBackend" in backends and "torchvision" in installed
