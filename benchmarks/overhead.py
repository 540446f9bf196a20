"""Per-training-step overhead of TrAct: plain vs hf_tract vs the official ``torch-tract`` package.

One process, one model per (model, dtype) setting, one AdamW optimizer. The variants are switched on
the same model between timing blocks (``remove_tract`` / ``apply_tract`` for hf_tract; the official
``torch_tract.TrAct`` replacement module, which shares the weight and bias Parameters, swapped in and
out), so every variant trains the same parameters with the same optimizer state and the peak memory
of each variant is the real peak of a training step. Rounds interleave the variants (the order is
rotated every round); every round yields one time per variant and one ratio to the plain step of the
same round; the reported numbers are medians over the rounds, so slow drifts of machine load cancel.

A training step is: zero_grad(set_to_none=True), forward (optionally under bf16 autocast), cross
entropy on random labels, backward, AdamW step. Inputs are a fixed standardised random batch.

Variants:
    plain            the model as built
    hf_tract         ``apply_tract(model, 0.1, target=<first layer>)`` (float64 Cholesky solve, default)
    hf_tract_f32     same with ``solve_dtype=torch.float32``
    hf_tract_f32r    same with ``solve_dtype="float32_refined"`` (float32 Cholesky, one float64 refinement step)
    official         ``torch_tract.TrAct(first_layer, l=0.1)`` (torch-tract 1.0.0) where it runs;
                     a failure is recorded with its message (it crashes under bf16 autocast)

Modes (``--mode``):
    smoke   CI: tiny models, 1 round, < ~30 s on 2 CPU cores
    quick   CPU, reduced batches and rounds, a few minutes
    cpu     CPU, the four models at small batches (committed results: overhead_cpu.json)
    gpu     CUDA, batch 128, fp32 and bf16 autocast, plus micro-breakdown and torch.profiler deltas

``--tiny`` shrinks every model and batch (keeps every code path: variants, dtypes, micro, profile):
use it to test the GPU mode's logic on a CPU, e.g. ``--mode gpu --device cpu --tiny``.

Outputs: ``<out-dir>/overhead_<tag>.json`` and ``.md`` (tag = mode, or ``--tag``), rewritten after
every setting, labelled with device, torch / transformers versions, git commit and command line. The
markdown is rendered by ``overhead_report.py``; bootstrap, sync and metadata come from ``harness.py``.

Usage (from the repository root):
    python benchmarks/overhead.py --mode smoke
    python benchmarks/overhead.py --mode cpu
    python benchmarks/overhead.py --mode gpu --out-dir $OUT          # see benchmarks/gpu_run.sh
    python benchmarks/overhead.py --report benchmarks/results/overhead_cpu.json   # markdown again
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable


sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the checkout's hf_tract first on sys.path)
import overhead_report  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_tract.functional as tf  # noqa: E402
from hf_tract import apply_tract, remove_tract  # noqa: E402
from hf_tract.functional import FLOAT32_REFINED  # noqa: E402
from hf_tract.geometry import PatchGeometry  # noqa: E402


REPO_ROOT = harness.REPO_ROOT

LAMBDA = 0.1


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _vit(image, patch, hidden, layers, heads, inter, labels):
    config = ViTConfig(
        image_size=image, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, num_labels=labels,
    )
    return ViTForImageClassification(config), "vit.embeddings.patch_embeddings.projection"


def _resnet(layer_type, depths, hidden, embedding, labels, cifar_stem):
    config = ResNetConfig(
        layer_type=layer_type, depths=depths, hidden_sizes=hidden, embedding_size=embedding,
        num_labels=labels, downsample_in_first_stage=layer_type == "bottleneck",
    )
    model = ResNetForImageClassification(config)
    if cifar_stem:  # CIFAR ResNet: 3x3 stride-1 stem, no max-pool
        model.resnet.embedder.embedder.convolution = nn.Conv2d(3, embedding, 3, stride=1, padding=1, bias=False)
        model.resnet.embedder.pooler = nn.Identity()
    return model, "resnet.embedder.embedder.convolution"


# name -> (image size, builder(tiny) -> (model, first-layer name), description)
MODELS: dict[str, tuple[int, Callable[[bool], tuple[nn.Module, str]], str]] = {
    "vit_b16_224": (
        224,
        lambda tiny: _vit(32, 16, 64, 1, 2, 128, 10) if tiny else _vit(224, 16, 768, 12, 12, 3072, 1000),
        "ViT-B/16 @224 (transformers ViTConfig, 1000 classes); first layer: 16x16/16 patchify conv, n=768",
    ),
    "resnet50_224": (
        224,
        lambda tiny: _resnet("bottleneck", [1, 1, 1, 1], [16, 32, 32, 32], 8, 10, False)
        if tiny else _resnet("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048], 64, 1000, False),
        "ResNet-50 @224 (transformers ResNetConfig, 1000 classes); first layer: 7x7/2 conv pad 3, n=147",
    ),
    "cifar_vit": (
        32,
        lambda tiny: _vit(32, 4, 48, 1, 2, 96, 10) if tiny else _vit(32, 4, 384, 7, 12, 1536, 10),
        "CIFAR ViT: 7 layers x 384 (12 heads, MLP 1536), patch 4, 32 px, 10 classes; first layer n=48",
    ),
    "cifar_resnet18": (
        32,
        lambda tiny: _resnet("basic", [1, 1, 1, 1], [8, 16, 16, 16], 8, 10, True)
        if tiny else _resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512], 64, 10, True),
        "CIFAR ResNet-18 (transformers ResNetConfig basic [2,2,2,2]), 3x3/1 stem pad 1, no max-pool, "
        "10 classes; first layer n=27",
    ),
}

# Per mode: batch per model, dtypes, timing budget.
MODES = {
    "smoke": dict(batch={m: 2 for m in MODELS}, dtypes=["fp32"], seconds=0.0, min_rounds=1, max_rounds=1,
                  warmup=1, tiny=True, micro=True, profile=False, block_s=0.0),
    "quick": dict(batch={"vit_b16_224": 2, "resnet50_224": 2, "cifar_vit": 16, "cifar_resnet18": 8},
                  dtypes=["fp32"], seconds=12.0, min_rounds=3, max_rounds=15, warmup=1, tiny=False,
                  micro=True, profile=False, block_s=0.0),
    "cpu": dict(batch={"vit_b16_224": 4, "resnet50_224": 4, "cifar_vit": 32, "cifar_resnet18": 16},
                dtypes=["fp32"], seconds=45.0, min_rounds=5, max_rounds=40, warmup=1, tiny=False,
                micro=True, profile=False, block_s=0.0),
    "gpu": dict(batch={m: 128 for m in MODELS}, dtypes=["fp32", "bf16"], seconds=16.0, min_rounds=5,
                max_rounds=60, warmup=2, tiny=False, micro=True, profile=True, block_s=0.3),
}

# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class Variant:
    def __init__(self, name, activate, deactivate=lambda: None):
        self.name, self.activate, self.deactivate = name, activate, deactivate


def make_variants(model, first, names, device):
    original = model.get_submodule(first)

    def hf(solve_dtype):
        def activate():
            apply_tract(model, LAMBDA, target=first, solve_dtype=solve_dtype)
        return activate

    def deactivate_hf():
        remove_tract(model)

    variants = {"plain": Variant("plain", lambda: None)}
    variants["hf_tract"] = Variant("hf_tract", hf(None), deactivate_hf)
    variants["hf_tract_f32"] = Variant("hf_tract_f32", hf(torch.float32), deactivate_hf)
    variants["hf_tract_f32r"] = Variant("hf_tract_f32r", hf(FLOAT32_REFINED), deactivate_hf)
    if "official" in names:
        import torch_tract

        replacement = torch_tract.TrAct(original, l=LAMBDA)
        variants["official"] = Variant(
            "official",
            lambda: _set_submodule(model, first, replacement),
            lambda: _set_submodule(model, first, original),
        )
    return [variants[n] for n in names if n in variants]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _autocast(device, dtype_name):
    if dtype_name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, x, y, device, dtype_name):
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, dtype_name):
        logits = model(pixel_values=x).logits
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()


def time_block(step, steps, device):
    """Mean seconds per step over ``steps`` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) / steps


def _quantiles(values):
    if len(values) < 2:
        return {"min": min(values), "max": max(values)}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def bench_setting(model_name, dtype_name, batch, cfg, device, variant_names, log, deadline):
    image, builder, _ = MODELS[model_name]
    torch.manual_seed(0)
    model, first = builder(cfg["tiny"])
    if cfg["tiny"]:
        image = 32
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, model.config.num_labels, (batch,), device=device)
    variants = make_variants(model, first, variant_names, device)
    result = {
        "model": model_name, "dtype": dtype_name, "batch": batch, "image_size": image,
        "first_layer": first, "first_layer_repr": repr(model.get_submodule(first)),
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "variants": {}, "failures": {},
    }

    def step():
        train_step(model, optimizer, x, y, device, dtype_name)

    # Warm-up (also detects failures, e.g. the official package under bf16 autocast).
    usable = []
    warm_times = {}
    for variant in variants:
        variant.activate()
        try:
            for _ in range(cfg["warmup"]):
                warm_times[variant.name] = time_block(step, 1, device)
            usable.append(variant)
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            result["failures"][variant.name] = harness.short_error(exc)
            log(f"    {variant.name}: FAILED: {result['failures'][variant.name]}")
            optimizer.zero_grad(set_to_none=True)
            harness.sync(device)
        finally:
            variant.deactivate()
    steps = 1
    if cfg["block_s"] > 0 and "plain" in warm_times:
        steps = max(1, min(20, round(cfg["block_s"] / max(warm_times["plain"], 1e-6))))
    result["steps_per_block"] = steps

    times = {v.name: [] for v in usable}
    peaks = {v.name: [] for v in usable}
    ratios = {v.name: [] for v in usable}
    vs_official = {v.name: [] for v in usable}
    begin = time.perf_counter()
    rounds = 0
    while rounds < cfg["max_rounds"]:
        elapsed = time.perf_counter() - begin
        if rounds >= cfg["min_rounds"] and (elapsed >= cfg["seconds"] or time.perf_counter() >= deadline):
            break
        shift = rounds % len(usable)
        order = usable[shift:] + usable[:shift]
        this_round = {}
        for variant in order:
            variant.activate()
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                this_round[variant.name] = time_block(step, steps, device)
                if device.type == "cuda":
                    peaks[variant.name].append(torch.cuda.max_memory_allocated(device))
                    result.setdefault("resident_bytes", base)
            finally:
                variant.deactivate()
        for name, value in this_round.items():
            times[name].append(value)
            ratios[name].append(value / this_round["plain"])
            if "official" in this_round:
                vs_official[name].append(value / this_round["official"])
        rounds += 1
    result["rounds"] = rounds
    result["timing_seconds"] = time.perf_counter() - begin
    plain_peak = statistics.median(peaks["plain"]) if peaks.get("plain") else None
    for name in times:
        if not times[name]:
            continue
        entry = {
            "step_ms_median": 1e3 * statistics.median(times[name]),
            "step_ms_all": [1e3 * t for t in times[name]],
            "ratio_median": statistics.median(ratios[name]),
            "ratio_quartiles": _quantiles(ratios[name]),
        }
        if vs_official[name]:
            entry["vs_official_median"] = statistics.median(vs_official[name])
        if peaks.get(name):
            entry["peak_bytes"] = max(peaks[name])
            entry["peak_ratio"] = max(peaks[name]) / plain_peak if plain_peak else None
        result["variants"][name] = entry
    summary = ", ".join(
        f"{n} {e['step_ms_median']:.2f} ms x{e['ratio_median']:.4f}" for n, e in result["variants"].items()
    )
    log(f"    {rounds} rounds x {steps} steps: {summary}")
    return result, model, first, optimizer, x, y


# --------------------------------------------------------------------------------------------
# Micro-breakdown and profile
# --------------------------------------------------------------------------------------------


def _median_time(fn, device, repeats):
    fn()
    harness.sync(device)
    values = []
    for _ in range(repeats):
        values.append(time_block(fn, 1, device))
    return 1e3 * statistics.median(values)


def micro_breakdown(model, first, x, device, repeats):
    """Gram alone, solve alone (float64 / float32 / float32 refined), the Gram's and the solves' accuracy, and the
    full-precision weight gradient TrAct forms under autocast, for the first layer."""
    layer = model.get_submodule(first)
    geometry = PatchGeometry.of(layer)
    rows = geometry.num_rows(x.shape)
    n = layer.weight[0].numel()
    grad_weight = torch.randn_like(layer.weight)
    out = {"num_rows": rows, "n": n, "out_channels": layer.weight.shape[0]}
    if rows < n:
        patches = tf.patch_matrix(x, geometry)
        out["path"] = "woodbury"
        out["patch_matrix_ms"] = _median_time(lambda: tf.patch_matrix(x, geometry), device, repeats)
        for name, dtype in (("solve_f64_ms", torch.float64), ("solve_f32_ms", torch.float32)):
            out[name] = _median_time(lambda: tf.precondition_with_patches(grad_weight, patches, LAMBDA, dtype), device, repeats)
        return out
    # The weight gradient formed from the float32 input and a bf16 upstream gradient (TrAct under autocast).
    with torch.no_grad():
        upstream = torch.randn_like(layer(x)).bfloat16()
    out["weight_grad_fp32_ms"] = _median_time(lambda: tf.weight_gradient(upstream, x, geometry), device, repeats)
    out["path"] = "gram"
    out["gram_ms"] = _median_time(lambda: tf.patch_gram(x, geometry), device, repeats)
    gram = tf.patch_gram(x, geometry)
    for name, dtype in (
        ("solve_f64_ms", torch.float64), ("solve_f32_ms", torch.float32), ("solve_f32r_ms", FLOAT32_REFINED)
    ):
        out[name] = _median_time(lambda: tf.precondition_with_gram(grad_weight, gram, rows, LAMBDA, dtype), device, repeats)
    # Split of the solve: factorisation (batch only) vs triangular solves (needs the gradient).
    for suffix, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        regularized = gram.to(dtype) / rows + LAMBDA * torch.eye(n, dtype=dtype, device=gram.device)
        out[f"factor_{suffix}_ms"] = _median_time(lambda: torch.linalg.cholesky_ex(regularized), device, repeats)
        factor = torch.linalg.cholesky_ex(regularized)[0]
        rhs = grad_weight.reshape(gram.shape[0], grad_weight.shape[0] // gram.shape[0], -1).to(dtype).transpose(1, 2)
        out[f"triangular_solve_{suffix}_ms"] = _median_time(lambda: torch.cholesky_solve(rhs, factor), device, repeats)
    reference = tf.patch_gram(x.double(), geometry)
    out["gram_fp32_rel_err"] = float((gram.double() - reference).norm() / reference.norm())
    if device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            out["gram_tf32_ms"] = _median_time(lambda: tf.patch_gram(x, geometry), device, repeats)
            tf32 = tf.patch_gram(x, geometry)
            out["gram_tf32_rel_err"] = float((tf32.double() - reference).norm() / reference.norm())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    # Preconditioned gradient with a float32 solve vs float64 (standardised inputs here).
    g64 = tf.precondition_with_gram(grad_weight.double(), gram, rows, LAMBDA, torch.float64)
    g32 = tf.precondition_with_gram(grad_weight, gram, rows, LAMBDA, torch.float32)
    out["solve_f32_rel_err"] = float((g32.double() - g64).norm() / g64.norm())
    g32r = tf.precondition_with_gram(grad_weight, gram, rows, LAMBDA, FLOAT32_REFINED)
    out["solve_f32r_rel_err"] = float((g32r.double() - g64).norm() / g64.norm())
    return out


def layer_only(model, first, x, device, dtype_name, repeats, variant_names):
    """Forward + backward of the first layer alone (input without grad, like pixels), per variant,
    interleaved; median ms. Isolates what each variant adds to a step, with far less noise than
    whole steps on a shared machine."""
    import copy

    layer = model.get_submodule(first)
    modules = {"plain": copy.deepcopy(layer)}
    for name, dtype in (("hf_tract", None), ("hf_tract_f32", torch.float32), ("hf_tract_f32r", FLOAT32_REFINED)):
        if name in variant_names:
            holder = nn.Sequential(copy.deepcopy(layer))
            apply_tract(holder, LAMBDA, target="0", solve_dtype=dtype)
            modules[name] = holder
    if "official" in variant_names:
        try:
            import torch_tract

            modules["official"] = torch_tract.TrAct(copy.deepcopy(layer), l=LAMBDA)
        except Exception:  # noqa: BLE001
            pass
    with _autocast(device, dtype_name), torch.no_grad():
        grad_out = torch.randn_like(modules["plain"](x))

    def runner(module):
        def run():
            module.zero_grad(set_to_none=True)
            with _autocast(device, dtype_name):
                out = module(x)
            out.backward(grad_out)
        return run

    runs, failures = {}, {}
    for name, module in modules.items():
        try:
            runner(module)()
            runs[name] = runner(module)
        except Exception as exc:  # noqa: BLE001
            failures[name] = harness.short_error(exc)
    harness.sync(device)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(time_block(run, 1, device))
    out = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    out = {"ms": out, "added_ms": {n: v - out["plain"] for n, v in out.items() if n != "plain"}}
    if failures:
        out["failures"] = failures
    return out


def _device_time(event):
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return value
    return 0.0


def profile_delta(model, first, optimizer, x, y, device, dtype_name, steps, top=12):
    """torch.profiler over ``steps`` plain and ``steps`` hf_tract steps: per-op self time delta per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    use_device = device.type == "cuda"
    tables = {}
    for name, activate, deactivate in (
        ("plain", lambda: None, lambda: None),
        ("hf_tract", lambda: apply_tract(model, LAMBDA, target=first), lambda: remove_tract(model)),
    ):
        activate()
        try:
            train_step(model, optimizer, x, y, device, dtype_name)
            harness.sync(device)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    train_step(model, optimizer, x, y, device, dtype_name)
                harness.sync(device)
        finally:
            deactivate()
        per_op, per_kernel = {}, {}
        for event in prof.key_averages():
            is_kernel = str(getattr(event, "device_type", "")).endswith("CUDA")
            if use_device:
                value = _device_time(event)
                table = per_kernel if is_kernel else per_op
            else:
                value, table = event.self_cpu_time_total, per_op
            if value:
                table[event.key] = table.get(event.key, 0.0) + value / steps / 1e3  # ms per step
        tables[name] = (per_op, per_kernel)

    def ranked(index):
        plain, tract = tables["plain"][index], tables["hf_tract"][index]
        deltas = {k: tract.get(k, 0.0) - plain.get(k, 0.0) for k in set(plain) | set(tract)}
        return sorted(deltas.items(), key=lambda kv: -kv[1]), sum(plain.values()), sum(tract.values())

    ops, plain_total, tract_total = ranked(0)
    result = {
        "clock": "device self time (ops)" if use_device else "CPU self time",
        "steps": steps,
        "plain_total_ms": plain_total,
        "hf_tract_total_ms": tract_total,
        "top_added_ops_ms": [[k, v] for k, v in ops[:top] if v > 0],
        "top_removed_ops_ms": [[k, v] for k, v in ops[::-1][:4] if v < 0],
    }
    if use_device:
        kernels, plain_k, tract_k = ranked(1)
        result.update(
            plain_kernel_total_ms=plain_k, hf_tract_kernel_total_ms=tract_k,
            top_added_kernels_ms=[[k, v] for k, v in kernels[:top] if v > 0],
        )
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def metadata(device, args, cfg):
    """Result-file metadata: the harness's environment plus this benchmark's settings."""
    return harness.environment(
        device,
        hf_tract_dirty=harness.is_dirty("hf_tract", "benchmarks/overhead.py"),
        mode=args.mode,
        tiny=cfg["tiny"],
        cpu_threads=torch.get_num_threads(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        optimizer="torch.optim.AdamW(lr=1e-4), default implementation",
        **{"lambda": LAMBDA},
        note=args.note,
    )


def write_outputs(data, out_dir: Path, tag: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"overhead_{tag}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"overhead_{tag}.md").write_text(overhead_report.render_markdown(data))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--device", default=None, help="default: cuda for --mode gpu, else cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=["plain", "hf_tract", "hf_tract_f32", "hf_tract_f32r", "official"])
    parser.add_argument("--batch", type=int, default=None, help="override the batch of every model")
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per setting")
    parser.add_argument("--min-rounds", type=int, default=None)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="wall budget of the whole run: settings shrink to min rounds when behind")
    parser.add_argument("--tiny", action="store_true", help="shrink every model and batch (logic test)")
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--micro-only", action="store_true",
                        help="skip the whole-step timing: micro-breakdown and layer-only timing only")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="file suffix (default: the mode; 'gpu' runs use 'gpu')")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine shared)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--report", default=None, help="re-render the markdown of an existing JSON and exit")
    args = parser.parse_args(argv)

    if args.report:
        path = Path(args.report)
        data = json.loads(path.read_text())
        path.with_suffix(".md").write_text(overhead_report.render_markdown(data))
        print(path.with_suffix(".md").read_text())
        return 0

    cfg = dict(MODES[args.mode])
    if args.tiny:
        cfg.update(tiny=True, seconds=min(cfg["seconds"], 1.0), min_rounds=2, max_rounds=3, warmup=1, block_s=0.0,
                   batch={m: 4 for m in MODELS})
    if args.dtypes:
        cfg["dtypes"] = args.dtypes
    if args.batch:
        cfg["batch"] = {m: args.batch for m in MODELS}
    if args.seconds is not None:
        cfg["seconds"] = args.seconds
    if args.min_rounds is not None:
        cfg["min_rounds"] = args.min_rounds
    if args.micro_only:
        cfg.update(min_rounds=0, max_rounds=0, warmup=0, profile=False)
    if args.no_micro:
        cfg["micro"] = False
    if args.no_profile:
        cfg["profile"] = False
    device = torch.device(args.device or ("cuda" if args.mode == "gpu" else "cpu"))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    variant_names = args.variants or ["plain", "hf_tract", "hf_tract_f32", "hf_tract_f32r", "official"]
    if "plain" not in variant_names:
        variant_names = ["plain"] + variant_names
    tag = args.tag or args.mode + ("_tiny" if args.tiny and args.mode != "smoke" else "")
    out_dir = Path(args.out_dir)
    start = time.perf_counter()
    deadline = start + args.deadline_s if args.deadline_s else float("inf")

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    data = {"meta": metadata(device, args, cfg), "settings": [], "errors": []}
    data["meta"]["variants"] = variant_names
    data["meta"]["models"] = {m: MODELS[m][2] for m in args.models}
    log(f"device {data['meta']['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"mode {args.mode}{' tiny' if cfg['tiny'] else ''}")
    settings = [(m, d) for m in args.models for d in cfg["dtypes"]]
    for index, (model_name, dtype_name) in enumerate(settings):
        remaining = len(settings) - index
        setting_cfg = dict(cfg)
        if deadline != float("inf"):
            left = deadline - time.perf_counter()
            # Leave time for the remaining settings' warm-up, micro and profile.
            setting_cfg["seconds"] = max(0.0, min(cfg["seconds"], left / remaining - 8.0))
        log(f"[{index + 1}/{len(settings)}] {model_name} {dtype_name} batch {cfg['batch'][model_name]} "
            f"(timing budget {setting_cfg['seconds']:.0f}s)")
        try:
            result, model, first, optimizer, x, y = bench_setting(
                model_name, dtype_name, cfg["batch"][model_name], setting_cfg, device, variant_names, log, deadline)
        except Exception as exc:  # noqa: BLE001
            data["errors"].append(f"{model_name} {dtype_name}: {harness.short_error(exc)}")
            log(f"    ERROR {traceback.format_exc()}")
            _free(device)
            write_outputs(data, out_dir, tag)
            continue
        behind = time.perf_counter() > deadline - 5 * remaining
        if cfg["micro"] and not behind:
            try:
                result["layer_only"] = layer_only(model, first, x, device, dtype_name,
                                                  5 if cfg["tiny"] else 15, variant_names)
                log(f"    layer only (fwd+bwd ms): {result['layer_only']['ms']}")
            except Exception as exc:  # noqa: BLE001
                result["layer_only"] = {"error": harness.short_error(exc)}
                log(f"    layer-only ERROR {traceback.format_exc()}")
        if cfg["micro"] and dtype_name == cfg["dtypes"][0] and not behind:
            try:
                result["micro"] = micro_breakdown(model, first, x, device, repeats=5 if cfg["tiny"] else 15)
                log(f"    micro: {result['micro']}")
            except Exception as exc:  # noqa: BLE001
                result["micro"] = {"error": harness.short_error(exc)}
                log(f"    micro ERROR {traceback.format_exc()}")
        if cfg["profile"] and not behind:
            try:
                result["profile"] = profile_delta(model, first, optimizer, x, y, device, dtype_name,
                                                  steps=2 if cfg["tiny"] else 3)
                log(f"    profile: +{result['profile']['hf_tract_total_ms'] - result['profile']['plain_total_ms']:.3f} ms/step; "
                    + ", ".join(f"{k} {v:.3f}" for k, v in result["profile"]["top_added_ops_ms"][:5]))
            except Exception as exc:  # noqa: BLE001
                result["profile"] = {"error": harness.short_error(exc)}
                log(f"    profile ERROR {traceback.format_exc()}")
        data["settings"].append(result)
        del model, optimizer, x, y
        _free(device)
        data["meta"]["elapsed_s"] = time.perf_counter() - start
        write_outputs(data, out_dir, tag)
    log(f"done in {time.perf_counter() - start:.0f}s -> {out_dir}/overhead_{tag}.json/.md")
    return 0


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
