"""Command line of the fine-tuning benchmark: pretrain (or reuse) the checkpoints, choose learning rates, fine-tune."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import report
from .checkpoints import pretrain, processor_stats
from .presets import PRESETS, FinetunePreset, Transfer
from .runs import finetune_evals, finetune_run
from .tasks import DATASET_OF, source_task, target_task
from benchmarks import harness
from benchmarks.convergence.data import find_data_dir
from benchmarks.convergence.presets import PLAIN, Variant


__all__ = ["cell_key", "main", "parse_args", "run_benchmark", "run_key"]


def cell_key(arch: str, transfer: Transfer, labels: int) -> str:
    """One cell of the table: `"vit|fmnist04->fmnist59|500"` (`0` labels: all)."""
    return f"{arch}|{transfer.name}|{labels}"


def run_key(cell: str, variant: str, seed: int, lr: float) -> str:
    """One run inside the results file (a learning-rate search run doubles as the seed-0 plain run)."""
    return f"{cell}|{variant}|{seed}|{lr:g}"


def _preset(args: argparse.Namespace) -> FinetunePreset:
    preset = dataclasses.replace(PRESETS[args.mode])
    for field in ("archs", "seeds", "lambdas"):
        if getattr(args, field) is not None:
            setattr(preset, field, getattr(args, field))
    if args.transfers is not None:
        known = {t.name: t for t in preset.transfers}
        preset.transfers = [known[name] for name in args.transfers]
    return preset


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrains what is missing, then runs every planned fine-tuning run, rewriting the results after each."""
    preset = _preset(args)
    device = torch.device(args.device)
    harness.set_cpu_threads(device, args.threads)
    dirs = {"fashion-mnist": find_data_dir(args.fashion_mnist_dir, "fashion-mnist"), "mnist": find_data_dir(args.mnist_dir, "mnist")}
    out, checkpoints = Path(args.output), Path(args.checkpoint_dir)
    result: dict[str, Any] = {
        "benchmark": "finetune", "mode": args.mode, "preset": dataclasses.asdict(preset),
        "data": {name: str(path) for name, path in dirs.items()},
        "environment": harness.environment(device), "note": args.note, "pretraining": {}, "lr_choice": {}, "runs": [],
    }
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        for key in ("pretraining", "lr_choice", "runs", "lr_check"):
            if key in previous:
                result[key] = previous[key]
        result["previous_environments"] = [*previous.get("previous_environments", []), previous["environment"]]
        result["note"] = args.note or previous.get("note", "")
    done = {r["key"]: r for r in result["runs"]}
    start = time.perf_counter()

    def save() -> None:
        result["elapsed_seconds"] = sum(r["train_seconds"] for r in result["runs"])
        harness.save_json(result, out)

    def checkpoint(arch: str, source: str) -> Path:
        folder = checkpoints / f"{arch}-{source}"
        key = f"{arch}|{source}"
        if not (folder / "config.json").is_file():
            task = source_task(source, dirs[DATASET_OF[source]], preset.pretrain_n)
            rec = pretrain(arch, source, task, preset, folder, device)
            if key in result["pretraining"] and abs(result["pretraining"][key]["checksum"] - rec["checksum"]) > 1e-6 * rec["checksum"]:
                print(f"warning: {key} pretrained again with different weights than the recorded run", flush=True)
            result["pretraining"][key] = rec
            save()
            print(f"[{time.perf_counter() - start:7.0f}s] pretrained {key}: source test acc {rec['source_test_acc']:.4f} "
                  f"({rec['steps']} steps, {rec['train_seconds']:.0f}s)", flush=True)
        return folder

    data_cache: dict[tuple[str, int, str], Any] = {}

    def run(arch: str, transfer: Transfer, labels: int, variant: Variant, seed: int, lr: float) -> dict[str, Any]:
        cell = cell_key(arch, transfer, labels)
        key = run_key(cell, variant.name, seed, lr)
        if key in done:
            return done[key]
        folder = checkpoint(arch, transfer.source)
        if (arch, labels, transfer.name) not in data_cache:
            mean, std = processor_stats(folder)
            data = target_task(transfer.target, dirs[DATASET_OF[transfer.target]], preset.n_val, labels, preset.n_test, mean, std)
            data_cache[(arch, labels, transfer.name)] = (data, finetune_evals(data, preset))
        data, evals = data_cache[(arch, labels, transfer.name)]
        rec = {"key": key, "cell": cell, "arch": arch, "transfer": transfer.name, "labels": labels, "n_train": len(data.train_x),
               **variant.record(), "lr": lr, "seed": seed}
        rec.update(finetune_run(folder, arch, transfer.target, data, evals, variant, lr, seed, preset, device))
        result["runs"].append(rec)
        done[key] = rec
        save()
        print(f"[{time.perf_counter() - start:7.0f}s] {cell:28s} {variant.name:10s} lr={lr:<6g} seed={seed} "
              f"test={rec['test_acc']:.4f} train_loss={rec['train_loss']:.4f} drift={rec['first_layer_drift']:.3f} "
              f"steps={rec['steps']} train={rec['train_seconds']:.0f}s", flush=True)
        return rec

    variants = [PLAIN, *(Variant.with_tract(lam) for lam in preset.lambdas)]
    cells = [(t, labels) for t in preset.transfers for labels in t.labels]
    for arch in preset.archs:
        for transfer, labels in cells:
            cell = cell_key(arch, transfer, labels)
            grid = preset.lr_grids[preset.optimizers[arch]]
            choice = result["lr_choice"].get(cell)
            if choice is None or any(f"{lr:g}" not in choice["val_acc"] for lr in grid):
                # a grid widened since the choice: its new points are run and the choice is made again over all
                scores = {float(lr): acc for lr, acc in (choice or {}).get("val_acc", {}).items()}
                scores.update({lr: run(arch, transfer, labels, PLAIN, preset.seeds[0], lr)["val_acc"] for lr in grid})
                best = max(scores, key=lambda lr: scores[lr])
                result["lr_choice"][cell] = {"lr": best, "val_acc": {f"{lr:g}": scores[lr] for lr in sorted(scores)},
                                             "seed": preset.seeds[0]}
                if choice is not None:
                    result["lr_choice"][cell]["previous_choice"] = choice["lr"]
                save()
        for transfer, labels in cells:  # plain, seed 0, at learning rates outside the grid: is the choice at its edge?
            cell = cell_key(arch, transfer, labels)
            for lr in args.extra_lrs.get(arch, []):
                val_acc = run(arch, transfer, labels, PLAIN, preset.seeds[0], lr)["val_acc"]
                result.setdefault("lr_check", {}).setdefault(cell, {})[f"{lr:g}"] = val_acc
                save()
        for seed in preset.seeds:  # seed-major: a cut run leaves every cell with the same seeds
            for transfer, labels in cells:
                for variant in variants:
                    run(arch, transfer, labels, variant, seed, result["lr_choice"][cell_key(arch, transfer, labels)]["lr"])
    result["environment"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the package docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description="Fine-tuning benchmark: TrAct vs plain "
                                     "fine-tuning from a save_pretrained checkpoint (see benchmarks/README.md).")
    parser.add_argument("--mode", choices=list(PRESETS), default="cpu", help="smoke (CI, seconds) or cpu (the committed results)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: the machine is shared)")
    parser.add_argument("--fashion-mnist-dir", default=None, help="Fashion-MNIST idx .gz folder (else $FASHION_MNIST_DIR, known places)")
    parser.add_argument("--mnist-dir", default=None, help="MNIST idx .gz folder (else $MNIST_DIR, known places; see the package docstring)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where the pretrained checkpoints go (default ~/.cache/hf_tract/finetune_<mode>); reused when present")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/finetune_<mode>.json)")
    parser.add_argument("--plots-dir", default=str(harness.PLOTS_DIR), help="folder for the PNG plot")
    parser.add_argument("--archs", type=lambda s: s.split(","), default=None, help="comma-separated, e.g. vit,resnet")
    parser.add_argument("--transfers", type=lambda s: s.split(","), default=None, help="e.g. fmnist04->fmnist59,mnist->fmnist")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None, help="comma-separated seeds")
    parser.add_argument("--lambdas", type=lambda s: [float(v) for v in s.split(",")], default=None, help="comma-separated TrAct lambdas")
    parser.add_argument("--extra-lrs", type=lambda s: {a: [float(v)] for a, v in (kv.split("=") for kv in s.split(","))},
                        default={}, help="per architecture, one learning rate outside the grid to check with plain seed-0 runs "
                        "(recorded as lr_check; the choice stays the grid's), e.g. vit=0.003,resnet=0.3")
    parser.add_argument("--note", default="", help="free text stored in the results (e.g. machine load)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output file and skip them")
    parser.add_argument("--report", metavar="JSON", default=None, help="only rewrite the markdown and plot of a results file")
    args = parser.parse_args(argv)
    args.output = args.output or str(harness.RESULTS_DIR / f"finetune_{args.mode}.json")
    args.checkpoint_dir = args.checkpoint_dir or str(Path.home() / ".cache" / "hf_tract" / f"finetune_{args.mode}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or, with `--report`, only the markdown and plot) and prints the written paths."""
    args = parse_args(argv)
    if not args.report:
        run_benchmark(args)
    print("\n".join([args.report or args.output, *report.write_report(Path(args.report or args.output), Path(args.plots_dir))]))
