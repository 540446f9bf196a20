"""The results file: a new or resumed run's JSON, merging another process's file, adopting re-measured step times."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .data import Data
from .planning import run_key
from .presets import LR_GRIDS, Preset
from benchmarks import harness


__all__ = ["adopt_step_times", "merge_results", "reuse_runs", "start_result"]


def start_result(mode: str, preset: Preset, data: Data, data_dir: Path, device: torch.device, note: str,
                 resume_from: Path | None = None) -> dict[str, Any]:
    """The results dict of a run: preset, data, environment; with `resume_from`, that file's runs, learning-rate
    choices and step times (its environment goes to `previous_environments`)."""
    augmentation = []
    if preset.crop_pad:
        augmentation.append(f"random crop 28x28 of the {preset.crop_pad}-px zero-padded image")
    if preset.hflip:
        augmentation.append("random horizontal flip (p = 1/2)")
    result: dict[str, Any] = {
        "mode": mode,
        "preset": dataclasses.asdict(preset),
        "lr_grids": {k: list(v) for k, v in LR_GRIDS.items()},
        "data": {
            "source": str(data_dir),
            "subset": f"train: {preset.n_train} of the 60k training images (fixed permutation, seed 0); "
            f"validation (learning-rate choice only): the next {preset.n_val}; test: the first {preset.n_test} of the 10k test images; "
            f"training loss on the first {preset.n_train_eval} training images (un-augmented, eval mode)",
            "augmentation": ", ".join(augmentation) or "none",
            "train_mean": data.mean,
            "train_std": data.std,
        },
        "environment": harness.environment(device),
        "note": note,
        "lr_choice": {},
        "step_times": {},
        "runs": [],
    }
    if resume_from is not None and resume_from.is_file():
        previous = json.loads(resume_from.read_text())
        for key in ("lr_choice", "step_times", "runs"):
            result[key] = previous[key]
        result["elapsed_seconds"] = previous.get("elapsed_seconds", 0.0)
        result["previous_environments"] = [*previous.get("previous_environments", []), previous["environment"]]
        if previous.get("note") and not note:
            result["note"] = previous["note"]
    return result


def merge_results(source: Path, target: Path, note: str = "") -> Path:
    """Adds the runs of `source` (a results file of the same mode, e.g. another process's phases) to `target`.

    Runs already in `target` (same key) are kept as they are; `source`'s environments (each command that
    made it) are recorded in `target`'s `previous_environments`, the added runs' training time in
    `elapsed_seconds`.

    Raises:
        ValueError: if the two files differ in mode or in the learning rate chosen for a shared setting.
    """
    src, dst = json.loads(source.read_text()), json.loads(target.read_text())
    if src["mode"] != dst["mode"]:
        raise ValueError(f"cannot merge {source} ({src['mode']} mode) into {target} ({dst['mode']} mode)")
    for name, choice in src["lr_choice"].items():
        if name in dst["lr_choice"] and dst["lr_choice"][name]["lr"] != choice["lr"]:
            raise ValueError(f"{source} and {target} chose different learning rates for {name}")
        dst["lr_choice"].setdefault(name, choice)
    for name, times in src["step_times"].items():
        dst["step_times"].setdefault(name, times)
    keys = {r["key"] for r in dst["runs"]}
    added = [r for r in src["runs"] if r["key"] not in keys]
    dst["runs"] += added
    dst["elapsed_seconds"] = dst.get("elapsed_seconds", 0.0) + sum(r["train_seconds"] for r in added)
    known = {(e["started"], e["command"]) for e in [*dst.get("previous_environments", []), dst["environment"]]}
    for env in [*src.get("previous_environments", []), src["environment"]]:
        if (env["started"], env["command"]) not in known:  # each part's commands once, also when merged again
            dst.setdefault("previous_environments", []).append(dict(env, merged_from=source.name))
    dst.setdefault("merges", []).append({"source": source.name, "runs_added": len(added)})
    if note:
        dst["note"] = " ".join(filter(None, [dst.get("note", ""), note]))
    harness.save_json(dst, target)
    print(f"merged {len(added)} runs of {source} into {target}")
    return target



def adopt_step_times(step_times_path: Path, result_path: Path) -> None:
    """Makes the re-measured step times of `step_times_path` (see `remeasure_step_times`) those of `result_path`.

    The timings taken during the run are kept as `step_times_during_run`; `step_times_source` says where the
    new ones come from.
    """
    remeasured = json.loads(step_times_path.read_text())
    result = json.loads(result_path.read_text())
    result.setdefault("step_times_during_run", result["step_times"])
    result["step_times"] = remeasured["step_times"]
    env = remeasured["environment"]
    result["step_times_source"] = (
        f"re-measured after the runs ({remeasured.get('timing_rounds')} rounds x {remeasured.get('timing_steps')} steps per "
        f"variant, interleaved; {env['started']}, commit {env['git_commit']}, {env['device']}); file {step_times_path.name}"
    )
    harness.save_json(result, result_path)




def reuse_runs(source: Path, result: dict[str, Any], planned: list[tuple[str, str, int, int]]) -> int:
    """Copies into `result` the learning-rate choices of its settings and the `planned` (setting, variant, epochs,
    seed) runs that `source` already holds, each marked `reused_from`; returns how many runs were copied.

    For presets that share a protocol with an existing file (same data, models, augmentation, seeds): runs are
    deterministic per seed on CPU, so training them again would give the same numbers.
    """
    src = json.loads(source.read_text())
    settings = {name for name, *_ in planned}
    for name in settings & set(src["lr_choice"]):
        result["lr_choice"].setdefault(name, dict(src["lr_choice"][name], reused_from=source.name))
    keys = {run_key(name, variant, epochs, seed, result["lr_choice"][name]["lr"])
            for name, variant, epochs, seed in planned if name in result["lr_choice"]}
    have = {r["key"] for r in result["runs"]}
    added = [dict(r, reused_from=source.name) for r in src["runs"] if r["key"] in keys and r["key"] not in have]
    result["runs"] += added
    result.setdefault("reused", []).append({"source": source.name, "runs": len(added), "source_commit": src["environment"]["git_commit"],
                                            "source_command": src["environment"]["command"]})
    return len(added)
