"""A training run killed mid-way resumes from its last checkpoint with TrAct active, and every
checkpoint it left is a plain transformers checkpoint."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_tract.hub import verify_plain_checkpoint


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "multiproc" / "train_until_killed.py"


def _train(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_killed_run_resumes_like_an_uninterrupted_run(tmp_path):
    uninterrupted = _train(tmp_path / "full", 8)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]

    killed = _train(tmp_path / "crash", 8, "--kill-at", 5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = sorted(p.name for p in (tmp_path / "crash").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        folder = tmp_path / "crash" / name
        # The model part of a checkpoint is a plain transformers model folder ...
        model_only = tmp_path / f"{name}-model"
        model_only.mkdir()
        for file in ("config.json", "model.safetensors"):
            shutil.copy(folder / file, model_only / file)
        verify_plain_checkpoint(model_only, load=name == "checkpoint-4")
        # ... and the optimizer / scheduler state holds tensors and plain containers only.
        for file in ("optimizer.pt", "scheduler.pt"):
            torch.load(folder / file, weights_only=True)

    resumed = _train(tmp_path / "crash", 8, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected = load_file(tmp_path / "full" / "final.safetensors")
    actual = load_file(tmp_path / "crash" / "final.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
