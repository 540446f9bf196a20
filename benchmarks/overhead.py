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
    official         ``torch_tract.TrAct(first_layer, l=0.1)`` (torch-tract 1.0.0) where it runs;
                     a failure is recorded with its message (it crashes under bf16 autocast)
    proto_stream     CUDA only, prototype of a proposed change (README_overhead.md): the Gram and the
                     Cholesky factor are computed in the forward on a side CUDA stream, the backward
                     only waits for an event and runs the triangular solves. Skipped on CPU.

Modes (``--mode``):
    smoke   CI: tiny models, 1 round, < ~30 s on 2 CPU cores
    quick   CPU, reduced batches and rounds, a few minutes
    cpu     CPU, the four models at small batches (committed results: overhead_cpu.json)
    gpu     CUDA, batch 128, fp32 and bf16 autocast, plus micro-breakdown and torch.profiler deltas

``--tiny`` shrinks every model and batch (keeps every code path: variants, dtypes, micro, profile):
use it to test the GPU mode's logic on a CPU, e.g. ``--mode gpu --device cpu --tiny``.

Outputs: ``<out-dir>/overhead_<tag>.json`` and ``.md`` (tag = mode, or ``--tag``), rewritten after
every setting, labelled with device, torch / transformers versions, git commit and command line.

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
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
import hf_tract.modules as tm  # noqa: E402
from hf_tract import apply_tract, remove_tract  # noqa: E402

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


class _SideStreamState:
    """Prototype (proposed for hf_tract.modules._GramState): Gram + Cholesky factor computed in the
    forward on a side CUDA stream; the backward waits for an event and only runs the solve.

    Same operations in the same order as ``precondition_with_gram``: the gradient is bit-identical.
    """

    streams: dict = {}

    def __init__(self, x, geometry, lambda_, solve_dtype):
        dtype = solve_dtype or torch.float64
        main = torch.cuda.current_stream(x.device)
        side = self.streams.get(x.device)
        if side is None:
            side = self.streams[x.device] = torch.cuda.Stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), torch.no_grad():
            gram = tf.patch_gram(x, geometry)
            rows = tf.num_patch_rows(x, geometry)
            with torch.autocast("cuda", enabled=False):
                n = gram.shape[-1]
                regularized = gram.to(dtype) / rows + lambda_ * torch.eye(n, dtype=dtype, device=gram.device)
                self.factor, info = torch.linalg.cholesky_ex(regularized)
                self.ok = (info == 0).reshape(-1, 1, 1)
                self.mean_eig = regularized.diagonal(dim1=1, dim2=2).mean(-1).reshape(-1, 1, 1)
            self.event = torch.cuda.Event()
            self.event.record(side)
        x.record_stream(side)

    def precondition(self, grad_weight, lambda_, solve_dtype):
        main = torch.cuda.current_stream(grad_weight.device)
        main.wait_event(self.event)
        for t in (self.factor, self.ok, self.mean_eig):
            t.record_stream(main)
        groups = self.factor.shape[0]
        with torch.autocast("cuda", enabled=False):
            rhs = grad_weight.reshape(groups, grad_weight.shape[0] // groups, -1).to(self.factor.dtype).transpose(1, 2)
            solved = torch.cholesky_solve(rhs, self.factor)
            solved = torch.where(self.ok, solved, rhs / self.mean_eig)
            return solved.transpose(1, 2).reshape(grad_weight.shape).to(grad_weight.dtype)


_ORIGINAL_TRACT_WEIGHT = tm.tract_weight


def _proto_tract_weight(layer, weight, x, geometry):
    n = weight[0].numel()
    if not x.is_cuda or tm._sync_group(layer) is not None or tf.num_patch_rows(x, geometry) < n:
        return _ORIGINAL_TRACT_WEIGHT(layer, weight, x, geometry)
    state = _SideStreamState(x, geometry, layer.tract_lambda, layer.tract_solve_dtype)
    return tm._TrActWeight.apply(weight, state, layer.tract_lambda, layer.tract_solve_dtype)


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
    if "official" in names:
        import torch_tract

        replacement = torch_tract.TrAct(original, l=LAMBDA)
        variants["official"] = Variant(
            "official",
            lambda: _set_submodule(model, first, replacement),
            lambda: _set_submodule(model, first, original),
        )
    if "proto_stream" in names and device.type == "cuda":
        def activate_proto():
            apply_tract(model, LAMBDA, target=first)
            tm.tract_weight = _proto_tract_weight

        def deactivate_proto():
            tm.tract_weight = _ORIGINAL_TRACT_WEIGHT
            remove_tract(model)

        variants["proto_stream"] = Variant("proto_stream", activate_proto, deactivate_proto)
    return [variants[n] for n in names if n in variants]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400]


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
            result["failures"][variant.name] = _short_error(exc)
            log(f"    {variant.name}: FAILED: {result['failures'][variant.name]}")
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
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
    if "proto_stream" in times and "hf_tract" in times:
        try:
            result["proto_stream_grad_check"] = _grad_check(model, first, optimizer, x, y, device, dtype_name)
        except Exception as exc:  # noqa: BLE001
            result["failures"]["proto_stream_grad_check"] = _short_error(exc)
    summary = ", ".join(
        f"{n} {e['step_ms_median']:.2f} ms x{e['ratio_median']:.4f}" for n, e in result["variants"].items()
    )
    log(f"    {rounds} rounds x {steps} steps: {summary}")
    return result, model, first, optimizer, x, y


def _grad_check(model, first, optimizer, x, y, device, dtype_name):
    """Max |difference| of the first-layer weight gradient, proto_stream vs hf_tract (same step)."""
    grads = {}
    layer_weight = model.get_submodule(first).weight
    for name, activate, deactivate in (
        ("hf_tract", lambda: apply_tract(model, LAMBDA, target=first), lambda: remove_tract(model)),
        ("proto_stream", lambda: (apply_tract(model, LAMBDA, target=first), setattr(tm, "tract_weight", _proto_tract_weight)),
         lambda: (setattr(tm, "tract_weight", _ORIGINAL_TRACT_WEIGHT), remove_tract(model))),
    ):
        activate()
        try:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            with _autocast(device, dtype_name):
                loss = F.cross_entropy(model(pixel_values=x).logits.float(), y)
            loss.backward()
            grads[name] = layer_weight.grad.detach().clone()
        finally:
            deactivate()
    model.zero_grad(set_to_none=True)
    return float((grads["hf_tract"] - grads["proto_stream"]).abs().max())


# --------------------------------------------------------------------------------------------
# Micro-breakdown and profile
# --------------------------------------------------------------------------------------------


def _median_time(fn, device, repeats):
    fn()
    _sync(device)
    values = []
    for _ in range(repeats):
        values.append(time_block(fn, 1, device))
    return 1e3 * statistics.median(values)


def micro_breakdown(model, first, x, device, repeats):
    """Gram alone, solve alone (float64 / float32), and the Gram's accuracy, for the first layer."""
    layer = model.get_submodule(first)
    geometry = tf.PatchGeometry.conv(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    rows = tf.num_patch_rows(x, geometry)
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
    out["path"] = "gram"
    out["gram_ms"] = _median_time(lambda: tf.patch_gram(x, geometry), device, repeats)
    gram = tf.patch_gram(x, geometry)
    for name, dtype in (("solve_f64_ms", torch.float64), ("solve_f32_ms", torch.float32)):
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
    return out


def layer_only(model, first, x, device, dtype_name, repeats, variant_names):
    """Forward + backward of the first layer alone (input without grad, like pixels), per variant,
    interleaved; median ms. Isolates what each variant adds to a step, with far less noise than
    whole steps on a shared machine."""
    import copy

    layer = model.get_submodule(first)
    modules = {"plain": copy.deepcopy(layer)}
    for name, dtype in (("hf_tract", None), ("hf_tract_f32", torch.float32)):
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
            failures[name] = _short_error(exc)
    _sync(device)
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
            _sync(device)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    train_step(model, optimizer, x, y, device, dtype_name)
                _sync(device)
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


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def metadata(device, args, cfg):
    commit = _git("rev-parse", "HEAD") or os.environ.get("HF_TRACT_COMMIT") or "unknown"
    dirty = _git("status", "--porcelain", "--", "hf_tract", "benchmarks/overhead.py")
    try:
        import torch_tract  # noqa: F401
        from importlib.metadata import version

        official = version("torch-tract")
    except Exception as exc:  # noqa: BLE001
        official = f"unavailable ({_short_error(exc)})"
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_tract": official,
        "python": platform.python_version(),
        "git_commit": commit,
        "hf_tract_dirty": bool(dirty) if dirty is not None else None,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "mode": args.mode,
        "tiny": cfg["tiny"],
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "optimizer": "torch.optim.AdamW(lr=1e-4), default implementation",
        "lambda": LAMBDA,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "note": args.note,
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


def _pct(ratio):
    return f"{100 * (ratio - 1):+.1f}%"


def render_markdown(data) -> str:
    meta = data["meta"]
    lines = [
        f"# TrAct per-step overhead — {meta['device']} ({meta['device_type']})",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, torch-tract {meta['torch_tract']}, "
        f"git {meta['git_commit'][:12]}{' (hf_tract modified)' if meta.get('hf_tract_dirty') else ''}, "
        f"{meta['started']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    lines += [
        "Step = forward + backward + AdamW step. Overhead = median over rounds of (variant step time / plain "
        "step time in the same round); variants interleaved in one process. Peak = max_memory_allocated "
        "during the variant's steps / plain's.",
        "",
    ]
    names = []
    for setting in data["settings"]:
        for n in list(setting["variants"]) + list(setting["failures"]):
            if n != "plain" and n not in names and not n.endswith("_grad_check"):
                names.append(n)
    header = "| model | dtype | batch | plain ms/step | " + " | ".join(names) + " | rounds |"
    if any(s["variants"] for s in data["settings"]):
        lines += [header, "|" + "---|" * (5 + len(names))]
    for s in data["settings"]:
        cells = []
        for n in names:
            if n in s["variants"]:
                e = s["variants"][n]
                q = e["ratio_quartiles"]
                cell = f"{_pct(e['ratio_median'])}"
                if "q1" in q:
                    cell += f" [{_pct(q['q1'])}, {_pct(q['q3'])}]"
                if e.get("peak_ratio") is not None:
                    cell += f"; mem {_pct(e['peak_ratio'])}"
                cells.append(cell)
            elif n in s["failures"]:
                cells.append("fails: " + s["failures"][n][:90].replace("|", "/"))
            else:
                cells.append("—")
        if not s["variants"]:
            continue
        plain = s["variants"].get("plain", {}).get("step_ms_median", float("nan"))
        lines.append(f"| {s['model']} | {s['dtype']} | {s['batch']} | {plain:.2f} | " + " | ".join(cells) + f" | {s['rounds']} |")
    if any(s["variants"] for s in data["settings"]):
        lines += ["", "Overhead cells: median [quartiles] of the per-round ratio."]
    else:
        lines += ["(--micro-only: no whole-step timing in this file.)"]
    vs = [(s, n, e["vs_official_median"]) for s in data["settings"] for n, e in s["variants"].items()
          if n.startswith("hf_tract") and "vs_official_median" in e]
    if vs:
        lines += ["", "hf_tract step time / official step time (median of per-round ratios): " + ", ".join(
            f"{s['model']} {s['dtype']} {n} {r:.3f}" for s, n, r in vs)]
    micro = [s for s in data["settings"] if s.get("micro")]
    if micro:
        lines += [
            "",
            "## Micro-breakdown (first layer alone, median ms)",
            "",
            "| model | dtype | N rows | n | path | Gram / patches | solve f64 | (factor / triangular) | solve f32 | (factor / triangular) | Gram TF32 | Gram fp32 rel err | Gram TF32 rel err | f32-solve rel err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in micro:
            m = s["micro"]
            if "error" in m:
                lines.append(f"| {s['model']} | {s['dtype']} | error: {m['error'][:80]} |")
                continue

            def f(key, fmt="{:.3f}"):
                return fmt.format(m[key]) if key in m else "—"

            lines.append(
                f"| {s['model']} | {s['dtype']} | {m['num_rows']} | {m['n']} | {m['path']} | "
                f"{f('gram_ms') if 'gram_ms' in m else f('patch_matrix_ms')} | {f('solve_f64_ms')} | "
                f"{f('factor_f64_ms')} / {f('triangular_solve_f64_ms')} | {f('solve_f32_ms')} | "
                f"{f('factor_f32_ms')} / {f('triangular_solve_f32_ms')} | "
                f"{f('gram_tf32_ms')} | {f('gram_fp32_rel_err', '{:.1e}')} | {f('gram_tf32_rel_err', '{:.1e}')} | "
                f"{f('solve_f32_rel_err', '{:.1e}')} |"
            )
    layered = [s for s in data["settings"] if s.get("layer_only") and "ms" in s["layer_only"]]
    if layered:
        lnames = []
        for s in layered:
            lnames += [n for n in s["layer_only"]["ms"] if n not in lnames]
        lines += [
            "",
            "## First layer alone: forward + backward, median ms (interleaved)",
            "",
            "| model | dtype | " + " | ".join(lnames) + " |",
            "|---|---|" + "---|" * len(lnames),
        ]
        for s in layered:
            ms = s["layer_only"]["ms"]
            fails = s["layer_only"].get("failures", {})
            cells = [f"{ms[n]:.3f}" if n in ms else ("fails" if n in fails else "—") for n in lnames]
            lines.append(f"| {s['model']} | {s['dtype']} | " + " | ".join(cells) + " |")
    profiled = [s for s in data["settings"] if s.get("profile")]
    if profiled:
        lines += ["", "## Profile: ops added by hf_tract (self time per step, hf_tract minus plain)", ""]
        for s in profiled:
            p = s["profile"]
            if "error" in p:
                lines.append(f"- {s['model']} {s['dtype']}: profile error: {p['error']}")
                continue
            top = ", ".join(f"`{k}` {v:.3f}" for k, v in p["top_added_ops_ms"][:8])
            lines.append(
                f"- **{s['model']} {s['dtype']}** ({p['clock']}; plain {p['plain_total_ms']:.2f} ms, hf_tract "
                f"{p['hf_tract_total_ms']:.2f} ms): {top}"
            )
            if "top_added_kernels_ms" in p:
                kernels = ", ".join(f"`{k[:60]}` {v:.3f}" for k, v in p["top_added_kernels_ms"][:8])
                lines.append(
                    f"  - kernels (GPU busy time per step: plain {p['plain_kernel_total_ms']:.2f} ms, hf_tract "
                    f"{p['hf_tract_kernel_total_ms']:.2f} ms): {kernels}"
                )
    checks = [s for s in data["settings"] if "proto_stream_grad_check" in s]
    if checks:
        lines += ["", "proto_stream vs hf_tract first-layer gradient, max |diff|: " + ", ".join(
            f"{s['model']} {s['dtype']} {s['proto_stream_grad_check']:.1e}" for s in checks)]
    if data.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def write_outputs(data, out_dir: Path, tag: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"overhead_{tag}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"overhead_{tag}.md").write_text(render_markdown(data))


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
                        choices=["plain", "hf_tract", "hf_tract_f32", "official", "proto_stream"])
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
        path.with_suffix(".md").write_text(render_markdown(data))
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
    variant_names = args.variants or ["plain", "hf_tract", "hf_tract_f32", "official"] + (
        ["proto_stream"] if device.type == "cuda" else [])
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
            data["errors"].append(f"{model_name} {dtype_name}: {_short_error(exc)}")
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
                result["layer_only"] = {"error": _short_error(exc)}
                log(f"    layer-only ERROR {traceback.format_exc()}")
        if cfg["micro"] and dtype_name == cfg["dtypes"][0] and not behind:
            try:
                result["micro"] = micro_breakdown(model, first, x, device, repeats=5 if cfg["tiny"] else 15)
                log(f"    micro: {result['micro']}")
            except Exception as exc:  # noqa: BLE001
                result["micro"] = {"error": _short_error(exc)}
                log(f"    micro ERROR {traceback.format_exc()}")
        if cfg["profile"] and not behind:
            try:
                result["profile"] = profile_delta(model, first, optimizer, x, y, device, dtype_name,
                                                  steps=2 if cfg["tiny"] else 3)
                log(f"    profile: +{result['profile']['hf_tract_total_ms'] - result['profile']['plain_total_ms']:.3f} ms/step; "
                    + ", ".join(f"{k} {v:.3f}" for k, v in result["profile"]["top_added_ops_ms"][:5]))
            except Exception as exc:  # noqa: BLE001
                result["profile"] = {"error": _short_error(exc)}
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
