"""Convergence benchmark: does TrAct reach the plain model's accuracy in fewer epochs?

TrAct vs plain training on Fashion-MNIST with everything else identical (same initialisation, same
data order, same augmentation draws, same learning-rate schedule), following the protocol of the
TrAct paper (arXiv 2410.23970):

- every training budget (number of epochs) is a separate full run with its own cosine schedule
  (linear warm-up over the first 5% of the steps);
- the learning rate is picked from a small grid as the best one for the *plain* model (validation
  accuracy, first seed, at ``lr_budget`` epochs) and reused unchanged for TrAct and for every budget;
- TrAct is run with lambda in {0.05, 0.1, 0.2}; every point is the mean +- std over several seeds;
- the models are a small ViT (patch embedding) and a small ResNet (7x7 conv stem) built from
  `transformers` configs with ``num_channels=1`` (no channel replication), trained with AdamW or SGD;
- robustness ablation: inputs standardized (``std``), in [0, 1] (``unit``), in [0, 255] (``raw255``),
  and standardized with a random per-image contrast and brightness (``contrast``; applied to the
  training batches and, with a fixed draw, to the validation and test images).

The headline number of a setting is the smallest budget at which TrAct's mean test accuracy reaches the
plain model's best mean test accuracy (over all budgets), given as an epoch ratio and as a wall-clock ratio
(epoch ratio divided by the per-step time ratio of TrAct to plain, which is measured with interleaved steps
in one process so that machine load affects both alike).

Usage (from the repository root):

    python benchmarks/convergence.py --mode quick   # CI smoke test, < 1 minute on 2 CPU cores
    python benchmarks/convergence.py --mode cpu     # subset of settings, about an hour on 2 CPU cores
    python benchmarks/convergence.py --mode gpu     # all settings, full data, on a CUDA device
    python benchmarks/convergence.py --report benchmarks/results/convergence_cpu.json  # table + plots again

Results land in ``benchmarks/results/convergence_<mode>.json`` / ``.md`` and
``benchmarks/plots/convergence_<mode>_{epochs,wallclock}.png``. The JSON is rewritten after every run;
``--resume`` skips the runs already in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the checkout's hf_tract, also where it is not installed (device machines)
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification  # noqa: E402

from hf_tract import apply_tract  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PLOTS_DIR = REPO_ROOT / "benchmarks" / "plots"
DEFAULT_DATA_DIRS = (
    REPO_ROOT.parent / "shared" / "data" / "fashion-mnist",
    REPO_ROOT / "shared" / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),  # Debian package dataset-fashion-mnist
)
ARCHS = ("vit", "resnet")
OPTIMIZERS = ("adam", "sgd")
INPUTS = ("std", "unit", "raw255", "contrast")
LR_GRIDS = {"adam": (3e-4, 1e-3, 3e-3), "sgd": (0.03, 0.1, 0.3)}
WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark setting: architecture, optimizer and input preprocessing.

    Args:
        arch (`str`): `"vit"` or `"resnet"`.
        optimizer (`str`): `"adam"` (AdamW) or `"sgd"` (SGD with Nesterov momentum).
        inputs (`str`): `"std"`, `"unit"`, `"raw255"` or `"contrast"` (see the module docstring).
    """

    arch: str
    optimizer: str
    inputs: str

    @property
    def name(self) -> str:
        """Name used on the command line and in the results, e.g. `"vit-adam-std"`."""
        return f"{self.arch}-{self.optimizer}-{self.inputs}"

    @classmethod
    def from_name(cls, name: str) -> Setting:
        """Parses a name such as `"resnet-sgd-contrast"`."""
        arch, optimizer, inputs = name.split("-")
        if arch not in ARCHS or optimizer not in OPTIMIZERS or inputs not in INPUTS:
            expected = "-".join("<" + "|".join(choices) + ">" for choices in (ARCHS, OPTIMIZERS, INPUTS))
            raise ValueError(f"unknown setting {name!r}; expected {expected}")
        return cls(arch, optimizer, inputs)


@dataclasses.dataclass
class Preset:
    """Everything a mode fixes: data subset, grid, models and batch size.

    Args:
        n_train (`int`): training images (the first `n_train` of a fixed permutation of the 60k training set).
        n_val (`int`): validation images for the learning-rate choice (the next `n_val` of that permutation).
        n_test (`int`): test images (the first `n_test` of the 10k test set).
        budgets (`list[int]`): training budgets in epochs; each one is a separate run.
        seeds (`list[int]`): seeds; a seed fixes initialisation, data order and augmentation draws.
        lambdas (`list[float]`): TrAct lambdas.
        settings (`list[str]`): setting names (see [`Setting`]).
        lr_budget (`int`): budget (epochs) of the runs that choose the learning rate.
        batch_size (`int`): training batch size.
        vit (`dict`): `ViTConfig` keyword arguments.
        resnet (`dict`): `ResNetConfig` keyword arguments.
        timing_rounds (`int`): rounds of the interleaved per-step timing.
        timing_steps (`int`): steps per variant and round of the interleaved per-step timing.
        setting_lambdas (`dict[str, list[float]]`): TrAct lambdas of the settings that do not use `lambdas`.
    """

    n_train: int
    n_val: int
    n_test: int
    budgets: list[int]
    seeds: list[int]
    lambdas: list[float]
    settings: list[str]
    lr_budget: int
    batch_size: int
    vit: dict[str, Any]
    resnet: dict[str, Any]
    timing_rounds: int
    timing_steps: int
    setting_lambdas: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def lambdas_for(self, setting: str) -> list[float]:
        """TrAct lambdas run for `setting`."""
        return self.setting_lambdas.get(setting, self.lambdas)


SMALL_VIT = {"patch_size": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
SMALL_RESNET = {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        n_train=512, n_val=256, n_test=512, budgets=[1, 2], seeds=[0, 1], lambdas=[0.1],
        settings=["vit-adam-std", "resnet-sgd-contrast"], lr_budget=1, batch_size=64,
        vit=SMALL_VIT, resnet=SMALL_RESNET, timing_rounds=2, timing_steps=2,
    ),
    "cpu": Preset(
        n_train=6_000, n_val=2_000, n_test=5_000, budgets=[1, 2, 4, 8, 16], seeds=[0, 1, 2, 3, 4],
        lambdas=[0.05, 0.1, 0.2],
        settings=[
            "vit-adam-std", "resnet-sgd-std", "vit-adam-contrast", "resnet-sgd-contrast", "vit-adam-raw255", "vit-adam-unit"
        ],
        lr_budget=2, batch_size=128, vit=dict(SMALL_VIT, patch_size=7), resnet=SMALL_RESNET,
        timing_rounds=6, timing_steps=4,
        setting_lambdas={s: [0.1] for s in ("vit-adam-contrast", "resnet-sgd-contrast", "vit-adam-raw255", "vit-adam-unit")},
    ),
    "gpu": Preset(
        n_train=55_000, n_val=5_000, n_test=10_000, budgets=[1, 2, 4, 8, 16], seeds=[0, 1, 2],
        lambdas=[0.05, 0.1, 0.2],
        settings=[f"{a}-{o}-{i}" for a in ARCHS for o in OPTIMIZERS for i in INPUTS],
        lr_budget=4, batch_size=256,
        vit={"patch_size": 4, "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 384},
        resnet={"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2], "layer_type": "basic"},
        timing_rounds=10, timing_steps=20,
    ),
}


@dataclasses.dataclass
class Data:
    """Fashion-MNIST split into training / validation / test, as tensors on the benchmark device.

    Args:
        train_x (`torch.Tensor`): uint8 training images, shape `(n_train, 1, 28, 28)`.
        train_y (`torch.Tensor`): int64 training labels.
        val_x (`torch.Tensor`): uint8 validation images (held out from the training set).
        val_y (`torch.Tensor`): int64 validation labels.
        test_x (`torch.Tensor`): uint8 test images.
        test_y (`torch.Tensor`): int64 test labels.
        mean (`float`): mean pixel value of the training images, in [0, 1].
        std (`float`): pixel standard deviation of the training images, in [0, 1].
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def find_data_dir(explicit: str | None) -> Path:
    """Returns the Fashion-MNIST folder: `explicit`, else `$FASHION_MNIST_DIR`, else a known location.

    Raises:
        FileNotFoundError: if none of them holds `train-images-idx3-ubyte.gz`.
    """
    candidates = [Path(p) for p in (explicit, os.environ.get("FASHION_MNIST_DIR")) if p] + list(DEFAULT_DATA_DIRS)
    for candidate in candidates:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST idx .gz files not found in any of {[str(c) for c in candidates]}")


def load_fashion_mnist(data_dir: Path, preset: Preset, device: torch.device) -> Data:
    """Loads the idx files into memory and splits them as `preset` says (fixed permutation, seed 0)."""
    train_x = torch.from_numpy(_read_idx(data_dir / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    train_y = torch.from_numpy(_read_idx(data_dir / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    test_x = torch.from_numpy(_read_idx(data_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    test_y = torch.from_numpy(_read_idx(data_dir / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    if preset.n_train + preset.n_val > len(train_x) or preset.n_test > len(test_x):
        raise ValueError("the preset asks for more images than Fashion-MNIST has")
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = perm[: preset.n_train], perm[preset.n_train : preset.n_train + preset.n_val]
    pixels = train_x[train_idx].float() / 255
    return Data(
        train_x=train_x[train_idx].to(device),
        train_y=train_y[train_idx].to(device),
        val_x=train_x[val_idx].to(device),
        val_y=train_y[val_idx].to(device),
        test_x=test_x[: preset.n_test].to(device),
        test_y=test_y[: preset.n_test].to(device),
        mean=pixels.mean().item(),
        std=pixels.std().item(),
    )


def preprocess(images: torch.Tensor, inputs: str, data: Data, generator: torch.Generator) -> torch.Tensor:
    """Turns uint8 images into model inputs.

    Args:
        images (`torch.Tensor`): uint8 images, shape `(batch, 1, 28, 28)`.
        inputs (`str`): `"std"` (standardized with the training mean / std), `"unit"` ([0, 1]),
            `"raw255"` ([0, 255]) or `"contrast"` (standardized, then `a * x + b` per image with
            `log a ~ U(log 1/4, log 4)` and `b ~ U(-2, 2)`).
        data (`Data`): gives the training mean and std.
        generator (`torch.Generator`): CPU generator for the contrast / brightness draws.
    """
    x = images.float()
    if inputs == "raw255":
        return x
    x = x / 255
    if inputs == "unit":
        return x
    x = (x - data.mean) / data.std
    if inputs == "std":
        return x
    n = x.shape[0]
    scale = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(4)).to(x.device)
    shift = ((torch.rand(n, generator=generator) * 4) - 2).to(x.device)
    return x * scale.view(n, 1, 1, 1) + shift.view(n, 1, 1, 1)


def build_model(setting: Setting, preset: Preset, seed: int) -> torch.nn.Module:
    """Builds a freshly initialised (seeded) one-channel 28x28 classifier from a transformers config."""
    torch.manual_seed(seed)
    if setting.arch == "vit":
        config = ViTConfig(num_channels=1, image_size=28, num_labels=10, **preset.vit)
        return ViTForImageClassification(config)
    config = ResNetConfig(num_channels=1, num_labels=10, **preset.resnet)
    return ResNetForImageClassification(config)


def make_optimizer(setting: Setting, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (weight decay 0.05) or SGD (Nesterov momentum 0.9, weight decay 5e-4)."""
    if setting.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `WARMUP_FRACTION` of the steps, then cosine decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on preprocessed `inputs`."""
    model.eval()
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = model(pixel_values=inputs[start : start + batch_size]).logits
        correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / len(inputs)


def eval_inputs(data: Data, inputs: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed validation and test images (a fixed contrast / brightness draw for `"contrast"`)."""
    generator = torch.Generator().manual_seed(12345)
    return preprocess(data.val_x, inputs, data, generator), preprocess(data.test_x, inputs, data, generator)


def train_run(
    setting: Setting,
    preset: Preset,
    data: Data,
    evals: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    lambda_: float | None,
    epochs: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Trains one model for `epochs` epochs with its own cosine schedule and evaluates it.

    Args:
        lambda_ (`float` or `None`): TrAct lambda, or `None` for plain training.
        evals (`tuple[torch.Tensor, torch.Tensor]`): preprocessed validation and test inputs.

    Returns:
        `dict`: the run's record: accuracies, training wall time (evaluation excluded), final loss,
        whether the loss became non-finite.
    """
    model = build_model(setting, preset, seed).to(device)
    if lambda_ is not None:
        apply_tract(model, lambda_=lambda_)
    model.train()
    optimizer = make_optimizer(setting, model, lr)
    steps_per_epoch = len(data.train_x) // preset.batch_size
    scheduler = cosine_with_warmup(optimizer, epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1000)
    diverged = False
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data.train_x), generator=order_gen).to(device)
        for step in range(steps_per_epoch):
            idx = perm[step * preset.batch_size : (step + 1) * preset.batch_size]
            x = preprocess(data.train_x[idx], setting.inputs, data, aug_gen)
            loss = F.cross_entropy(model(pixel_values=x).logits, data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if not math.isfinite(loss.item()):
            diverged = True
            break
    _sync(device)
    wall = time.perf_counter() - start
    return {
        "val_acc": accuracy(model, evals[0], data.val_y),
        "test_acc": accuracy(model, evals[1], data.test_y),
        "train_seconds": wall,
        "steps": epochs * steps_per_epoch,
        "final_loss": loss.item(),
        "diverged": diverged,
    }


def measure_step_times(
    setting: Setting, preset: Preset, data: Data, lr: float, device: torch.device
) -> dict[str, Any]:
    """Per-step training time of plain and TrAct models, measured interleaved in this process.

    All variants (plain and one TrAct model per lambda, same initialisation) take turns: every round each
    variant runs `preset.timing_steps` steps on the same batches, in a rotated order. The median over rounds
    of the per-step time is kept, so machine load that comes and goes hits every variant alike.

    Returns:
        `dict`: `seconds_per_step` per variant (`"plain"`, `"tract_0.1"`, ...), `ratio` (TrAct / plain)
        per lambda, and the raw per-round times.
    """
    variants: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    lambdas = preset.lambdas_for(setting.name)
    for lambda_ in [None, *lambdas]:
        model = build_model(setting, preset, 0).to(device)
        if lambda_ is not None:
            apply_tract(model, lambda_=lambda_)
        variants["plain" if lambda_ is None else f"tract_{lambda_}"] = (model, make_optimizer(setting, model, lr))
    gen = torch.Generator().manual_seed(0)
    steps = preset.timing_steps
    batches = []
    for _ in range(steps):
        idx = torch.randint(len(data.train_x), (preset.batch_size,), generator=gen).to(device)
        batches.append((preprocess(data.train_x[idx], setting.inputs, data, gen), data.train_y[idx]))

    def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        _sync(device)
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        return (time.perf_counter() - start) / steps

    names = list(variants)
    for name in names:  # warm-up
        run_steps(*variants[name])
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(preset.timing_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_round[name].append(run_steps(*variants[name]))
    seconds = {name: statistics.median(times) for name, times in per_round.items()}
    return {
        "seconds_per_step": seconds,
        "ratio": {str(lam): seconds[f"tract_{lam}"] / seconds["plain"] for lam in lambdas},
        "per_round": per_round,
    }


def run_key(setting: str, variant: str, epochs: int, seed: int, lr: float) -> str:
    """Identifies a run inside the results file (a learning-rate search run doubles as a budget run)."""
    return f"{setting}|{variant}|{epochs}|{seed}|{lr:g}"


def git_commit() -> str:
    """Commit of the repository (with `+dirty` when tracked files differ), else `$HF_TRACT_COMMIT`, else `"unknown"`.

    `HF_TRACT_COMMIT` is for copies of the working tree without `.git` (e.g. on a device machine).
    """
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HF_TRACT_COMMIT", "unknown")
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions, command line and commit, for the results file."""
    return {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
        ),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the protocol for every setting of the preset, rewriting the results file after every run."""
    preset = dataclasses.replace(PRESETS[args.mode])
    for field in ("settings", "budgets", "seeds", "lambdas"):
        if getattr(args, field) is not None:
            setattr(preset, field, getattr(args, field))
    if args.lambdas is not None:
        preset.setting_lambdas = {}
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    data_dir = find_data_dir(args.data_dir)
    data = load_fashion_mnist(data_dir, preset, device)
    out = Path(args.output)
    result: dict[str, Any] = {
        "mode": args.mode,
        "preset": dataclasses.asdict(preset),
        "lr_grids": {k: list(v) for k, v in LR_GRIDS.items()},
        "data": {
            "source": str(data_dir),
            "subset": f"train: {preset.n_train} of the 60k training images (fixed permutation, seed 0); "
            f"validation (learning-rate choice only): the next {preset.n_val}; test: the first {preset.n_test} of the 10k test images",
            "train_mean": data.mean,
            "train_std": data.std,
        },
        "environment": environment(device),
        "note": args.note,
        "lr_choice": {},
        "step_times": {},
        "runs": [],
    }
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        for key in ("lr_choice", "step_times", "runs"):
            result[key] = previous[key]
        result["elapsed_seconds"] = previous.get("elapsed_seconds", 0.0)
        result["previous_environments"] = [*previous.get("previous_environments", []), previous["environment"]]
    done = {r["key"]: r for r in result["runs"]}
    start = time.perf_counter()

    def record(
        setting: Setting, lambda_: float | None, lr: float, epochs: int, seed: int, evals: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, Any]:
        """Runs (or, when already in the results, looks up) one training run and saves the results."""
        variant = "plain" if lambda_ is None else f"tract_{lambda_}"
        key = run_key(setting.name, variant, epochs, seed, lr)
        if key in done:
            return done[key]
        rec = {"key": key, "setting": setting.name, "variant": variant, "lambda": lambda_, "lr": lr}
        rec.update(epochs=epochs, seed=seed)
        rec.update(train_run(setting, preset, data, evals, lr, lambda_, epochs, seed, device))
        result["runs"].append(rec)
        done[key] = rec
        result["elapsed_seconds"] = result.get("elapsed_seconds", 0.0) + rec["train_seconds"]
        save(result, out)
        print(f"[{time.perf_counter() - start:7.0f}s] {setting.name:22s} {variant:10s} lr={lr:<6g} ep={epochs:<3d} seed={seed} "
              f"val={rec['val_acc']:.4f} test={rec['test_acc']:.4f} train={rec['train_seconds']:.1f}s", flush=True)
        return rec

    for name in preset.settings:
        setting = Setting.from_name(name)
        evals = eval_inputs(data, setting.inputs)
        if name not in result["lr_choice"]:
            grid = LR_GRIDS[setting.optimizer]
            scores = {lr: record(setting, None, lr, preset.lr_budget, preset.seeds[0], evals)["val_acc"] for lr in grid}
            best = max(grid, key=lambda lr: scores[lr])
            result["lr_choice"][name] = {
                "lr": best,
                "val_acc": {f"{lr:g}": acc for lr, acc in scores.items()},
                "epochs": preset.lr_budget,
                "seed": preset.seeds[0],
            }
        lr = result["lr_choice"][name]["lr"]
        if name not in result["step_times"]:
            result["step_times"][name] = measure_step_times(setting, preset, data, lr, device)
            save(result, out)
            print(f"{name}: per-step TrAct/plain time ratio {result['step_times'][name]['ratio']}", flush=True)
        for epochs in preset.budgets:
            for seed in preset.seeds:
                for lambda_ in [None, *preset.lambdas_for(name)]:
                    record(setting, lambda_, lr, epochs, seed, evals)
    result["environment"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["wall_seconds_total"] = time.perf_counter() - start
    save(result, out)
    return result


def save(result: dict[str, Any], path: Path) -> None:
    """Writes `result` as JSON (atomically, so an interrupted run leaves a readable file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Mean / std of the test accuracy and training time per setting, variant and budget.

    Returns:
        `dict`: `{setting: {variant: {epochs: {"mean", "std", "n", "seconds", "diverged"}}}}` over the runs
        with the chosen learning rate, the preset's budgets and seeds (other learning-rate search runs are left out).
    """
    preset = result["preset"]
    table: dict[str, Any] = {}
    for rec in result["runs"]:
        chosen = result["lr_choice"].get(rec["setting"], {}).get("lr")
        if rec["lr"] != chosen or rec["epochs"] not in preset["budgets"] or rec["seed"] not in preset["seeds"]:
            continue
        table.setdefault(rec["setting"], {}).setdefault(rec["variant"], {}).setdefault(rec["epochs"], []).append(rec)
    summary: dict[str, Any] = {}
    for setting, variants in table.items():
        for variant, budgets in variants.items():
            for epochs, recs in sorted(budgets.items()):
                accs = [r["test_acc"] for r in recs]
                summary.setdefault(setting, {}).setdefault(variant, {})[epochs] = {
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs),
                    "seconds": statistics.fmean(r["train_seconds"] for r in recs),
                    "diverged": sum(r["diverged"] for r in recs),
                }
    return summary


def crossing_epochs(budgets: list[int], means: list[float], target: float) -> float | None:
    """First number of epochs at which a mean-accuracy curve reaches `target`, interpolated.

    The curve is taken as piecewise linear in log2(epochs) between the measured budgets; `None` if it never
    reaches `target`, the smallest budget if it is reached there already (nothing measured below it).
    """
    for i, (epochs, mean) in enumerate(zip(budgets, means)):
        if mean >= target:
            if i == 0:
                return float(epochs)
            lo, hi = math.log2(budgets[i - 1]), math.log2(epochs)
            frac = (target - means[i - 1]) / (mean - means[i - 1])
            return 2 ** (lo + frac * (hi - lo))
    return None


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and lambda: the smallest budget at which TrAct reaches the plain model's best accuracy.

    The plain model's best is its highest mean test accuracy over the budgets (at the smallest budget that
    attains it). TrAct "matches" at the smallest budget whose mean test accuracy is at least that. The epoch
    ratio is plain budget / TrAct budget; the wall-clock ratio divides it by the interleaved per-step time
    ratio (TrAct / plain). `interp_*` use [`crossing_epochs`] (TrAct's curve interpolated in log2(epochs))
    instead of the measured budgets. `measured_run_ratio` is the wall-clock ratio from the runs' own
    training times (noisier). `epoch_ratio_interp_by_budget` gives, for every budget b, b divided by the
    interpolated epochs TrAct needs to reach the plain model's mean accuracy at b (`None`: never reached;
    capped at b / smallest budget). Only budgets that every variant completed with all seeds count.
    """
    summary = summarize(result)
    n_seeds = len(result["preset"]["seeds"])
    rows = []
    for setting, variants in summary.items():
        if "plain" not in variants:
            continue
        tract_variants = sorted(v for v in variants if v.startswith("tract_"))
        budgets = sorted(
            b for b in variants["plain"]
            if all(b in variants[v] and variants[v][b]["n"] == n_seeds for v in ["plain", *tract_variants])
        )
        if not budgets:
            continue
        plain = variants["plain"]
        best_acc = max(plain[b]["mean"] for b in budgets)
        plain_budget = min(b for b in budgets if plain[b]["mean"] == best_acc)
        for variant in tract_variants:
            lam = variant.removeprefix("tract_")
            tract = variants[variant]
            match = next((b for b in budgets if tract[b]["mean"] >= best_acc), None)
            interp = crossing_epochs(budgets, [tract[b]["mean"] for b in budgets], best_acc)
            step_ratio = result["step_times"].get(setting, {}).get("ratio", {}).get(lam)
            row = {
                "setting": setting,
                "lambda": float(lam),
                "budgets": budgets,
                "plain_best_acc": best_acc,
                "plain_best_std": plain[plain_budget]["std"],
                "plain_best_epochs": plain_budget,
                "tract_acc_at_plain_best_epochs": tract[plain_budget]["mean"],
                "tract_std_at_plain_best_epochs": tract[plain_budget]["std"],
                "tract_best_acc": max(tract[b]["mean"] for b in budgets),
                "tract_match_epochs": match,
                "tract_match_epochs_interp": interp,
                "step_time_ratio": step_ratio,
                "epoch_ratio": None if match is None else plain_budget / match,
                "epoch_ratio_interp": None if interp is None else plain_budget / interp,
                "wallclock_ratio": None,
                "wallclock_ratio_interp": None,
                "measured_run_ratio": None,
                "epoch_ratio_interp_by_budget": {},
            }
            tract_curve = [tract[b]["mean"] for b in budgets]
            for b in budgets:
                crossing = crossing_epochs(budgets, tract_curve, plain[b]["mean"])
                row["epoch_ratio_interp_by_budget"][b] = None if crossing is None else b / crossing
            if step_ratio is not None:
                for key in ("", "_interp"):
                    if row["epoch_ratio" + key] is not None:
                        row["wallclock_ratio" + key] = row["epoch_ratio" + key] / step_ratio
            if match is not None:
                row["measured_run_ratio"] = plain[plain_budget]["seconds"] / tract[match]["seconds"]
            rows.append(row)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_report(result: dict[str, Any], plot_paths: list[str], md_dir: Path) -> str:
    """The markdown table (headline + every budget) of a results file."""
    env = result["environment"]
    preset = result["preset"]
    lines = [
        f"# Convergence benchmark: TrAct vs plain (`{result['mode']}` mode)",
        "",
        f"- Command: `{env['command']}` at commit `{env['git_commit']}`",
        f"- Device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs; started {env['started']}, "
        f"finished {env.get('finished', 'not finished')}; training time total {result.get('elapsed_seconds', 0) / 60:.1f} min",
        f"- Data: Fashion-MNIST, {result['data']['subset']}",
        f"- Budgets (epochs, each a full cosine run): {preset['budgets']}; seeds {preset['seeds']}; "
        f"λ {preset['lambdas']}" + "".join(f" ({s}: λ {lams})" for s, lams in preset.get("setting_lambdas", {}).items())
        + f"; batch size {preset['batch_size']}",
        f"- ViT: {preset['vit']}; ResNet: {preset['resnet']}",
        "- Learning rate: best for the *plain* model on the validation split "
        f"(grid {result['lr_grids']}, {preset['lr_budget']} epochs, seed {preset['seeds'][0]}), reused for TrAct",
    ]
    for earlier in result.get("previous_environments", []):
        lines.append(f"- Earlier part of these results (continued with `--resume`): `{earlier['command']}` at commit "
                     f"`{earlier['git_commit']}` on {earlier['device']}, started {earlier['started']}")
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    lines += [
        "",
        "## Headline: smallest budget at which TrAct reaches the plain model's best accuracy",
        "",
        "Epoch ratio = plain epochs / TrAct epochs at the measured budgets; *interp.* = the same with TrAct's mean "
        "curve interpolated linearly in log2(epochs) between budgets (a reading between measured points, not a "
        "measurement). Wall-clock ratio = epoch ratio / per-step time ratio (TrAct / plain, measured interleaved "
        "in one process). *Run-time ratio* = plain / TrAct from the runs' own training times (noisier). Ratios > 1 "
        "mean TrAct needs less; \"not reached\" = TrAct's mean never reaches the plain model's best.",
        "",
        "| setting | lr | λ | plain best acc % (epochs) | TrAct acc % at those epochs | TrAct matches at | epoch ratio | "
        "epoch ratio interp. | step-time ratio | wall-clock ratio | wall-clock ratio interp. | run-time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = headline(result)
    for row in rows:
        match = "not reached" if row["tract_match_epochs"] is None else f"{row['tract_match_epochs']} ep"
        lines.append(
            f"| {row['setting']} | {result['lr_choice'][row['setting']]['lr']:g} | {row['lambda']:g} | "
            f"{_pct(row['plain_best_acc'], row['plain_best_std'])} ({row['plain_best_epochs']} ep) | "
            f"{_pct(row['tract_acc_at_plain_best_epochs'], row['tract_std_at_plain_best_epochs'])} | {match} | "
            f"{_fmt(row['epoch_ratio'], '.2f', '×')} | {_fmt(row['epoch_ratio_interp'], '.2f', '×')} | "
            f"{_fmt(row['step_time_ratio'], '.3f')} | {_fmt(row['wallclock_ratio'], '.2f', '×')} | "
            f"{_fmt(row['wallclock_ratio_interp'], '.2f', '×')} | {_fmt(row['measured_run_ratio'], '.2f', '×')} |"
        )
    lines += [
        "",
        "### Epoch ratio at every accuracy level of the plain model (interpolated)",
        "",
        "For each budget b: b / the epochs TrAct needs (interpolated as above) to reach the plain model's mean "
        "accuracy at b. > 1: TrAct gets there sooner; \"—\": TrAct never reaches it; at the smallest budget the "
        "ratio is capped at 1 (nothing measured below it).",
        "",
    ]
    budget_sets = sorted({tuple(row["budgets"]) for row in rows}, key=len, reverse=True)
    for budgets in budget_sets:
        lines += ["| setting | λ | " + " | ".join(f"{b} ep" for b in budgets) + " |", "|---|---" + "|---" * len(budgets) + "|"]
        for row in rows:
            if tuple(row["budgets"]) == budgets:
                cells = [_fmt(row["epoch_ratio_interp_by_budget"][b], ".2f", "×") for b in budgets]
                lines.append(f"| {row['setting']} | {row['lambda']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    summary = summarize(result)
    lines += ["## Test accuracy (%) per budget, mean ± std over seeds", ""]
    for setting, variants in summary.items():
        names = ["plain", *sorted(v for v in variants if v != "plain")]
        lines += [f"### {setting} (lr {result['lr_choice'][setting]['lr']:g})", "",
                  "| epochs | " + " | ".join(n.replace("tract_", "TrAct λ=") for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for epochs in sorted({b for v in variants.values() for b in v}):
            cells = []
            for n in names:
                s = variants.get(n, {}).get(epochs)
                if s is None:
                    cells.append("—")
                    continue
                partial = f" (n={s['n']})" if s["n"] != len(preset["seeds"]) else ""
                cells.append(_pct(s["mean"], s["std"]) + partial + (f" ({s['diverged']} diverged)" if s["diverged"] else ""))
            lines.append(f"| {epochs} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Learning-rate search (plain model, validation accuracy %)", ""]
    for setting, choice in result["lr_choice"].items():
        scores = ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in choice["val_acc"].items())
        lines.append(f"- {setting}: {scores} → {choice['lr']:g}")
    lines += ["", "## Per-step training time (interleaved, median over rounds)", ""]
    for setting, times in result["step_times"].items():
        lines.append(f"- {setting}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in times["seconds_per_step"].items()))
    if plot_paths:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({os.path.relpath(p, md_dir)})" for p in plot_paths]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], prefix: Path) -> list[str]:
    """Test accuracy vs epochs and vs training wall-clock, TrAct solid / plain dashed, one panel per setting.

    Returns:
        `list[str]`: the two PNG paths written.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(result)
    paths = []
    for axis in ("epochs", "wallclock"):
        n = len(summary)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, (setting, variants) in zip(axes.flat, summary.items()):
            for variant in ["plain", *sorted(v for v in variants if v != "plain")]:
                points = variants.get(variant, {})
                budgets = sorted(points)
                x = budgets if axis == "epochs" else [points[b]["seconds"] for b in budgets]
                mean = np.array([100 * points[b]["mean"] for b in budgets])
                std = np.array([100 * points[b]["std"] for b in budgets])
                style = {"color": "black", "linestyle": "--", "label": "plain"} if variant == "plain" else {
                    "linestyle": "-", "label": variant.replace("tract_", "TrAct λ=")}
                line, = ax.plot(x, mean, marker="o", markersize=3, **style)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            ax.set_xscale("log", base=2)
            if axis == "epochs":
                ax.set_xticks(sorted({b for v in variants.values() for b in v}))
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(f"{setting} (lr {result['lr_choice'][setting]['lr']:g})", fontsize=10)
            ax.set_xlabel("epochs (each a full cosine run)" if axis == "epochs" else "training wall-clock [s]")
            ax.set_ylabel("test accuracy [%]")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        env = result["environment"]
        preset = result["preset"]
        fig.suptitle(f"Fashion-MNIST ({preset['n_train']} training / {preset['n_test']} test images): TrAct (solid) vs plain (dashed)\nmean ± std over {len(result['preset']['seeds'])} seeds; "
                     f"{env['device']}", fontsize=10)
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}_{axis}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_report(result_path: Path, plots_dir: Path = PLOTS_DIR) -> list[str]:
    """(Re)writes the markdown table (beside the JSON) and the plots (in `plots_dir`) of a results file.

    Returns:
        `list[str]`: the written paths.
    """
    result = json.loads(result_path.read_text())
    plot_paths = plot(result, plots_dir / result_path.stem) if result["runs"] else []
    md_path = result_path.with_suffix(".md")
    md_path.write_text(markdown_report(result, plot_paths, md_path.parent))
    return [str(md_path), *plot_paths]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(PRESETS), default="cpu", help="preset: quick (CI smoke), cpu (about 1 h on 2 cores), gpu (all settings, full data)")
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
    parser.add_argument("--plots-dir", default=str(PLOTS_DIR), help="folder for the PNG plots")
    parser.add_argument("--note", default="", help="free text stored in the results (e.g. machine load)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output file and skip them")
    parser.add_argument("--report", metavar="JSON", default=None, help="only rewrite the table and plots of an existing results file")
    parser.add_argument(
        "--remeasure-step-times", metavar="JSON", default=None,
        help="only measure the per-step TrAct/plain time ratios again with the current code, for the settings and "
        "learning rates of an existing results file; writes them beside it (<name>_step_times.json)",
    )
    args = parser.parse_args(argv)
    if args.settings is not None:
        for name in args.settings:
            Setting.from_name(name)
    args.device = args.device or ("cuda" if args.mode == "gpu" else "cpu")
    args.output = args.output or str(RESULTS_DIR / f"convergence_{args.mode}.json")
    return args


def remeasure_step_times(result_path: Path, args: argparse.Namespace) -> Path:
    """Per-step time ratios of an existing results file's settings, measured again with the current code.

    The accuracy runs stay as they were; only the cost side of the wall-clock ratio is re-measured (e.g.
    after a change that makes TrAct's step cheaper). Writes `<result>_step_times.json` and returns its path.
    """
    previous = json.loads(result_path.read_text())
    preset = dataclasses.replace(PRESETS[previous["mode"]])
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist(find_data_dir(args.data_dir), preset, device)
    out = {"source": str(result_path), "environment": environment(device), "note": args.note, "step_times": {}}
    for name, choice in previous["lr_choice"].items():
        out["step_times"][name] = measure_step_times(Setting.from_name(name), preset, data, choice["lr"], device)
        before = previous["step_times"].get(name, {}).get("ratio")
        print(f"{name}: TrAct/plain per-step ratio now {out['step_times'][name]['ratio']} (before: {before})", flush=True)
    path = result_path.with_name(result_path.stem + "_step_times.json")
    save(out, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or, with `--report`, only the table and plots) and prints the written paths."""
    args = parse_args(argv)
    if args.remeasure_step_times:
        paths = [str(remeasure_step_times(Path(args.remeasure_step_times), args))]
    elif args.report:
        paths = write_report(Path(args.report), Path(args.plots_dir))
    else:
        run_benchmark(args)
        paths = [args.output, *write_report(Path(args.output), Path(args.plots_dir))]
    print("\n".join(paths))


if __name__ == "__main__":
    main()
