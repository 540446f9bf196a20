"""Tests of the fine-tuning benchmark, `benchmarks/finetune/`: the Hugging Face checkpoint path, the splits, a CI smoke.

No accuracy is checked: the smoke run shows that pretraining, `save_pretrained` -> `from_pretrained` with a new head,
the learning-rate choice, plain and TrAct fine-tuning, resume and the report execute and write complete results.
"""

import json
import subprocess
import sys

import pytest
import torch

from .benchmark_scripts import REPO_ROOT
from benchmarks.convergence.data import find_data_dir
from benchmarks.finetune import checkpoints, cli, report, tasks
from benchmarks.finetune.presets import ALL, PRESETS


def _data_dirs():
    try:
        return find_data_dir(None, "fashion-mnist"), find_data_dir(None, "mnist")
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST / MNIST not available: {err}")


def test_target_split_relabels_and_holds_out_validation():
    fashion, _ = _data_dirs()
    data = tasks.target_task("fmnist59", fashion, n_val=100, labels=500, n_test=ALL, mean=0.3, std=0.35)
    assert len(data.train_x) == 500 and len(data.val_x) == 100 and len(data.test_x) == 5_000
    assert set(data.train_y.tolist()) == set(range(5)) and set(data.test_y.tolist()) == set(range(5))
    everything = tasks.target_task("fmnist59", fashion, n_val=100, labels=ALL, n_test=10, mean=0.3, std=0.35)
    assert len(everything.train_x) == 30_000 - 100 and torch.equal(everything.train_x[:500], data.train_x)
    assert torch.equal(everything.val_x, data.val_x)  # the same held-out images for every label budget


@pytest.mark.slow  # pretrains, saves and reloads a model
def test_checkpoint_loads_with_a_new_seeded_head(tmp_path):
    preset = PRESETS["smoke"]
    fashion, _ = _data_dirs()
    source = tasks.source_task("fmnist04", fashion, 64)
    record = checkpoints.pretrain("vit", "fmnist04", source, preset, tmp_path, torch.device("cpu"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert checkpoints.processor_stats(tmp_path) == pytest.approx((source.mean, source.std))
    a = checkpoints.load_for_finetuning(tmp_path, "fmnist59", seed=0, device=torch.device("cpu"))
    b = checkpoints.load_for_finetuning(tmp_path, "fmnist59", seed=1, device=torch.device("cpu"))
    assert a.config.id2label[0] == "Sandal" and record["source_test_acc"] >= 0
    assert torch.equal(a.vit.embeddings.patch_embeddings.projection.weight, b.vit.embeddings.patch_embeddings.projection.weight)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)  # a new head, seeded per run


@pytest.mark.slow
def test_smoke_mode(tmp_path):
    _data_dirs()
    output = tmp_path / "finetune_smoke.json"
    arguments = ["--mode", "smoke", "--archs", "vit", "--transfers", "mnist->fmnist", "--output", str(output), "--plots-dir", str(tmp_path),
                 "--checkpoint-dir", str(tmp_path / "checkpoints")]
    subprocess.run([sys.executable, "-m", "benchmarks.finetune", *arguments], check=True, cwd=REPO_ROOT, timeout=120)
    result = json.loads(output.read_text())
    preset = PRESETS["smoke"]
    for key in ("device", "torch", "transformers", "git_commit", "command", "finished"):
        assert result["environment"][key]
    assert set(result["pretraining"]) == {"vit|mnist"}
    cells = {run["cell"] for run in result["runs"]}
    assert cells == {"vit|mnist->fmnist|64"} == set(result["lr_choice"])
    chosen = [r for r in result["runs"] if r["lr"] == result["lr_choice"][r["cell"]]["lr"]]
    assert len(chosen) == len(cells) * len(preset.seeds) * (1 + len(preset.lambdas))
    for run in result["runs"]:
        assert 0 <= run["test_acc"] <= 1 and run["first_layer_drift"] > 0 and run["train_loss"] < float("inf")
    rows = report.summarize(result)
    assert {r["variant"] for r in rows} == {"plain", "tract_0.1"} and all("test_acc_diff" in r for r in rows if r["variant"] != "plain")
    markdown = output.with_suffix(".md").read_text()
    assert "## Results" in markdown and "TrAct λ=0.1" in markdown
    assert (tmp_path / "finetune_smoke_test_acc.png").stat().st_size > 0

    # --resume reuses the checkpoints and the runs: only the learning rate checked outside the grid is new
    # (in-process: no second start-up; --threads 0 leaves this process's torch threads alone)
    cli.main([*arguments, "--resume", "--threads", "0", "--extra-lrs", "vit=0.003"])
    resumed = json.loads(output.read_text())
    assert resumed["runs"][: len(result["runs"])] == result["runs"] and resumed["pretraining"] == result["pretraining"]
    assert len(resumed["runs"]) == len(result["runs"]) + 1 and resumed["lr_choice"] == result["lr_choice"]
    assert set(resumed["lr_check"]["vit|mnist->fmnist|64"]) == {"0.003"}
    assert "outside the grid" in output.with_suffix(".md").read_text()
