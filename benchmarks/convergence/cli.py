"""Command line of the convergence benchmark: run a preset (or resume it), re-render, merge, re-time."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import report
from .data import eval_sets, find_data_dir, load_fashion_mnist
from .planning import PHASES, planned_runs, preset_from_args, run_key, timing_overrides
from .presets import LR_GRIDS, PRESETS, RESULT_NAMES, Setting, Variant
from .results import adopt_step_times, merge_results, reuse_runs, start_result
from .timing import measure_step_times
from .training import train_run
from benchmarks import harness


__all__ = ["main", "parse_args", "remeasure_step_times", "run_benchmark"]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the protocol for every setting of the preset, rewriting the results file after every run."""
    preset = preset_from_args(args)
    device = torch.device(args.device)
    harness.set_cpu_threads(device, args.threads)
    data_dir = find_data_dir(args.data_dir)
    data = load_fashion_mnist(data_dir, preset, device)
    out = Path(args.output)
    result = start_result(args.mode, preset, data, data_dir, device, args.note, out if args.resume else None)
    if args.reuse_runs:
        planned = [(name, variant.name, epochs, seed) for name, variant, epochs, seed in planned_runs(preset, tuple(args.phases))]
        reuse_runs(Path(args.reuse_runs), result, planned)
    if args.lr_grid:
        result["lr_grids"] = {name: args.lr_grid for name in {Setting.from_name(n).optimizer for n in preset.settings}}
    done = {r["key"]: r for r in result["runs"]}
    start = time.perf_counter()
    evals = {name: eval_sets(data, Setting.from_name(name).inputs, preset.n_train_eval) for name in preset.settings}

    def record(name: str, variant: Variant, lr: float, epochs: int, seed: int) -> dict[str, Any]:
        """Runs (or, when already in the results, looks up) one training run and saves the results."""
        key = run_key(name, variant.name, epochs, seed, lr)
        if key in done:
            return done[key]
        rec = {"key": key, "setting": name, **variant.record(), "lr": lr, "epochs": epochs, "seed": seed}
        rec.update(train_run(Setting.from_name(name), preset, data, evals[name], lr, variant, epochs, seed, device))
        result["runs"].append(rec)
        done[key] = rec
        result["elapsed_seconds"] = result.get("elapsed_seconds", 0.0) + rec["train_seconds"]
        harness.save_json(result, out)
        print(f"[{time.perf_counter() - start:7.0f}s] {name:18s} {variant.name:16s} lr={lr:<6g} ep={epochs:<3d} seed={seed} "
              f"train_loss={rec['train_loss']:.4f} test={rec['test_acc']:.4f} test_loss={rec['test_loss']:.4f} "
              f"train={rec['train_seconds']:.1f}s", flush=True)
        return rec

    for name in preset.settings:
        setting = Setting.from_name(name)
        for init in ["default", *preset.own_lr_inits]:
            key = report.lr_choice_key(name, init)
            if key in result["lr_choice"]:
                continue
            grid = args.lr_grid or LR_GRIDS[setting.optimizer]
            plain = Variant(first_layer_init=init)
            scores = {lr: record(name, plain, lr, preset.lr_budget, preset.seeds[0])["val_acc"] for lr in grid}
            best = max(grid, key=lambda lr: scores[lr])
            result["lr_choice"][key] = {
                "lr": best,
                "val_acc": {f"{lr:g}": acc for lr, acc in scores.items()},
                "epochs": preset.lr_budget,
                "seed": preset.seeds[0],
            }
        if name not in result["step_times"]:
            variants = [*preset.main_variants(name), *preset.ablation_variants(name)]
            result["step_times"][name] = measure_step_times(
                setting, preset, data, result["lr_choice"][name]["lr"], device, variants)
            harness.save_json(result, out)
            print(f"{name}: per-step time ratio to plain {result['step_times'][name]['ratio']}", flush=True)
    for name, variant, epochs, seed in planned_runs(preset, tuple(args.phases)):
        if name in result["lr_choice"]:
            record(name, variant, report.chosen_lr(result, name, variant.first_layer_init), epochs, seed)
    result["environment"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["wall_seconds_total"] = time.perf_counter() - start
    harness.save_json(result, out)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.convergence",
        description="Convergence benchmark: TrAct vs plain training on Fashion-MNIST (see benchmarks/README.md).",
    )
    parser.add_argument("--mode", choices=list(PRESETS), default="cpu",
                        help="preset: quick (CI smoke), cpu (6k images), cpu-full (30k images, augmentation, "
                        "ablations, fidelity; about 1 h on 2 cores), gpu (all settings, full data)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode", help="same as --mode quick")
    parser.add_argument("--gpu", action="store_const", const="gpu", dest="mode", help="same as --mode gpu")
    parser.add_argument("--device", default=None, help="torch device (default: cuda for --mode gpu, else cpu)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads on CPU (default 1: on a shared 2-core machine, 2 threads made steps about 10x slower under load)",
    )
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/convergence_<mode>.json)")
    parser.add_argument("--settings", type=lambda s: s.split(","), default=None, help="comma-separated setting names, e.g. vit-adam-std,resnet-sgd-contrast")
    parser.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=None, help="comma-separated epoch budgets")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None, help="comma-separated seeds")
    parser.add_argument("--lambdas", type=lambda s: [float(v) for v in s.split(",")], default=None, help="comma-separated TrAct lambdas")
    parser.add_argument("--ablation-seeds", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="comma-separated seeds of the ablation runs")
    parser.add_argument("--no-late", action="store_true", help="skip the preset's late budgets (e.g. the 32-epoch ViT runs)")
    parser.add_argument(
        "--phases", type=lambda s: s.split(","), default=list(PHASES),
        help=f"comma-separated phases to run, of {','.join(PHASES)} (default all); e.g. two processes: one with "
        "--phases main, one with --phases fidelity,ablations --output <other file>, then --merge <other file>",
    )
    parser.add_argument("--adopt-step-times", metavar="JSON", default=None,
                        help="only make the step times of a --remeasure-step-times file those of --output, then rewrite the report")
    parser.add_argument("--merge", metavar="JSON", default=None,
                        help="only add the runs of another results file of the same mode to --output, then rewrite the report")
    parser.add_argument("--plots-dir", default=str(harness.PLOTS_DIR), help="folder for the PNG plots")
    parser.add_argument("--note", default="", help="free text stored in the results (e.g. machine load)")
    parser.add_argument("--lr-grid", type=lambda s: [float(v) for v in s.split(",")], default=None,
                        help="comma-separated learning rates to choose from instead of the optimizer's grid (settings "
                        "without a choice yet), e.g. to see whether a choice at the grid's edge holds")
    parser.add_argument("--reuse-runs", metavar="JSON", default=None,
                        help="take the learning-rate choices and the planned runs that another results file of the same "
                        "protocol already made (e.g. plain / TrAct of cpu-full for --mode cpu-full-whitening) instead of training them")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output file and skip them")
    parser.add_argument("--report", metavar="JSON", default=None, help="only rewrite the table and plots of an existing results file")
    parser.add_argument(
        "--remeasure-step-times", metavar="JSON", default=None,
        help="only measure the per-step TrAct/plain time ratios again with the current code, for the settings and "
        "learning rates of an existing results file; writes them beside it (<name>_step_times.json)",
    )
    parser.add_argument("--timing-rounds", type=int, default=None, help="override the preset's rounds of the interleaved step timing")
    parser.add_argument("--timing-steps", type=int, default=None, help="override the preset's steps per variant and round of the step timing")
    parser.add_argument(
        "--update-results", action="store_true",
        help="with --remeasure-step-times: also store the new timings as the results file's step_times (the "
        "timings taken during the run are kept as step_times_during_run)",
    )
    args = parser.parse_args(argv)
    if args.settings is not None:
        for name in args.settings:
            Setting.from_name(name)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    args.device = args.device or ("cuda" if args.mode == "gpu" else "cpu")
    args.output = args.output or str(harness.RESULTS_DIR / f"{RESULT_NAMES.get(args.mode, 'convergence_' + args.mode)}.json")
    return args




def remeasure_step_times(result_path: Path, args: argparse.Namespace) -> Path:
    """Per-step time ratios of an existing results file's settings, measured again with the current code.

    The accuracy runs stay as they were; only the cost side of the wall-clock ratio is re-measured (e.g.
    after a change that makes TrAct's step cheaper). Writes `<result>_step_times.json` and returns its path.
    """
    previous = json.loads(result_path.read_text())
    preset = dataclasses.replace(PRESETS[previous["mode"]])
    timing_overrides(preset, args)
    device = torch.device(args.device)
    harness.set_cpu_threads(device, args.threads)
    data = load_fashion_mnist(find_data_dir(args.data_dir), preset, device)
    out = {"source": str(result_path), "environment": harness.environment(device), "note": args.note, "step_times": {}}
    for name, choice in previous["lr_choice"].items():
        if "|" in name:  # a first-layer initialisation's own learning rate: timed with the setting's
            continue
        variants = [*preset.main_variants(name), *preset.ablation_variants(name)]
        out["step_times"][name] = measure_step_times(Setting.from_name(name), preset, data, choice["lr"], device, variants)
        before = previous["step_times"].get(name, {}).get("ratio")
        print(f"{name}: TrAct/plain per-step ratio now {out['step_times'][name]['ratio']} (before: {before})", flush=True)
    out["timing_rounds"], out["timing_steps"] = preset.timing_rounds, preset.timing_steps
    path = result_path.with_name(result_path.stem + "_step_times.json")
    harness.save_json(out, path)
    if args.update_results:
        adopt_step_times(path, result_path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or, with `--report`, only the table and plots) and prints the written paths."""
    args = parse_args(argv)
    if args.remeasure_step_times:
        paths = [str(remeasure_step_times(Path(args.remeasure_step_times), args))]
    elif args.report:
        paths = report.write_report(Path(args.report), Path(args.plots_dir))
    elif args.adopt_step_times:
        adopt_step_times(Path(args.adopt_step_times), Path(args.output))
        paths = [args.output, *report.write_report(Path(args.output), Path(args.plots_dir))]
    elif args.merge:
        merge_results(Path(args.merge), Path(args.output), args.note)
        paths = [args.output, *report.write_report(Path(args.output), Path(args.plots_dir))]
    else:
        run_benchmark(args)
        paths = [args.output, *report.write_report(Path(args.output), Path(args.plots_dir))]
    print("\n".join(paths))
