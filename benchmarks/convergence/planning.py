"""Which runs a preset plans, in which order, and how a run is keyed in the results file."""

from __future__ import annotations

import argparse
import dataclasses

from .presets import PLAIN, PRESETS, Preset, Variant


__all__ = ["PHASES", "planned_runs", "preset_from_args", "run_key", "timing_overrides"]

PHASES = ("main", "fidelity", "ablations", "late")


def run_key(setting: str, variant: str, epochs: int, seed: int, lr: float) -> str:
    """Identifies a run inside the results file (a learning-rate search run doubles as a budget run)."""
    return f"{setting}|{variant}|{epochs}|{seed}|{lr:g}"


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The mode's preset with the command line's overrides (`--settings`, `--budgets`, `--seeds`, `--lambdas`)."""
    preset = dataclasses.replace(PRESETS[args.mode])
    for field in ("settings", "budgets", "seeds", "lambdas"):
        if getattr(args, field) is not None:
            setattr(preset, field, getattr(args, field))
    if args.lambdas is not None:
        preset.setting_lambdas = {}
    if args.ablation_seeds is not None:
        preset.ablation_seeds = args.ablation_seeds
    if args.no_late:
        preset.late_budgets = {}
    timing_overrides(preset, args)
    return preset


def timing_overrides(preset: Preset, args: argparse.Namespace) -> None:
    """Applies `--timing-rounds` / `--timing-steps` to `preset`."""
    if args.timing_rounds is not None:
        preset.timing_rounds = args.timing_rounds
    if args.timing_steps is not None:
        preset.timing_steps = args.timing_steps


def planned_runs(preset: Preset, phases: tuple[str, ...] = PHASES) -> list[tuple[str, Variant, int, int]]:
    """Every (setting, variant, epochs, seed) of a preset's `phases`, in the order they run.

    Order: the main budgets (budget-major, so that a cut run has every setting at the small budgets), then
    the fidelity runs, then the ablations, then the late budgets (e.g. a 32-epoch ViT budget). A run that
    also belongs to the main comparison (e.g. the plain model at an ablation budget) is planned in the
    main phase only, so that phases can run in separate processes without training anything twice.
    """
    main = []
    for epochs in sorted(preset.budgets):
        for name in preset.settings:
            for seed in preset.seeds:
                main += [(name, v, epochs, seed) for v in preset.main_variants(name)]
    in_main = set(main)
    fidelity, ablations, late = [], [], []
    for name in preset.fidelity_settings:
        for seed in preset.fidelity_seeds:
            fidelity += [(name, v, preset.fidelity_budget, seed) for v in preset.fidelity_variants(name, seed)]
    for epochs in sorted(preset.ablation_budgets):
        for name in preset.settings:
            for seed in preset.ablation_seeds:
                ablations += [(name, v, epochs, seed) for v in ([PLAIN] if preset.ablation_variants(name) else [])
                              + preset.ablation_variants(name)]
    for name, budgets in preset.late_budgets.items():
        if name in preset.settings:
            for epochs in sorted(budgets):
                for seed in preset.seeds:
                    late += [(name, v, epochs, seed) for v in preset.main_variants(name)]
    plan = []
    for phase, runs in (("main", main), ("fidelity", fidelity), ("ablations", ablations), ("late", late)):
        if phase in phases:
            plan += [run for run in runs if phase == "main" or run not in in_main]
    return list(dict.fromkeys(plan))
