"""Fine-tuning benchmark (report): per-cell table, TrAct - plain differences, and a plot of a results JSON.

Imports neither torch nor hf_tract (`python -m benchmarks.finetune --report <json>` re-renders anywhere).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any


__all__ = ["markdown_report", "plot", "summarize", "write_report"]

METRICS = ("test_acc", "train_loss", "first_layer_drift")


def _cells(result: dict[str, Any], previous: bool = False) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Runs at each cell's chosen learning rate (`previous`: at the choice made before the grid was widened, where
    it differs): `{cell: {variant: {seed: run}}}` (other grid runs left out)."""
    table: dict[str, Any] = {}
    for run in result["runs"]:
        choice = result["lr_choice"].get(run["cell"], {})
        lr = choice.get("previous_choice") if previous else choice.get("lr")
        if lr is not None and run["lr"] == lr and not (previous and lr == choice["lr"]):
            table.setdefault(run["cell"], {}).setdefault(run["variant"], {})[run["seed"]] = run
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(result: dict[str, Any], previous: bool = False) -> list[dict[str, Any]]:
    """One row per (cell, variant): seeds, mean / std of every metric; TrAct rows also the paired difference of test
    accuracy and training loss to plain on the seeds both ran (mean, and how many seeds TrAct was ahead).

    `previous`: the runs at the learning rate chosen before the grid was widened (cells whose choice changed)."""
    rows = []
    for cell, variants in _cells(result, previous).items():
        plain = variants.get("plain", {})
        for variant, by_seed in variants.items():
            seeds = sorted(by_seed)
            row: dict[str, Any] = {"cell": cell, "variant": variant, "seeds": seeds,
                                   "labels": by_seed[seeds[0]]["labels"], "n_train": by_seed[seeds[0]]["n_train"],
                                   "lr": by_seed[seeds[0]]["lr"]}
            for metric in METRICS:
                row[metric] = _mean_std([by_seed[s][metric] for s in seeds])
            common = sorted(set(seeds) & set(plain))
            if variant != "plain" and common:
                diffs = [by_seed[s]["test_acc"] - plain[s]["test_acc"] for s in common]
                row["paired_seeds"] = common
                row["test_acc_diff"] = _mean_std(diffs)
                row["ahead"] = sum(d > 0 for d in diffs)
                row["train_loss_diff"] = _mean_std([by_seed[s]["train_loss"] - plain[s]["train_loss"] for s in common])
            rows.append(row)
    order = {cell: i for i, cell in enumerate(dict.fromkeys(r["cell"] for r in result["runs"]))}
    return sorted(rows, key=lambda r: (order[r["cell"]], r["variant"] != "plain", r["variant"]))


def _pm(pair: tuple[float, float] | None, scale: float = 1.0, spec: str = ".2f", sign: bool = False) -> str:
    if pair is None:
        return "—"
    mean, std = pair[0] * scale, pair[1] * scale
    return f"{mean:{'+' if sign else ''}{spec}} ± {std:{spec}}"


def _cell_label(cell: str) -> str:
    """`"vit|fmnist04->fmnist59|0"` -> `"vit / fmnist04->fmnist59 / all"` (no pipes inside a table cell)."""
    arch, transfer, labels = cell.split("|")
    return f"{arch} / {transfer} / {'all' if labels == '0' else labels}"


def _label(variant: str) -> str:
    return "plain" if variant == "plain" else "TrAct λ=" + variant.split("_")[1]


def markdown_report(result: dict[str, Any], plot_paths: list[str], md_dir: Path) -> str:
    """The markdown report: setup, pretraining, the table per cell, learning-rate choices."""
    env, preset = result["environment"], result["preset"]
    lines = [
        f"# Fine-tuning benchmark: TrAct vs plain from a pretrained checkpoint (`{result['mode']}` mode)",
        "",
        f"- Command: `{env['command']}` at commit `{env['git_commit']}`",
        f"- Device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} torch "
        f"threads, {env['cpu_count']} CPUs; started {env['started']}, finished {env.get('finished', 'not finished')}; "
        f"fine-tuning time total {result.get('elapsed_seconds', 0) / 60:.1f} min",
        *[f"- Earlier part (continued with `--resume`): `{e['command']}` at commit `{e['git_commit']}`, started {e['started']}"
          for e in result.get("previous_environments", [])],
        f"- Note: {result['note']}" if result.get("note") else "",
        f"- Models: ViT {preset['models']['vit']}, ResNet {preset['models']['resnet']} (one channel, 28×28); optimizers "
        f"{preset['optimizers']}",
        f"- Pretraining (plain, seed 0, {preset['pretrain_epochs']} epochs on {preset['pretrain_n'] or 'all'} source images, "
        f"lr {preset['pretrain_lr']}, batch {preset['batch_size']}, crop {preset['crop_pad']} px + flip (no flip for MNIST)), "
        "then `save_pretrained` (model + image processor with the source mean / std)",
        "- Fine-tuning: `AutoModelForImageClassification.from_pretrained(folder, num_labels, id2label, "
        "ignore_mismatched_sizes=True)`, a new seeded head, whole model trainable, inputs standardized with the "
        f"checkpoint's processor; max({preset['min_steps']} steps, {preset['min_epochs']} epochs), cosine schedule with 5% "
        f"warm-up, crop + flip; learning rate: best of {preset['lr_grids']} for *plain* on {preset['n_val']} held-out "
        "validation images (seed 0), reused for TrAct",
        f"- Seeds {preset['seeds']} (head init, data order, augmentation); training loss on the first "
        f"min({preset['n_train_eval']}, n) training images, un-augmented, eval mode; drift = ‖W − W₀‖/‖W₀‖ of the first "
        "layer's weight",
        "",
        "## Pretrained checkpoints",
        "",
        "| checkpoint | source images | steps | source test acc % | seconds |",
        "|---|---|---|---|---|",
    ]
    for rec in result["pretraining"].values():
        lines.append(f"| {rec['arch']} on {rec['source']} | {rec['n_train']} | {rec['steps']} | {100 * rec['source_test_acc']:.2f} | {rec['train_seconds']:.0f} |")
    lines += [
        "",
        "## Results (mean ± std over seeds; differences paired by seed)",
        "",
    ]
    lines += _results_table(summarize(result))
    earlier = summarize(result, previous=True)
    if earlier:
        lines += ["", "### Runs at the learning rate chosen before the grid was widened", "",
                  "The first pass chose the top of the grid in every cell; the grid was then widened by one point up and "
                  "the choice made again. Where it changed, these are the runs at the earlier choice (same seeds).", ""]
        lines += _results_table(earlier)
    lines += ["", "## Learning-rate choice (plain, seed 0, validation accuracy)", "",
              "Outside the grid: plain seed-0 runs made afterwards (`--extra-lrs`) to see whether the choice sits at the "
              "grid's edge; they do not change the choice.", "",
              "| cell | chosen | validation accuracy per lr | outside the grid |", "|---|---|---|---|"]
    for cell, choice in result["lr_choice"].items():
        extra = result.get("lr_check", {}).get(cell, {})
        lines.append(f"| {_cell_label(cell)} | {choice['lr']:g}"
                     + (f" (first pass: {choice['previous_choice']:g})" if "previous_choice" in choice else "") + " | "
                     + ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in choice["val_acc"].items()) + " | "
                     + (", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in extra.items()) or "—") + " |")
    if plot_paths:
        lines += ["", "## Plot", ""] + [f"![{Path(p).stem}]({os.path.relpath(p, md_dir)})" for p in plot_paths]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _results_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arch | transfer | labels | variant | seeds | lr | test acc % | Δ test acc vs plain (pts) | TrAct ahead | "
        "train loss | Δ train loss | first-layer drift |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        arch, transfer, _ = row["cell"].split("|")
        labels = f"{row['n_train']}" + (" (all)" if row["labels"] == 0 else "")
        lines.append(
            f"| {arch} | {transfer} | {labels} | {_label(row['variant'])} | {len(row['seeds'])} | {row['lr']:g} | "
            f"{_pm(row['test_acc'], 100)} | {_pm(row.get('test_acc_diff'), 100, sign=True)} | "
            f"{str(row['ahead']) + '/' + str(len(row['paired_seeds'])) if 'ahead' in row else '—'} | "
            f"{_pm(row['train_loss'], 1, '.4f')} | {_pm(row.get('train_loss_diff'), 1, '.4f', sign=True)} | "
            f"{_pm(row['first_layer_drift'], 1, '.3f')} |"
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> list[str]:
    """Test accuracy per cell and variant (mean ± std), one panel per architecture; `[]` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = summarize(result)
    archs = list(dict.fromkeys(r["cell"].split("|")[0] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        cells = list(dict.fromkeys(r["cell"] for r in rows if r["cell"].startswith(arch + "|")))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            found = {r["cell"]: r for r in rows if r["variant"] == variant}
            xs = [c for c in range(len(cells)) if cells[c] in found]
            ax.bar([x + i * width for x in xs], [100 * found[cells[x]]["test_acc"][0] for x in xs], width,
                   yerr=[100 * found[cells[x]]["test_acc"][1] for x in xs], label=_label(variant))
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cells))])
        ax.set_xticklabels([f"{c.split('|')[1]}\n{'all' if c.split('|')[2] == '0' else c.split('|')[2]} labels" for c in cells], fontsize=7)
        lows = [100 * r["test_acc"][0] for r in rows if r["cell"] in cells]
        ax.set_ylim(min(lows) - 3, min(100, max(lows) + 2))
        ax.set_title(f"{arch}: test accuracy after fine-tuning")
        ax.set_ylabel("test accuracy [%]")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def write_report(result_path: Path, plots_dir: Path) -> list[str]:
    """(Re)writes the markdown (beside the JSON) and the plot (in `plots_dir`); returns the written paths."""
    result = json.loads(result_path.read_text())
    plot_paths = plot(result, plots_dir / f"{result_path.stem}_test_acc.png") if result["runs"] else []
    md_path = result_path.with_suffix(".md")
    md_path.write_text(markdown_report(result, plot_paths, md_path.parent))
    return [str(md_path), *plot_paths]
