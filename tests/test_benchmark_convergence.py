"""Tests of benchmarks/convergence.py: the headline arithmetic, and a CI smoke run of `--quick`.

No accuracy is checked: the smoke run only shows that every code path (learning-rate search, interleaved
timing, TrAct and plain runs, resume, table, plots) executes and writes complete results.
"""

import json
import subprocess
import sys

import pytest

from .benchmark_scripts import REPO_ROOT, load_benchmark



def test_crossing_epochs():
    convergence = load_benchmark("convergence")
    budgets = [1, 2, 4, 8]
    assert convergence.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.9) is None
    assert convergence.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.4) == 1.0
    assert convergence.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.7) == 4.0
    # halfway between 2 and 4 epochs in log2 space
    assert convergence.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.65) == pytest.approx(2 ** 1.5)
    # first crossing of a non-monotone curve
    assert convergence.crossing_epochs(budgets, [0.5, 0.9, 0.7, 0.95], 0.85) == pytest.approx(2 ** 0.875)


def _fake_result(plain: dict[int, float], tract: dict[int, float], seeds: int = 2) -> dict:
    runs = []
    for variant, curve in (("plain", plain), ("tract_0.1", tract)):
        for epochs, acc in curve.items():
            for seed in range(seeds):
                runs.append({"setting": "vit-adam-std", "variant": variant, "lr": 1e-3, "epochs": epochs, "seed": seed,
                             "test_acc": acc + (0.01 if seed else -0.01), "train_seconds": epochs * (1.2 if variant == "plain" else 1.5),
                             "diverged": False})
    return {
        "preset": {"budgets": sorted(plain), "seeds": list(range(seeds))},
        "lr_choice": {"vit-adam-std": {"lr": 1e-3}},
        "step_times": {"vit-adam-std": {"ratio": {"0.1": 1.25}}},
        "runs": runs,
    }


def test_headline_ratios():
    convergence = load_benchmark("convergence")
    (row,) = convergence.headline(_fake_result({1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8}, {1: 0.6, 2: 0.7, 4: 0.8, 8: 0.85}))
    assert row["plain_best_acc"] == pytest.approx(0.8) and row["plain_best_epochs"] == 8
    assert row["tract_match_epochs"] == 4 and row["epoch_ratio"] == 2.0
    assert row["wallclock_ratio"] == pytest.approx(2.0 / 1.25)
    assert row["measured_run_ratio"] == pytest.approx(8 * 1.2 / (4 * 1.5))
    assert row["tract_acc_at_plain_best_epochs"] == pytest.approx(0.85)

    (row,) = convergence.headline(_fake_result({1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8}, {1: 0.5, 2: 0.55, 4: 0.6, 8: 0.7}))
    assert row["tract_match_epochs"] is None and row["epoch_ratio"] is None and row["wallclock_ratio"] is None

    # a budget missing for one variant is left out of the comparison
    result = _fake_result({1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8}, {1: 0.6, 2: 0.7, 4: 0.8, 8: 0.85})
    result["runs"] = [r for r in result["runs"] if not (r["variant"] == "tract_0.1" and r["epochs"] == 8 and r["seed"] == 1)]
    (row,) = convergence.headline(result)
    assert row["budgets"] == [1, 2, 4] and row["plain_best_epochs"] == 4


@pytest.mark.slow
def test_quick_mode_smoke(tmp_path):
    convergence = load_benchmark("convergence")
    try:
        data_dir = convergence.find_data_dir(None)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")
    output = tmp_path / "convergence_quick.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "convergence.py"), "--quick", "--data-dir", str(data_dir),
               "--output", str(output), "--plots-dir", str(tmp_path)]
    subprocess.run(command, check=True, cwd=REPO_ROOT, timeout=240)

    result = json.loads(output.read_text())
    preset = convergence.PRESETS["quick"]
    for key in ("device", "torch", "transformers", "git_commit", "command", "finished"):
        assert result["environment"][key]
    assert set(result["lr_choice"]) == set(preset.settings) == set(result["step_times"])
    expected = {(s, v, e, seed) for s in preset.settings for v in ["plain", *(f"tract_{lam}" for lam in preset.lambdas)]
                for e in preset.budgets for seed in preset.seeds}
    chosen = {s: result["lr_choice"][s]["lr"] for s in preset.settings}
    runs = [(r["setting"], r["variant"], r["epochs"], r["seed"]) for r in result["runs"] if r["lr"] == chosen[r["setting"]]]
    assert sorted(runs) == sorted(expected)  # each run once (the learning-rate search run is reused)
    assert len(convergence.headline(result)) == len(preset.settings) * len(preset.lambdas)
    markdown = output.with_suffix(".md").read_text()
    assert "## Headline" in markdown and "vit-adam-std" in markdown and "resnet-sgd-contrast" in markdown
    for axis in ("epochs", "wallclock"):
        assert (tmp_path / f"convergence_quick_{axis}.png").stat().st_size > 0

    # --resume finds every run done and trains nothing new
    subprocess.run([*command, "--resume"], check=True, cwd=REPO_ROOT, timeout=240)
    resumed = json.loads(output.read_text())
    assert resumed["runs"] == result["runs"]
    assert resumed["previous_environments"][0]["started"] == result["environment"]["started"]
