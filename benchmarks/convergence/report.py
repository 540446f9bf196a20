"""Convergence benchmark (report): summaries, headline, markdown and plots of a results JSON.

Reads what the runner (`cli.py`) wrote; imports neither torch nor hf_tract, so a results file can be
re-rendered anywhere (`python -m benchmarks.convergence --report <json>`, or `write_report` here).

Headline, per setting and TrAct variant, on the seeds both the plain model and the variant ran:

- **to plain's final training loss**: the plain model's mean training loss (fixed training slice, eval
  mode) at its largest budget; the smallest budget at which TrAct's mean training loss is at most that;
  plain epochs / TrAct epochs (measured budgets, and interpolated linearly in log2(epochs));
- **to plain's best test accuracy**: the plain model's highest mean test accuracy over the budgets; the
  same ratios for TrAct to reach it;
- wall-clock ratios = epoch ratio / per-step time ratio (TrAct / plain, measured interleaved).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any


METRICS = ("test_acc", "test_loss", "train_loss")
METRIC_LABELS = {"test_acc": "test accuracy [%]", "test_loss": "test loss", "train_loss": "training loss (fixed slice, eval mode)"}


def _is_headline_variant(variant: str) -> bool:
    """TrAct variants of the comparison (not plain, not the fidelity-only official / float64 runs)."""
    return variant.startswith("tract_") and not variant.endswith("_f64")


def lr_choice_key(setting: str, first_layer_init: str = "default") -> str:
    """Where `result["lr_choice"]` keeps a learning-rate choice: the setting's name, or `setting|init` for a
    first-layer initialisation with its own search (`Preset.own_lr_inits`)."""
    return setting if first_layer_init == "default" else f"{setting}|{first_layer_init}"


def chosen_lr(result: dict[str, Any], setting: str, first_layer_init: str = "default") -> float | None:
    """The learning rate the runs of `setting` with `first_layer_init` use: the initialisation's own choice where
    it has one, else the setting's."""
    choice = result["lr_choice"].get(lr_choice_key(setting, first_layer_init)) or result["lr_choice"].get(setting)
    return None if choice is None else choice["lr"]


def runs_by_budget(result: dict[str, Any]) -> dict[str, dict[str, dict[int, dict[int, dict[str, Any]]]]]:
    """The runs with their chosen learning rate (`chosen_lr`), as `{setting: {variant: {epochs: {seed: run}}}}`.

    The other learning-rate search runs are left out.
    """
    table: dict[str, Any] = {}
    for rec in result["runs"]:
        if rec["lr"] != chosen_lr(result, rec["setting"], rec.get("first_layer_init", "default")):
            continue
        table.setdefault(rec["setting"], {}).setdefault(rec["variant"], {}).setdefault(rec["epochs"], {})[rec["seed"]] = rec
    return table


def _stats(recs: list[dict[str, Any]], metric: str) -> dict[str, float] | None:
    values = [r[metric] for r in recs if r.get(metric) is not None]
    if len(values) != len(recs) or not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Mean / std over seeds of every metric per setting, variant and budget.

    Returns:
        `dict`: `{setting: {variant: {epochs: {"n", "seeds", "seconds", "diverged", "test_acc", "test_loss",
        "train_loss"}}}}`; a metric is `{"mean", "std"}`, or `None` where a run lacks it (older results files).
    """
    summary: dict[str, Any] = {}
    for setting, variants in runs_by_budget(result).items():
        for variant, budgets in variants.items():
            for epochs, by_seed in sorted(budgets.items()):
                recs = [by_seed[s] for s in sorted(by_seed)]
                entry = {
                    "n": len(recs),
                    "seeds": sorted(by_seed),
                    "seconds": statistics.fmean(r["train_seconds"] for r in recs),
                    "diverged": sum(bool(r["diverged"]) for r in recs),
                }
                entry.update({metric: _stats(recs, metric) for metric in METRICS})
                summary.setdefault(setting, {}).setdefault(variant, {})[epochs] = entry
    return summary


def crossing_epochs(budgets: list[int], means: list[float], target: float) -> float | None:
    """First number of epochs at which a mean curve reaches `target` from below, interpolated.

    The curve is taken as piecewise linear in log2(epochs) between the measured budgets; `None` if it never
    reaches `target`, the smallest budget if it is reached there already (nothing measured below it). For a
    curve that should go down (a loss), pass the negated curve and target.
    """
    for i, (epochs, mean) in enumerate(zip(budgets, means)):
        if mean >= target:
            if i == 0:
                return float(epochs)
            lo, hi = math.log2(budgets[i - 1]), math.log2(epochs)
            frac = (target - means[i - 1]) / (mean - means[i - 1])
            return 2 ** (lo + frac * (hi - lo))
    return None


def _paired(by_budget: dict[str, dict[int, dict[int, Any]]], variant: str) -> tuple[list[int], dict[int, list[int]]]:
    """Budgets at which `variant` and plain ran the same, complete set of seeds, and those seeds per budget.

    A budget counts when its common seeds are as many as the variant's largest seed count (so a budget cut
    short by an interrupted run is left out).
    """
    plain, runs = by_budget.get("plain", {}), by_budget[variant]
    common = {b: sorted(set(runs[b]) & set(plain.get(b, {}))) for b in runs}
    full = max((len(runs[b]) for b in runs), default=0)
    budgets = sorted(b for b, seeds in common.items() if seeds and len(seeds) == full)
    return budgets, {b: common[b] for b in budgets}


def _mean(by_seed: dict[int, dict[str, Any]], seeds: list[int], metric: str) -> float | None:
    values = [by_seed[s].get(metric) for s in seeds]
    return None if any(v is None for v in values) else statistics.fmean(values)


def _std(by_seed: dict[int, dict[str, Any]], seeds: list[int], metric: str) -> float | None:
    values = [by_seed[s].get(metric) for s in seeds]
    if any(v is None for v in values):
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def step_time_ratio(result: dict[str, Any], setting: str, variant: str) -> float | None:
    """Interleaved per-step time ratio variant / plain (keyed by lambda for the main hf_tract variants)."""
    ratios = result["step_times"].get(setting, {}).get("ratio", {})
    return ratios.get(variant.removeprefix("tract_"), ratios.get(variant))


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and TrAct variant: epochs (and wall-clock) to the plain model's final training loss and best test accuracy.

    Means are over the seeds both ran (see [`_paired`]). Accuracy: the plain model's best is its highest mean
    test accuracy over the budgets (at the smallest budget that attains it); TrAct "matches" at the smallest
    budget whose mean is at least that. Training loss: the plain model's final training loss is its mean at
    its largest budget; TrAct matches at the smallest budget whose mean is at most that. Epoch ratio = plain
    budget / TrAct budget (`*_interp`: TrAct's curve interpolated in log2(epochs), see [`crossing_epochs`]);
    wall-clock ratio = epoch ratio / the interleaved per-step time ratio; `measured_run_ratio` = the same from
    the runs' own training times (noisier). `*_by_budget`: for every budget b, b / the interpolated epochs
    TrAct needs to reach the plain model's mean at b (`None`: never reached; capped at b / smallest budget).

    Returns:
        `list[dict]`: one row per (setting, variant).
    """
    rows = []
    for setting, variants in runs_by_budget(result).items():
        if "plain" not in variants:
            continue
        for variant in sorted(v for v in variants if _is_headline_variant(v)):
            budgets, seeds = _paired(variants, variant)
            if not budgets:
                continue
            plain, tract = variants["plain"], variants[variant]
            step_ratio = step_time_ratio(result, setting, variant)
            row: dict[str, Any] = {
                "setting": setting,
                "variant": variant,
                "lambda": float(variant.split("_")[1]),
                "budgets": budgets,
                "seeds": seeds[budgets[-1]],
                "step_time_ratio": step_ratio,
            }
            acc_plain = [_mean(plain[b], seeds[b], "test_acc") for b in budgets]
            acc_tract = [_mean(tract[b], seeds[b], "test_acc") for b in budgets]
            best_acc = max(acc_plain)
            best_budget = budgets[acc_plain.index(best_acc)]
            match = next((b for b, acc in zip(budgets, acc_tract) if acc >= best_acc), None)
            interp = crossing_epochs(budgets, acc_tract, best_acc)
            row.update(
                plain_best_acc=best_acc,
                plain_best_std=_std(plain[best_budget], seeds[best_budget], "test_acc"),
                plain_best_epochs=best_budget,
                tract_acc_at_plain_best_epochs=acc_tract[budgets.index(best_budget)],
                tract_std_at_plain_best_epochs=_std(tract[best_budget], seeds[best_budget], "test_acc"),
                tract_best_acc=max(acc_tract),
                tract_match_epochs=match,
                tract_match_epochs_interp=interp,
                epoch_ratio=None if match is None else best_budget / match,
                epoch_ratio_interp=None if interp is None else best_budget / interp,
                epoch_ratio_interp_by_budget={
                    b: (lambda c: None if c is None else b / c)(crossing_epochs(budgets, acc_tract, acc))
                    for b, acc in zip(budgets, acc_plain)
                },
                measured_run_ratio=None,
            )
            if match is not None:
                row["measured_run_ratio"] = (
                    statistics.fmean(plain[best_budget][s]["train_seconds"] for s in seeds[best_budget])
                    / statistics.fmean(tract[match][s]["train_seconds"] for s in seeds[match])
                )
            loss_plain = [_mean(plain[b], seeds[b], "train_loss") for b in budgets]
            loss_tract = [_mean(tract[b], seeds[b], "train_loss") for b in budgets]
            if None not in loss_plain and None not in loss_tract:
                final_loss, final_budget = loss_plain[-1], budgets[-1]
                loss_match = next((b for b, loss in zip(budgets, loss_tract) if loss <= final_loss), None)
                loss_interp = crossing_epochs(budgets, [-v for v in loss_tract], -final_loss)
                row.update(
                    plain_final_train_loss=final_loss,
                    plain_final_train_loss_std=_std(plain[final_budget], seeds[final_budget], "train_loss"),
                    plain_final_epochs=final_budget,
                    tract_train_loss_at_plain_final_epochs=loss_tract[-1],
                    tract_train_loss_match_epochs=loss_match,
                    tract_train_loss_match_epochs_interp=loss_interp,
                    train_loss_epoch_ratio=None if loss_match is None else final_budget / loss_match,
                    train_loss_epoch_ratio_interp=None if loss_interp is None else final_budget / loss_interp,
                    train_loss_epoch_ratio_interp_by_budget={
                        b: (lambda c: None if c is None else b / c)(crossing_epochs(budgets, [-v for v in loss_tract], -loss))
                        for b, loss in zip(budgets, loss_plain)
                    },
                )
            for key in ("epoch_ratio", "epoch_ratio_interp", "train_loss_epoch_ratio", "train_loss_epoch_ratio_interp"):
                wall = key.replace("epoch_ratio", "wallclock_ratio")
                row[wall] = None if row.get(key) is None or step_ratio is None else row[key] / step_ratio
            rows.append(row)
    return rows


def fidelity(result: dict[str, Any]) -> list[dict[str, Any]]:
    """hf_tract vs the official torch-tract (and vs hf_tract's float64 solve), run for run.

    For every setting, budget and seed with an `official_<lambda>` run and the matching `tract_<lambda>` run:
    the largest and mean absolute per-step loss difference over the first logged steps, and both runs'
    final metrics. The float64-solve run (`tract_<lambda>_f64`), where present, gives the spread that
    rounding alone causes.

    Returns:
        `list[dict]`: one row per (setting, lambda, epochs, seed).
    """
    rows = []
    for setting, variants in runs_by_budget(result).items():
        for official in sorted(v for v in variants if v.startswith("official_")):
            lam = official.removeprefix("official_")
            ours, f64 = variants.get(f"tract_{lam}", {}), variants.get(f"tract_{lam}_f64", {})
            for epochs, by_seed in sorted(variants[official].items()):
                for seed, off in sorted(by_seed.items()):
                    mine = ours.get(epochs, {}).get(seed)
                    if mine is None:
                        continue
                    row = {"setting": setting, "lambda": float(lam), "epochs": epochs, "seed": seed,
                           "hf_tract": {m: mine.get(m) for m in METRICS}, "official": {m: off.get(m) for m in METRICS}}
                    pairs = {"official": off, "f64": f64.get(epochs, {}).get(seed)}
                    for name, other in pairs.items():
                        if other is None or not mine.get("first_losses") or not other.get("first_losses"):
                            continue
                        diffs = [abs(a - b) for a, b in zip(mine["first_losses"], other["first_losses"])]
                        row[f"steps_compared_{name}"] = len(diffs)
                        row[f"max_abs_loss_diff_{name}"] = max(diffs)
                        row[f"mean_abs_loss_diff_{name}"] = statistics.fmean(diffs)
                        if name == "f64":
                            row["f64"] = {m: other.get(m) for m in METRICS}
                    rows.append(row)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def _pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _label(variant: str) -> str:
    """`tract_0.1` -> `TrAct λ=0.1`, `tract_0.1_sgd1` -> `TrAct λ=0.1, 1st layer SGD`, `plain_whiten` -> ..."""
    kind, *rest = variant.split("_")
    if kind == "plain":
        label = "plain"
    else:
        label = ("official torch-tract" if kind == "official" else "TrAct") + f" λ={rest.pop(0)}"
    if "whiten" in rest:
        label += ", whitened 1st layer" + (" (frozen)" if "frozen" in rest else "")
    if "sgd1" in rest:
        label += ", 1st layer SGD"
    if "f64" in rest:
        label += ", float64 solve"
    for part in rest:
        if part.startswith("lr1st"):
            label += f", 1st layer lr {part[len('lr1st'):]}"
    return label


def _ratio_cell(measured: float | None, interp: float | None) -> str:
    return f"{_fmt(measured, '.2f', '×')} ({_fmt(interp, '.2f', '×')})"


def _budgets_text(result: dict[str, Any]) -> str:
    """The budgets the runs have (the preset's, late ones, and any added with `--resume`), per setting where they differ."""
    by_setting: dict[str, set[int]] = {}
    for run in result["runs"]:
        by_setting.setdefault(run["setting"], set()).add(run["epochs"])
    distinct = {tuple(sorted(budgets)) for budgets in by_setting.values()}
    if len(distinct) <= 1:
        return str(sorted(next(iter(by_setting.values()), result["preset"]["budgets"])))
    return "; ".join(f"{name}: {sorted(budgets)}" for name, budgets in by_setting.items())


def markdown_report(result: dict[str, Any], plot_paths: list[str], md_dir: Path) -> str:
    """The markdown report (headline, every budget, fidelity, learning rates, timing) of a results file."""
    env = result["environment"]
    preset = result["preset"]
    lines = [
        f"# Convergence benchmark: TrAct vs plain (`{result['mode']}` mode)",
        "",
        f"- Command: `{env['command']}` at commit `{env['git_commit']}`",
        f"- Device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        + (f"torch-tract {env['torch_tract']}, " if env.get("torch_tract") else "")
        + f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs; started {env['started']}, "
        f"finished {env.get('finished', 'not finished')}; training time total {result.get('elapsed_seconds', 0) / 60:.1f} min",
        f"- Data: Fashion-MNIST, {result['data']['subset']}",
        f"- Augmentation (training batches): {result['data'].get('augmentation', 'none')}",
        f"- Budgets (epochs, each a full cosine run): {_budgets_text(result)}"
        + f"; seeds {preset['seeds']}; λ {preset['lambdas']}"
        + "".join(f" ({s}: λ {lams})" for s, lams in preset.get("setting_lambdas", {}).items())
        + f"; batch size {preset['batch_size']}",
        f"- ViT: {preset['vit']}; ResNet: {preset['resnet']}",
        "- Learning rate: best for the *plain* model on the validation split "
        f"(grid {result['lr_grids']}, {preset['lr_budget']} epochs, seed {preset['seeds'][0]}), reused for TrAct"
        + (f"; the first-layer initialisations {preset['own_lr_inits']} get their own (chosen for their plain model)"
           if preset.get("own_lr_inits") else ""),
    ]
    if preset.get("ablation_settings"):
        lines.append(
            f"- Ablations ({', '.join(preset['ablation_settings'])}): λ {preset['ablation_lambdas']}"
            + (f", and the first layer on SGD (lr {preset['ablation_sgd_first_layer_lr']:g}, momentum 0.9, weight decay "
               "5e-4, same cosine schedule) with the rest on AdamW (AdamW settings only)"
               if preset.get("ablation_sgd_first_layer_lr") is not None else "")
            + f"; budgets {preset['ablation_budgets']}, seeds {preset['ablation_seeds']}"
        )
    if preset.get("fidelity_settings"):
        lines.append(f"- Fidelity: {', '.join(preset['fidelity_settings'])}, {preset['fidelity_budget']} epochs, seeds "
                     f"{preset['fidelity_seeds']}: hf_tract vs official torch-tract vs hf_tract with a float64 solve")
    for earlier in result.get("previous_environments", []):
        lines.append(f"- Earlier part of these results (continued with `--resume`): `{earlier['command']}` at commit "
                     f"`{earlier['git_commit']}` on {earlier['device']}, started {earlier['started']}")
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    rows = headline(result)
    lines += [
        "",
        "## Headline: epochs (and wall-clock) TrAct needs to reach the plain model's final training loss and best test accuracy",
        "",
        "Ratios are plain epochs / TrAct epochs at the measured budgets, (in brackets) with TrAct's mean curve "
        "interpolated linearly in log2(epochs) between budgets (a reading between measured points, not a "
        "measurement). Wall-clock = epoch ratio / per-step time ratio (TrAct / plain, measured interleaved in one "
        "process). > 1: TrAct needs less; \"not reached\": TrAct's mean never gets there within the budgets. "
        "Means over the seeds both variants ran at each budget.",
        "",
        "| setting | variant | seeds | step-time ratio | plain final train loss (ep) | TrAct train loss at those ep | "
        "TrAct reaches it at | epochs ratio (interp.) | wall-clock ratio (interp.) | plain best test acc % (ep) | "
        "TrAct acc % at those ep | TrAct reaches it at | epochs ratio (interp.) | wall-clock ratio (interp.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc_match = "not reached" if row["tract_match_epochs"] is None else f"{row['tract_match_epochs']} ep"
        if "plain_final_train_loss" in row:
            loss_match = "not reached" if row["tract_train_loss_match_epochs"] is None else f"{row['tract_train_loss_match_epochs']} ep"
            loss_cells = (
                f"{row['plain_final_train_loss']:.4f} ± {row['plain_final_train_loss_std']:.4f} ({row['plain_final_epochs']} ep) | "
                f"{row['tract_train_loss_at_plain_final_epochs']:.4f} | {loss_match} | "
                f"{_ratio_cell(row['train_loss_epoch_ratio'], row['train_loss_epoch_ratio_interp'])} | "
                f"{_ratio_cell(row['train_loss_wallclock_ratio'], row['train_loss_wallclock_ratio_interp'])}"
            )
        else:
            loss_cells = "— | — | — | — | —"
        lines.append(
            f"| {row['setting']} | {_label(row['variant'])} | {len(row['seeds'])} | {_fmt(row['step_time_ratio'], '.3f')} | "
            f"{loss_cells} | {_pct(row['plain_best_acc'], row['plain_best_std'])} ({row['plain_best_epochs']} ep) | "
            f"{_pct(row['tract_acc_at_plain_best_epochs'], row['tract_std_at_plain_best_epochs'])} | {acc_match} | "
            f"{_ratio_cell(row['epoch_ratio'], row['epoch_ratio_interp'])} | "
            f"{_ratio_cell(row['wallclock_ratio'], row['wallclock_ratio_interp'])} |"
        )
    lines += [
        "",
        "### Epoch ratio at every level of the plain model (interpolated)",
        "",
        "For each budget b: b / the epochs TrAct needs (interpolated as above) to reach the plain model's mean at b, "
        "for the training loss and for the test accuracy. > 1: TrAct gets there sooner; \"—\": never within the "
        "budgets; at the smallest budget the ratio is capped at 1.",
        "",
    ]
    for budgets in sorted({tuple(row["budgets"]) for row in rows}, key=len, reverse=True):
        lines += ["| setting | variant | metric | " + " | ".join(f"{b} ep" for b in budgets) + " |",
                  "|---|---|---" + "|---" * len(budgets) + "|"]
        for row in rows:
            if tuple(row["budgets"]) != budgets:
                continue
            for metric, key in (("train loss", "train_loss_epoch_ratio_interp_by_budget"), ("test acc", "epoch_ratio_interp_by_budget")):
                if key in row:
                    cells = [_fmt(row[key][b], ".2f", "×") for b in budgets]
                    lines.append(f"| {row['setting']} | {_label(row['variant'])} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    summary = summarize(result)
    lines += ["## Every budget: mean ± std over seeds", "",
              "Generalisation gap = test loss − training loss (fixed training slice, eval mode).", ""]
    for setting, variants in summary.items():
        names = ["plain", *sorted(v for v in variants if v != "plain")]
        own = [f"{key.split('|', 1)[1]} {choice['lr']:g}" for key, choice in result["lr_choice"].items()
               if key.startswith(setting + "|")]
        lines += [f"### {setting} (lr {result['lr_choice'][setting]['lr']:g}" + "".join(f"; {o}" for o in own) + ")", ""]
        for metric, title in (("test_acc", "test accuracy %"), ("train_loss", "training loss"),
                              ("test_loss", "test loss"), ("gap", "generalisation gap (test − training loss)")):
            lines += [f"{title}:", "", "| epochs | " + " | ".join(_label(n) for n in names) + " |",
                      "|---" * (len(names) + 1) + "|"]
            for epochs in sorted({b for v in variants.values() for b in v}):
                cells = []
                for n in names:
                    s = variants.get(n, {}).get(epochs)
                    if s is None:
                        cells.append("—")
                        continue
                    if metric == "gap":
                        ok = s["test_loss"] is not None and s["train_loss"] is not None
                        cell = f"{s['test_loss']['mean'] - s['train_loss']['mean']:.4f}" if ok else "—"
                    elif s[metric] is None:
                        cell = "—"
                    elif metric == "test_acc":
                        cell = _pct(s[metric]["mean"], s[metric]["std"])
                    else:
                        cell = f"{s[metric]['mean']:.4f} ± {s[metric]['std']:.4f}"
                    partial = f" (n={s['n']})" if s["n"] != len(preset["seeds"]) else ""
                    cells.append(cell + partial + (f" ({s['diverged']} diverged)" if s["diverged"] else ""))
                lines.append(f"| {epochs} | " + " | ".join(cells) + " |")
            lines.append("")
    fid = fidelity(result)
    if fid:
        lines += [
            "## Fidelity: hf_tract vs the official torch-tract, same seeds",
            "",
            "Same model, initialisation, data order, augmentation and schedule; only the TrAct implementation differs. "
            "|Δ loss| = absolute difference of the per-step minibatch training loss over the first steps. The float64 "
            "column compares hf_tract's default solve with its float64 solve: the spread rounding alone causes.",
            "",
            "| setting | λ | epochs | seed | steps | max \\|Δ loss\\| vs official | mean \\|Δ loss\\| vs official | "
            "max \\|Δ loss\\| vs float64 solve | test acc % hf_tract / official / float64 | training loss hf_tract / official / float64 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in fid:
            f64 = row.get("f64", {})
            lines.append(
                f"| {row['setting']} | {row['lambda']:g} | {row['epochs']} | {row['seed']} | {row.get('steps_compared_official', '—')} | "
                f"{_fmt(row.get('max_abs_loss_diff_official'), '.1e')} | {_fmt(row.get('mean_abs_loss_diff_official'), '.1e')} | "
                f"{_fmt(row.get('max_abs_loss_diff_f64'), '.1e')} | "
                f"{_pct(row['hf_tract']['test_acc'])} / {_pct(row['official']['test_acc'])} / {_pct(f64.get('test_acc'))} | "
                f"{_fmt(row['hf_tract']['train_loss'], '.4f')} / {_fmt(row['official']['train_loss'], '.4f')} / "
                f"{_fmt(f64.get('train_loss'), '.4f')} |"
            )
        lines.append("")
    lines += ["## Learning-rate search (plain model, validation accuracy %)", ""]
    for key, choice in result["lr_choice"].items():
        scores = ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in choice["val_acc"].items())
        name = key.replace("|", ", first layer ") + (" init" if "|" in key else "")
        lines.append(f"- {name}: {scores} → {choice['lr']:g}")
    lines += ["", "## Per-step training time (interleaved, median over rounds)", ""]
    if result.get("step_times_source"):
        lines += [f"Step times used above: {result['step_times_source']}.", ""]
    for setting, times in result["step_times"].items():
        lines.append(f"- {setting}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in times["seconds_per_step"].items()))
    if result.get("step_times_during_run"):
        lines += ["", "Measured during the run (fewer rounds, on the loaded machine; superseded by the above):", ""]
        for setting, times in result["step_times_during_run"].items():
            lines.append(f"- {setting}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in times["seconds_per_step"].items())
                         + "; ratios " + ", ".join(f"{k} {v:.3f}" for k, v in times["ratio"].items()))
    if plot_paths:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({os.path.relpath(p, md_dir)})" for p in plot_paths]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], prefix: Path) -> list[str]:
    """Training loss vs epochs, test accuracy vs epochs, test accuracy vs training wall-clock.

    One panel per setting; plain dashed black, TrAct solid, ablation variants thin, ±std bands (main
    variants only).

    Returns:
        `list[str]`: the PNG paths written (`<prefix>_train_loss.png`, `_test_acc.png`, `_wallclock.png`).
    """
    import matplotlib
    import matplotlib.ticker
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(result)
    preset = result["preset"]
    main = {"plain", *(f"tract_{lam}" for lam in preset["lambdas"])}
    for lams in preset.get("setting_lambdas", {}).values():
        main |= {f"tract_{lam}" for lam in lams}
    paths = []
    for name, metric, axis in (("train_loss", "train_loss", "epochs"), ("test_acc", "test_acc", "epochs"),
                               ("wallclock", "test_acc", "wallclock")):
        n = len(summary)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, (setting, variants) in zip(axes.flat, summary.items()):
            for variant in ["plain", *sorted(v for v in variants if v != "plain")]:
                if not _is_headline_variant(variant) and variant != "plain":
                    continue
                points = {b: s for b, s in variants[variant].items() if s[metric] is not None}
                if not points:
                    continue
                budgets = sorted(points)
                x = budgets if axis == "epochs" else [points[b]["seconds"] for b in budgets]
                scale = 100 if metric == "test_acc" else 1
                mean = np.array([scale * points[b][metric]["mean"] for b in budgets])
                std = np.array([scale * points[b][metric]["std"] for b in budgets])
                if variant == "plain":
                    style = {"color": "black", "linestyle": "--", "linewidth": 1.8}
                elif variant in main:
                    style = {"color": "tab:red", "linestyle": "-", "linewidth": 1.8}
                else:
                    style = {"linestyle": "-", "linewidth": 0.9, "alpha": 0.8}
                seeds = sorted({seed for b in budgets for seed in points[b]["seeds"]})
                label = _label(variant) + ("" if variant in main else f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
                line, = ax.plot(x, mean, marker="o", markersize=3, label=label, **style)
                if variant in main:
                    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            ax.set_xscale("log", base=2)
            if metric == "train_loss":
                ax.set_yscale("log")
            if axis == "epochs":
                ax.set_xticks(sorted({b for v in variants.values() for b in v}))
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(f"{setting} (lr {result['lr_choice'][setting]['lr']:g})", fontsize=10)
            ax.set_xlabel("epochs (each a full cosine run)" if axis == "epochs" else "training wall-clock [s]")
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:  # older results files have no training loss to plot
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        env = result["environment"]
        fig.suptitle(
            f"Fashion-MNIST, {preset['n_train']} training images, augmentation: {result['data'].get('augmentation', 'none')}\n"
            f"TrAct (solid) vs plain (dashed), mean ± std over seeds {preset['seeds']} (points with fewer seeds: see the "
            f"tables); {env['device']}, commit {env['git_commit'][:7]}", fontsize=8)
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_report(result_path: Path, plots_dir: Path) -> list[str]:
    """(Re)writes the markdown report (beside the JSON) and the plots (in `plots_dir`) of a results file.

    Args:
        result_path (`Path`): the results JSON written by the runner (`cli.py`).
        plots_dir (`Path`): folder of the PNG plots.

    Returns:
        `list[str]`: the written paths.
    """
    result = json.loads(result_path.read_text())
    plot_paths = plot(result, plots_dir / result_path.stem) if result["runs"] else []
    md_path = result_path.with_suffix(".md")
    md_path.write_text(markdown_report(result, plot_paths, md_path.parent))
    return [str(md_path), *plot_paths]
