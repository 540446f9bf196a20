"""Peak extra memory of first-layer discovery vs one inference forward (hf_tract issue 10, item 2).

Model: ALIGN at its default size (``AlignModel(AlignConfig())``: EfficientNet-B7 vision tower at
600x600 and a BERT-base text tower, 172M parameters, random weights), batch 1. Each measurement runs
in a fresh subprocess: build the model, run one warm-up no-grad forward (allocator, lazy inits), then
reset the peak resident set size (``/proc/self/clear_refs``, ``5``) and run exactly one of:

- ``no_grad_forward``: one ``torch.no_grad()`` forward of the input the probe tries first;
- ``find_first_layers_probe``: ``find_first_layers(model, use_registry=False)`` (the probe alone);
- ``find_first_layers``: the default path (registry first);
- ``autograd_forward``: one forward with a ``requires_grad`` input and frozen parameters, the graph
  kept until it returns (what the previous autograd-walking probe cost), for reference.

"Peak extra" is ``VmHWM`` after the step minus ``VmRSS`` before it. CPU only (resident memory).

Usage: ``python benchmarks/discovery_memory.py [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


STEPS = ("no_grad_forward", "find_first_layers_probe", "find_first_layers", "autograd_forward")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step: str) -> dict:
    import torch
    from transformers import AlignConfig, AlignModel

    from hf_tract.probe_inputs import candidate_inputs
    from hf_tract.targets import find_first_layers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AlignModel(AlignConfig()).eval()
    candidate = next(iter(candidate_inputs(model)))
    with torch.no_grad():
        candidate.run(model)  # warm-up
    result = {"step": step, "parameters": sum(p.numel() for p in model.parameters()),
              "pixel_shape": list(candidate.pixels[0].shape)}  # fmt: skip
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    if step == "no_grad_forward":
        with torch.no_grad():
            candidate.run(model)
    elif step == "find_first_layers_probe":
        result["found"] = [name for name, _ in find_first_layers(model, use_registry=False)]
    elif step == "find_first_layers":
        result["found"] = [name for name, _ in find_first_layers(model)]
    elif step == "autograd_forward":
        for p in model.parameters():
            p.requires_grad_(False)
        candidate.pixels[0].requires_grad_(True)
        with torch.enable_grad():
            output = candidate.run(model)
        del output
    result["rss_before_bytes"] = before
    result["peak_extra_bytes"] = _status("VmHWM") - before
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one measurement (subprocess)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(measure(args.step)))
        return

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    for step in STEPS:
        out = subprocess.run([sys.executable, __file__, "--step", step], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{step}: {results[-1]['peak_extra_bytes'] / 2**20:.1f} MiB", flush=True)
    by_step = {r["step"]: r for r in results}
    summary = {
        "question": "peak extra memory of find_first_layers <= that of one no_grad forward of the same input?",
        "model": "AlignModel(AlignConfig()) (default size, random weights), batch 1",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "commit": commit,
        "load_average_at_start": os.getloadavg(),
        "results": results,
        "probe_over_no_grad_forward": by_step["find_first_layers_probe"]["peak_extra_bytes"]
        / by_step["no_grad_forward"]["peak_extra_bytes"],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "discovery_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Discovery memory (benchmarks/discovery_memory.py)",
        "",
        f"{summary['model']}; input {by_step['no_grad_forward']['pixel_shape']} pixels "
        f"(+ text dummies); {by_step['no_grad_forward']['parameters'] / 1e6:.0f}M parameters.",
        f"Machine: {summary['machine']}; torch {summary['torch']}; commit {commit}; "
        f"load average at start {summary['load_average_at_start'][0]:.2f}.",
        "",
        "| step | peak extra RSS (MiB) |",
        "|---|---|",
        *[f"| {r['step']} | {r['peak_extra_bytes'] / 2**20:.1f} |" for r in results],
        "",
        f"find_first_layers (probe alone) / one no_grad forward: {summary['probe_over_no_grad_forward']:.2f}.",
        f"First layer found by the probe: {by_step['find_first_layers_probe'].get('found')}.",
        "",
    ]
    (out_dir / "discovery_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
