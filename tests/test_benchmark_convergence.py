"""Tests of the convergence benchmark, `benchmarks/convergence/` (runner and report).

The headline arithmetic on made-up results, the augmentation, whitening and optimizer plumbing, and a CI smoke
run of `--quick`. No accuracy is checked: the smoke run only shows that every code path (learning-rate
search, interleaved timing, plain / TrAct / ablation / fidelity runs, resume, table, plots) executes and
writes complete results.
"""

import json
import subprocess
import sys

import pytest
import torch

from hf_tract import TrActConfig, find_first_layer, tract_layers

from .benchmark_scripts import REPO_ROOT
from benchmarks.convergence import data, models, optimizers, planning, presets, report
from benchmarks.convergence.training import FIRST_STEPS_LOGGED


def test_crossing_epochs():
    budgets = [1, 2, 4, 8]
    assert report.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.9) is None
    assert report.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.4) == 1.0
    assert report.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.7) == 4.0
    # halfway between 2 and 4 epochs in log2 space
    assert report.crossing_epochs(budgets, [0.5, 0.6, 0.7, 0.8], 0.65) == pytest.approx(2 ** 1.5)
    # first crossing of a non-monotone curve
    assert report.crossing_epochs(budgets, [0.5, 0.9, 0.7, 0.95], 0.85) == pytest.approx(2 ** 0.875)


def _fake_result(plain: dict[int, tuple[float, float]], tract: dict[int, tuple[float, float]], seeds: int = 2) -> dict:
    """Runs whose (test accuracy, training loss) per budget are given; seed 0 / 1 sit 0.01 below / above."""
    runs = []
    for variant, curve in (("plain", plain), ("tract_0.1", tract)):
        for epochs, (acc, loss) in curve.items():
            for seed in range(seeds):
                offset = 0.01 if seed else -0.01
                runs.append({"setting": "vit-adam-std", "variant": variant, "lr": 1e-3, "epochs": epochs, "seed": seed,
                             "test_acc": acc + offset, "train_loss": loss + offset, "test_loss": loss + 0.2,
                             "train_seconds": epochs * (1.2 if variant == "plain" else 1.5), "diverged": False})
    return {
        "preset": {"budgets": sorted(plain), "seeds": list(range(seeds))},
        "lr_choice": {"vit-adam-std": {"lr": 1e-3}},
        "step_times": {"vit-adam-std": {"ratio": {"0.1": 1.25}}},
        "runs": runs,
    }


def test_headline_ratios():
    plain = {1: (0.5, 1.0), 2: (0.6, 0.8), 4: (0.7, 0.6), 8: (0.8, 0.4)}
    tract = {1: (0.6, 0.9), 2: (0.7, 0.6), 4: (0.8, 0.4), 8: (0.85, 0.3)}
    (row,) = report.headline(_fake_result(plain, tract))
    assert row["plain_best_acc"] == pytest.approx(0.8) and row["plain_best_epochs"] == 8
    assert row["tract_match_epochs"] == 4 and row["epoch_ratio"] == 2.0
    assert row["wallclock_ratio"] == pytest.approx(2.0 / 1.25)
    assert row["measured_run_ratio"] == pytest.approx(8 * 1.2 / (4 * 1.5))
    assert row["tract_acc_at_plain_best_epochs"] == pytest.approx(0.85)
    # training loss: plain ends at 0.4 after 8 epochs; TrAct is there after 4
    assert row["plain_final_train_loss"] == pytest.approx(0.4) and row["plain_final_epochs"] == 8
    assert row["tract_train_loss_match_epochs"] == 4 and row["train_loss_epoch_ratio"] == 2.0
    assert row["train_loss_epoch_ratio_interp"] == pytest.approx(2.0)
    assert row["train_loss_wallclock_ratio"] == pytest.approx(2.0 / 1.25)
    # plain's 0.6 at 4 epochs: TrAct reaches it at 2 epochs
    assert row["train_loss_epoch_ratio_interp_by_budget"][4] == pytest.approx(2.0)

    # TrAct's loss halfway (in log2 epochs) between 4 and 8 epochs
    tract_slow = {1: (0.5, 1.0), 2: (0.55, 0.9), 4: (0.6, 0.5), 8: (0.7, 0.3)}
    (row,) = report.headline(_fake_result(plain, tract_slow))
    assert row["tract_match_epochs"] is None and row["epoch_ratio"] is None and row["wallclock_ratio"] is None
    assert row["tract_train_loss_match_epochs"] == 8
    assert row["tract_train_loss_match_epochs_interp"] == pytest.approx(2 ** 2.5)

    # a budget missing for one seed of one variant is left out of the comparison
    result = _fake_result(plain, tract)
    result["runs"] = [r for r in result["runs"] if not (r["variant"] == "tract_0.1" and r["epochs"] == 8 and r["seed"] == 1)]
    (row,) = report.headline(result)
    assert row["budgets"] == [1, 2, 4] and row["plain_best_epochs"] == 4 and row["plain_final_epochs"] == 4


def test_headline_pairs_seeds_of_an_ablation():
    """An ablation variant with fewer seeds is compared with the plain model on the same seeds only."""
    result = _fake_result({2: (0.6, 0.8), 4: (0.7, 0.6)}, {2: (0.7, 0.6), 4: (0.8, 0.4)}, seeds=3)
    result["runs"] += [{"setting": "vit-adam-std", "variant": "tract_0.1_sgd1", "lr": 1e-3, "epochs": 4, "seed": 0,
                        "test_acc": 0.69, "train_loss": 0.59, "test_loss": 0.8, "train_seconds": 6.0, "diverged": False}]
    rows = {row["variant"]: row for row in report.headline(result)}
    ablation = rows["tract_0.1_sgd1"]
    assert ablation["seeds"] == [0] and ablation["budgets"] == [4]
    assert ablation["plain_best_acc"] == pytest.approx(0.69)  # plain's seed 0 alone
    assert ablation["tract_match_epochs"] == 4
    assert rows["tract_0.1"]["seeds"] == [0, 1, 2]


_REPORT_FIELDS = {
    "environment": {"command": "cmd", "git_commit": "abc", "device": "cpu", "torch": "2", "transformers": "5",
                    "torch_threads": 1, "cpu_count": 2, "started": "now"},
    "data": {"subset": "a subset"},
    "lr_grids": {"adam": [1e-3, 3e-3]},
}


def test_an_initialisation_with_its_own_learning_rate():
    """`Preset.own_lr_inits`: the whitened runs at their own choice count, those at the setting's are left out."""
    result = _fake_result({2: (0.6, 0.8)}, {2: (0.7, 0.6)}, seeds=1)
    whitened = [dict(run, variant="plain_whiten", first_layer_init="whiten", lr=lr, test_acc=acc)
                for run in result["runs"] if run["variant"] == "plain" for lr, acc in ((1e-3, 0.5), (3e-3, 0.65))]
    result["runs"] += whitened
    result["lr_choice"]["vit-adam-std|whiten"] = {"lr": 3e-3, "val_acc": {"0.001": 0.5, "0.003": 0.6}}
    assert report.chosen_lr(result, "vit-adam-std", "whiten") == 3e-3
    assert report.chosen_lr(result, "vit-adam-std", "whiten_frozen") == report.chosen_lr(result, "vit-adam-std") == 1e-3
    table = report.runs_by_budget(result)["vit-adam-std"]
    assert table["plain_whiten"][2][0]["test_acc"] == 0.65 and table["plain"][2][0]["lr"] == 1e-3
    result["preset"].update(lambdas=[0.1], batch_size=128, vit={}, resnet={}, lr_budget=2, own_lr_inits=["whiten"])
    result["lr_choice"]["vit-adam-std"]["val_acc"] = {"0.001": 0.55}
    result["step_times"]["vit-adam-std"]["seconds_per_step"] = {"plain": 0.01}
    markdown = report.markdown_report(dict(result, mode="cpu-full-whitening-own-lr", **_REPORT_FIELDS), [], REPO_ROOT)
    assert "### vit-adam-std (lr 0.001; whiten 0.003)" in markdown
    assert "- vit-adam-std, first layer whiten init: 0.001: 50.00, 0.003: 60.00 → 0.003" in markdown
    assert presets.PRESETS["cpu-full-whitening-own-lr"].own_lr_inits == ["whiten", "whiten_frozen"]


def test_fidelity_rows():
    result = _fake_result({4: (0.7, 0.6)}, {4: (0.8, 0.4)}, seeds=1)
    for run in result["runs"]:
        run["first_losses"] = [2.0, 1.5, 1.0]
    result["runs"] += [
        dict(result["runs"][-1], variant="official_0.1", first_losses=[2.0, 1.5 + 1e-6, 1.0 - 3e-6]),
        dict(result["runs"][-1], variant="tract_0.1_f64", first_losses=[2.0, 1.5, 1.0 + 2e-7]),
    ]
    (row,) = report.fidelity(result)
    assert row["steps_compared_official"] == 3
    assert row["max_abs_loss_diff_official"] == pytest.approx(3e-6)
    assert row["max_abs_loss_diff_f64"] == pytest.approx(2e-7)
    assert [r["variant"] for r in report.headline(result)] == ["tract_0.1"]  # fidelity runs stay out of the headline


def test_augment_crops_and_flips_deterministically():
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).reshape(2, 1, 28, 28).to(torch.uint8)
    images[:, :, 0, 0] = 255  # a marker the crop moves
    a = data.augment(images, 2, True, torch.Generator().manual_seed(3))
    b = data.augment(images, 2, True, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(data.augment(images, 0, False, torch.Generator()), images)
    # every output is a shifted (and possibly mirrored) copy of its input, with zeros shifted in
    for out, img in zip(a, images):
        found = False
        for flipped in (out, out.flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    shifted = torch.zeros_like(img)
                    src = img[:, max(0, dy) : 28 + min(0, dy), max(0, dx) : 28 + min(0, dx)]
                    shifted[:, max(0, -dy) : 28 + min(0, -dy), max(0, -dx) : 28 + min(0, -dx)] = src
                    found |= torch.equal(flipped, shifted)
        assert found


def test_variants_are_described_by_tract_configs():
    assert presets.PLAIN.name == "plain" and presets.PLAIN.tract is None
    variant = presets.Variant.with_tract(0.1, solve_dtype=torch.float64)
    assert variant.tract == TrActConfig(lambda_=0.1, solve_dtype="float64") and variant.name == "tract_0.1_f64"
    assert presets.Variant.with_tract(0.2, implementation="official").name == "official_0.2"
    assert presets.Variant.with_tract(0.1, first_layer_init="whiten").name == "tract_0.1_whiten"
    assert presets.Variant(first_layer_init="whiten_frozen").name == "plain_whiten_frozen"
    assert variant.record()["tract_config"] == variant.tract.to_dict()
    with pytest.raises(ValueError):
        presets.Variant(first_layer_sgd_lr=0.1)  # the ablation is a TrAct variant
    model = models.apply_variant(models.build_model("vit", presets.SMALL_VIT, 0), variant)
    (config,) = {layer.tract_config for layer in tract_layers(model).values()}
    assert config.lambda_ == 0.1 and config.solve_dtype == torch.float64


def test_frozen_whitening_trains_only_the_bias_of_the_first_layer():
    preset = presets.PRESETS["quick"]
    model = models.apply_variant(models.build_model("vit", preset.vit, 0), presets.Variant(first_layer_init="whiten_frozen"),
                                 whitening_inputs=torch.randn(8, 1, 28, 28))
    _, first = find_first_layer(model)
    optimizer = optimizers.make_optimizer("adam", model, 1e-3, presets.PLAIN)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(first.weight) not in held and id(first.bias) in held


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = models.build_model("vit", presets.SMALL_VIT, 0)
    optimizer = optimizers.make_optimizer("muon", model, 0.02, presets.PLAIN)
    adamw, muon = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "classifier" not in names[id(p)] for p in model.parameters() if id(p) in in_muon)
    assert id(model.vit.embeddings.patch_embeddings.projection.weight) not in in_muon
    assert id(model.vit.layers[0].attention.q_proj.weight) in in_muon
    assert len(in_muon) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_first_layer_lr_variant_is_an_own_group_of_the_same_optimizer():
    variant = presets.Variant.with_tract(0.1, first_layer_lr=1e-3)
    assert variant.name == "tract_0.1_lr1st0.001" and report._label(variant.name) == "TrAct λ=0.1, 1st layer lr 0.001"
    model = models.apply_variant(models.build_model("vit", presets.SMALL_VIT, 0), variant)
    optimizer = optimizers.make_optimizer("adam", model, 1e-2, variant)
    _, first = find_first_layer(model)
    (group,) = [g for g in optimizer.param_groups if any(p is first.weight for p in g["params"])]
    assert isinstance(optimizer, torch.optim.AdamW) and group["lr"] == 1e-3 and group["name"] == "tract"
    assert {g["lr"] for g in optimizer.param_groups if g.get("name") != "tract"} == {1e-2}
    with pytest.raises(ValueError, match="need a TrAct config"):
        presets.Variant(first_layer_lr=1e-3)
    assert variant in presets.PRESETS["cpu-full-first-layer-lr"].main_variants("vit-adam-std")


def test_first_layer_sgd_optimizers_split_the_parameters():
    variant = presets.Variant.with_tract(0.1, first_layer_sgd_lr=0.05)
    assert variant.name == "tract_0.1_sgd1"
    model = models.apply_variant(models.build_model("vit", presets.PRESETS["quick"].vit, 0), variant)
    adamw, sgd = optimizers.make_optimizer("adam", model, 1e-3, variant).optimizers  # hf_tract.optim.CombinedOptimizer
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    first = model.vit.embeddings.patch_embeddings.projection
    sgd_params = {id(p) for group in sgd.param_groups for p in group["params"]}
    adam_params = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert sgd_params == {id(first.weight), id(first.bias)} and sgd.param_groups[0]["lr"] == 0.05
    assert not sgd_params & adam_params and sgd_params | adam_params == {id(p) for p in model.parameters()}


@pytest.mark.slow
def test_quick_mode_smoke(tmp_path):
    try:
        data_dir = data.find_data_dir(None)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")
    output = tmp_path / "convergence_quick.json"
    arguments = ["--quick", "--data-dir", str(data_dir), "--output", str(output), "--plots-dir", str(tmp_path)]
    # the folder run as a script here, `python -m` for the resume below: both entry points
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "convergence"), *arguments], check=True, cwd=REPO_ROOT, timeout=300)

    result = json.loads(output.read_text())
    preset = presets.PRESETS["quick"]
    for key in ("device", "torch", "transformers", "git_commit", "command", "finished"):
        assert result["environment"][key]
    assert result["data"]["augmentation"].startswith("random crop")
    assert set(result["lr_choice"]) == set(preset.settings) == set(result["step_times"])
    assert "tract_0.1_sgd1" in result["step_times"]["vit-adam-std"]["ratio"]
    expected = {(s, v.name, e, seed) for s, v, e, seed in planning.planned_runs(preset)}
    assert ("vit-adam-std", "official_0.1", 1, 0) in expected and ("vit-adam-std", "tract_0.1", 3, 1) in expected
    chosen = {s: result["lr_choice"][s]["lr"] for s in preset.settings}
    runs = [(r["setting"], r["variant"], r["epochs"], r["seed"]) for r in result["runs"] if r["lr"] == chosen[r["setting"]]]
    assert sorted(runs) == sorted(expected)  # each run once (the learning-rate search run is reused)
    for run in result["runs"]:
        for key in ("train_loss", "test_acc", "test_loss", "val_acc"):
            assert 0 <= run[key] < float("inf"), (key, run)
        assert len(run["first_losses"]) == min(FIRST_STEPS_LOGGED, run["steps"])

    rows = {(row["setting"], row["variant"]): row for row in report.headline(result)}
    assert set(rows) == {("vit-adam-std", "tract_0.1"), ("vit-adam-std", "tract_0.05"), ("vit-adam-std", "tract_0.1_sgd1"),
                         ("resnet-sgd-contrast", "tract_0.1")}
    main = rows[("vit-adam-std", "tract_0.1")]
    assert main["budgets"] == [1, 2, 3] and main["plain_final_epochs"] == 3  # the late budget joins the comparison
    for row in rows.values():
        for key in ("plain_final_train_loss", "train_loss_epoch_ratio_interp_by_budget", "plain_best_acc", "epoch_ratio_interp_by_budget"):
            assert key in row
    (fid,) = report.fidelity(result)
    assert fid["steps_compared_official"] == fid["steps_compared_f64"] == 4  # one epoch of 256 / 64
    assert fid["max_abs_loss_diff_official"] < 1e-3 and fid["max_abs_loss_diff_f64"] < 1e-3

    markdown = output.with_suffix(".md").read_text()
    assert "## Headline" in markdown and "plain final train loss" in markdown and "plain best test acc" in markdown
    assert "vit-adam-std" in markdown and "resnet-sgd-contrast" in markdown and "## Fidelity" in markdown
    for name in ("train_loss", "test_acc", "wallclock"):
        assert (tmp_path / f"convergence_quick_{name}.png").stat().st_size > 0

    # --resume finds every run done and trains nothing new
    subprocess.run([sys.executable, "-m", "benchmarks.convergence", *arguments, "--resume"], check=True, cwd=REPO_ROOT, timeout=300)
    resumed = json.loads(output.read_text())
    assert resumed["runs"] == result["runs"]
    assert resumed["previous_environments"][0]["started"] == result["environment"]["started"]


@pytest.mark.parametrize("setting, variant", [
    ("vit-muon-std", presets.Variant.with_tract(0.1)),
    ("vit-adam-std", presets.Variant.with_tract(0.1, first_layer_init="whiten")),
    ("vit-adam-std", presets.Variant(first_layer_init="whiten_frozen")),
])
def test_item2_runs_train(setting, variant):
    """Muon (+ TrAct) and the whitened first layer (+ TrAct, or frozen) run end to end on random images."""
    from benchmarks.convergence.training import train_run

    preset = presets.PRESETS["quick"]
    gen = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = lambda n: torch.randint(0, 10, (n,), generator=gen)
    fake = data.Data(images(128), labels(128), images(32), labels(32), images(32), labels(32), 0.3, 0.35)
    rec = train_run(presets.Setting.from_name(setting), preset, fake, data.eval_sets(fake, "std", 32), 0.01, variant, 1,
                    0, torch.device("cpu"))
    assert rec["steps"] == 2 and not rec["diverged"] and 0 <= rec["test_acc"] <= 1
