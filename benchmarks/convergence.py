"""Convergence benchmark (runner): what does TrAct buy in optimisation speed and in test accuracy?

TrAct vs plain training on Fashion-MNIST with everything else identical (same initialisation, same
data order, same augmentation draws, same learning-rate schedule), following the protocol of the
TrAct paper (arXiv 2410.23970):

- every training budget (number of epochs) is a separate full run with its own cosine schedule
  (linear warm-up over the first 5% of the steps);
- the learning rate is picked from a small grid as the best one for the *plain* model (validation
  accuracy, first seed, at ``lr_budget`` epochs) and reused unchanged for TrAct and for every budget;
- every run records, at its end, the **training loss** (cross entropy on a fixed slice of the training
  set, un-augmented, eval mode), the **test accuracy** and the **test loss**;
- the models are a small ViT (patch embedding) and a small ResNet (7x7 conv stem) built from
  `transformers` configs with ``num_channels=1`` (no channel replication), trained with AdamW or SGD;
- optional standard augmentation (``Preset.crop_pad``: random crop of the zero-padded image;
  ``Preset.hflip``: random horizontal flip), drawn from a per-seed generator shared by plain and TrAct;
- input ablation: standardized (``std``), in [0, 1] (``unit``), in [0, 255] (``raw255``), and standardized
  with a random per-image contrast and brightness (``contrast``);
- ablations (``Preset.ablation_*``): other lambdas, and the first layer trained by SGD while the rest uses
  AdamW (two torch optimizers built here, ``tract_<lambda>_sgd1`` variants);
- fidelity (``Preset.fidelity_*``): the same runs with the official ``torch-tract`` package
  (``official_<lambda>``) and with hf_tract's float64 solve (``tract_<lambda>_f64``), per-step losses of the
  first steps recorded, so that hf_tract can be compared with the reference implementation run for run.

The headline (see ``convergence_report.py``) gives, per setting and variant, the epochs (and wall-clock)
TrAct needs to reach the plain model's final training loss and the plain model's best test accuracy.
Wall-clock ratios divide epoch ratios by the per-step time ratio, measured with interleaved steps in one
process so that machine load affects both alike.

Usage (from the repository root):

    python benchmarks/convergence.py --quick          # CI smoke test, < 1 minute on 2 CPU cores
    python benchmarks/convergence.py --mode cpu       # 6k images, no augmentation (earlier results)
    python benchmarks/convergence.py --mode cpu-full  # 30k images, augmentation, ablations, fidelity
    python benchmarks/convergence.py --mode gpu       # all settings, full data, on a CUDA device
    python benchmarks/convergence.py --report benchmarks/results/convergence_cpu-full.json  # table + plots again

Results land in ``benchmarks/results/convergence_<mode>.json`` / ``.md`` and
``benchmarks/plots/convergence_<mode>_*.png``. The JSON is rewritten after every run;
``--resume`` skips the runs already in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the checkout's hf_tract first on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification  # noqa: E402

import convergence_report  # noqa: E402
from hf_tract import apply_tract, find_first_layer, tract_layers  # noqa: E402

REPO_ROOT = harness.REPO_ROOT
RESULTS_DIR = harness.RESULTS_DIR
PLOTS_DIR = harness.PLOTS_DIR
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
FIRST_STEPS_LOGGED = 50  # per-step training losses kept per run (fidelity comparison)


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
        """Parses a name such as `"resnet-sgd-contrast"`.

        Raises:
            ValueError: if the name is not `<arch>-<optimizer>-<inputs>` with known parts.
        """
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in ARCHS or parts[1] not in OPTIMIZERS or parts[2] not in INPUTS:
            expected = "-".join("<" + "|".join(choices) + ">" for choices in (ARCHS, OPTIMIZERS, INPUTS))
            raise ValueError(f"unknown setting {name!r}; expected {expected}")
        return cls(*parts)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one run trains the first layer.

    Args:
        lambda_ (`float`, *optional*): TrAct lambda; `None` for plain training.
        implementation (`str`): `"hf_tract"` or `"official"` (`torch_tract.TrAct`, fidelity runs only).
        solve_dtype (`str`, *optional*): `"float64"` forces hf_tract's float64 solve (fidelity reference).
        first_layer_sgd_lr (`float`, *optional*): train the first layer with SGD (momentum 0.9) at this
            learning rate while the rest keeps the setting's optimizer.
    """

    lambda_: float | None = None
    implementation: str = "hf_tract"
    solve_dtype: str | None = None
    first_layer_sgd_lr: float | None = None

    @property
    def name(self) -> str:
        """`"plain"`, `"tract_0.1"`, `"tract_0.1_sgd1"`, `"tract_0.1_f64"` or `"official_0.1"`."""
        if self.lambda_ is None:
            return "plain"
        name = f"{'official' if self.implementation == 'official' else 'tract'}_{self.lambda_}"
        if self.solve_dtype == "float64":
            name += "_f64"
        if self.first_layer_sgd_lr is not None:
            name += "_sgd1"
        return name


PLAIN = Variant()


@dataclasses.dataclass
class Preset:
    """Everything a mode fixes: data subset, grid, models, batch size, augmentation, ablations, fidelity.

    Args:
        n_train (`int`): training images (the first `n_train` of a fixed permutation of the 60k training set).
        n_val (`int`): validation images for the learning-rate choice (the next `n_val` of that permutation).
        n_test (`int`): test images (the first `n_test` of the 10k test set).
        budgets (`list[int]`): training budgets in epochs; each one is a separate run.
        seeds (`list[int]`): seeds; a seed fixes initialisation, data order and augmentation draws.
        lambdas (`list[float]`): TrAct lambdas of the main comparison.
        settings (`list[str]`): setting names (see [`Setting`]).
        lr_budget (`int`): budget (epochs) of the runs that choose the learning rate.
        batch_size (`int`): training batch size.
        vit (`dict`): `ViTConfig` keyword arguments.
        resnet (`dict`): `ResNetConfig` keyword arguments.
        timing_rounds (`int`): rounds of the interleaved per-step timing.
        timing_steps (`int`): steps per variant and round of the interleaved per-step timing.
        setting_lambdas (`dict[str, list[float]]`): TrAct lambdas of the settings that do not use `lambdas`.
        n_train_eval (`int`): size of the fixed slice of the training set (its first images, un-augmented)
            on which the training loss is measured.
        crop_pad (`int`): random-crop augmentation: zero padding in pixels (0: no crop).
        hflip (`bool`): random horizontal flip augmentation.
        late_budgets (`dict[str, list[int]]`): extra budgets per setting, run after everything else.
        ablation_settings (`list[str]`): settings that get the ablation variants.
        ablation_lambdas (`list[float]`): extra TrAct lambdas of the ablation.
        ablation_sgd_first_layer_lr (`float`, *optional*): AdamW settings of the ablation also run TrAct
            (first main lambda) with the first layer on SGD at this learning rate.
        ablation_budgets (`list[int]`): budgets of the ablation runs.
        ablation_seeds (`list[int]`): seeds of the ablation runs.
        fidelity_settings (`list[str]`): settings of the fidelity runs (official torch-tract, float64 solve).
        fidelity_budget (`int`): budget (epochs) of the fidelity runs.
        fidelity_seeds (`list[int]`): seeds of the fidelity runs.
        fidelity_f64_seeds (`list[int]`, *optional*): seeds of the float64-solve reference runs (default: all
            fidelity seeds).
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
    n_train_eval: int = 5_000
    crop_pad: int = 0
    hflip: bool = False
    late_budgets: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    ablation_settings: list[str] = dataclasses.field(default_factory=list)
    ablation_lambdas: list[float] = dataclasses.field(default_factory=list)
    ablation_sgd_first_layer_lr: float | None = None
    ablation_budgets: list[int] = dataclasses.field(default_factory=list)
    ablation_seeds: list[int] = dataclasses.field(default_factory=list)
    fidelity_settings: list[str] = dataclasses.field(default_factory=list)
    fidelity_budget: int = 4
    fidelity_seeds: list[int] = dataclasses.field(default_factory=list)
    fidelity_f64_seeds: list[int] | None = None

    def lambdas_for(self, setting: str) -> list[float]:
        """TrAct lambdas of the main comparison for `setting`."""
        return self.setting_lambdas.get(setting, self.lambdas)

    def main_variants(self, setting: str) -> list[Variant]:
        """Plain and one hf_tract variant per main lambda."""
        return [PLAIN, *(Variant(lam) for lam in self.lambdas_for(setting))]

    def ablation_variants(self, setting: str) -> list[Variant]:
        """The ablation variants of `setting` (empty when it is not an ablation setting)."""
        if setting not in self.ablation_settings:
            return []
        variants = [Variant(lam) for lam in self.ablation_lambdas if lam not in self.lambdas_for(setting)]
        if self.ablation_sgd_first_layer_lr is not None and Setting.from_name(setting).optimizer == "adam":
            variants.append(Variant(self.lambdas_for(setting)[0], first_layer_sgd_lr=self.ablation_sgd_first_layer_lr))
        return variants

    def fidelity_variants(self, setting: str, seed: int) -> list[Variant]:
        """hf_tract, official torch-tract and (for `fidelity_f64_seeds`) hf_tract's float64 solve, first main lambda."""
        if setting not in self.fidelity_settings:
            return []
        lam = self.lambdas_for(setting)[0]
        variants = [PLAIN, Variant(lam), Variant(lam, implementation="official")]
        if self.fidelity_f64_seeds is None or seed in self.fidelity_f64_seeds:
            variants.append(Variant(lam, solve_dtype="float64"))
        return variants


SMALL_VIT = {"patch_size": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
SMALL_RESNET = {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        n_train=256, n_val=128, n_test=256, budgets=[1, 2], seeds=[0, 1], lambdas=[0.1],
        settings=["vit-adam-std", "resnet-sgd-contrast"], lr_budget=1, batch_size=64,
        vit=SMALL_VIT, resnet=SMALL_RESNET, timing_rounds=2, timing_steps=2,
        n_train_eval=128, crop_pad=2, hflip=True, late_budgets={"vit-adam-std": [3]},
        ablation_settings=["vit-adam-std"], ablation_lambdas=[0.05], ablation_sgd_first_layer_lr=0.1,
        ablation_budgets=[1], ablation_seeds=[0],
        fidelity_settings=["vit-adam-std"], fidelity_budget=1, fidelity_seeds=[0],
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
    # The protocol of issue 12: enough data and standard augmentation to separate optimisation from
    # overfitting; ablations and the fidelity check on the same protocol. Sized for one core of a shared 2-core
    # CPU at ~55 ms per step (about 80 min); longer budgets: `--budgets 1,2,4,8,16,32 --resume`.
    "cpu-full": Preset(
        n_train=30_000, n_val=5_000, n_test=10_000, budgets=[1, 2, 4, 8], seeds=[0, 1, 2], lambdas=[0.1],
        settings=["vit-adam-std", "resnet-sgd-std"], lr_budget=2, batch_size=128,
        vit=dict(SMALL_VIT, patch_size=7), resnet=SMALL_RESNET, timing_rounds=8, timing_steps=4,
        n_train_eval=5_000, crop_pad=2, hflip=True, late_budgets={"vit-adam-std": [16]},
        ablation_settings=["vit-adam-std", "resnet-sgd-std"], ablation_lambdas=[0.05, 0.2],
        ablation_sgd_first_layer_lr=0.1, ablation_budgets=[4], ablation_seeds=[0, 1],
        fidelity_settings=["vit-adam-std"], fidelity_budget=4, fidelity_seeds=[0, 1, 2], fidelity_f64_seeds=[0],
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
    """Loads the idx files into memory and splits them as `preset` says (fixed permutation, seed 0).

    Raises:
        ValueError: if the preset asks for more images than the data set has.
    """
    train_x = torch.from_numpy(_read_idx(data_dir / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    train_y = torch.from_numpy(_read_idx(data_dir / "train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    test_x = torch.from_numpy(_read_idx(data_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).copy())
    test_y = torch.from_numpy(_read_idx(data_dir / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    if preset.n_train + preset.n_val > len(train_x) or preset.n_test > len(test_x) or preset.n_train_eval > preset.n_train:
        raise ValueError("the preset asks for more images than Fashion-MNIST has (or a training-loss slice larger than n_train)")
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


def augment(images: torch.Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Standard augmentation of uint8 images: random crop of the zero-padded image, random horizontal flip.

    Args:
        images (`torch.Tensor`): uint8 images, shape `(batch, 1, H, W)`.
        crop_pad (`int`): padding in pixels; the crop offset is uniform in `[0, 2 * crop_pad]` per image and axis.
        hflip (`bool`): flip each image left-right with probability 1/2.
        generator (`torch.Generator`): CPU generator for the draws (same draws for plain and TrAct).

    Returns:
        `torch.Tensor`: augmented images, same shape and dtype.
    """
    n, _, height, width = images.shape
    if crop_pad:
        padded = F.pad(images, (crop_pad,) * 4)
        dy = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(images.device)
        rows = dy + torch.arange(height, device=images.device)
        cols = dx + torch.arange(width, device=images.device)
        batch = torch.arange(n, device=images.device).view(n, 1, 1)
        images = padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device).view(n, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    return images


def preprocess(images: torch.Tensor, inputs: str, data: Data, generator: torch.Generator) -> torch.Tensor:
    """Turns uint8 images into model inputs.

    Args:
        images (`torch.Tensor`): uint8 images, shape `(batch, 1, 28, 28)`.
        inputs (`str`): `"std"` (standardized with the training mean / std), `"unit"` ([0, 1]),
            `"raw255"` ([0, 255]) or `"contrast"` (standardized, then `a * x + b` per image with
            `log a ~ U(log 1/4, log 4)` and `b ~ U(-2, 2)`).
        data (`Data`): gives the training mean and std.
        generator (`torch.Generator`): CPU generator for the contrast / brightness draws.

    Returns:
        `torch.Tensor`: float32 inputs.
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


def apply_variant(model: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    """Trains the first layer of `model` as `variant` says (in place for hf_tract; returns the model).

    Raises:
        ImportError: for the official variant when `torch-tract` is not installed.
    """
    if variant.lambda_ is None:
        return model
    if variant.implementation == "official":
        import torch_tract  # benchmark / test dependency only

        name, layer = find_first_layer(model)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, torch_tract.TrAct(layer, l=variant.lambda_))
        return model
    solve_dtype = torch.float64 if variant.solve_dtype == "float64" else None
    return apply_tract(model, lambda_=variant.lambda_, solve_dtype=solve_dtype)


def make_optimizers(setting: Setting, model: torch.nn.Module, lr: float, variant: Variant) -> list[torch.optim.Optimizer]:
    """The run's optimizers: AdamW (weight decay 0.05) or SGD (Nesterov momentum 0.9, weight decay 5e-4).

    With `variant.first_layer_sgd_lr`, the TrAct layer's parameters go to their own `torch.optim.SGD`
    (momentum 0.9, weight decay 5e-4) and the rest to the setting's optimizer (the paper's ablation).

    Returns:
        `list[torch.optim.Optimizer]`: one or two optimizers, each stepped every step.
    """
    params = list(model.parameters())
    optimizers = []
    if variant.first_layer_sgd_lr is not None:
        first = {id(p) for layer in tract_layers(model).values() for p in layer.parameters()}
        optimizers.append(torch.optim.SGD([p for p in params if id(p) in first], lr=variant.first_layer_sgd_lr,
                                          momentum=0.9, weight_decay=5e-4))
        params = [p for p in params if id(p) not in first]
    if setting.optimizer == "adam":
        optimizers.insert(0, torch.optim.AdamW(params, lr=lr, weight_decay=0.05))
    else:
        optimizers.insert(0, torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    return optimizers


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `WARMUP_FRACTION` of the steps, then cosine decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Top-1 accuracy and mean cross entropy of `model` (eval mode) on preprocessed `inputs`.

    Returns:
        `tuple[float, float]`: accuracy, loss.
    """
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(inputs), batch_size):
        logits = model(pixel_values=inputs[start : start + batch_size]).logits.float()
        target = labels[start : start + batch_size]
        correct += (logits.argmax(-1) == target).sum().item()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
    model.train()
    return correct / len(inputs), loss / len(inputs)


@dataclasses.dataclass
class EvalSets:
    """Preprocessed evaluation inputs of a setting (fixed contrast / brightness draw for `"contrast"`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor


def eval_sets(data: Data, inputs: str, n_train_eval: int) -> EvalSets:
    """The training-loss slice (first `n_train_eval` training images, un-augmented), validation and test inputs."""
    generator = torch.Generator().manual_seed(12345)
    return EvalSets(
        train_x=preprocess(data.train_x[:n_train_eval], inputs, data, generator),
        train_y=data.train_y[:n_train_eval],
        val_x=preprocess(data.val_x, inputs, data, generator),
        test_x=preprocess(data.test_x, inputs, data, generator),
    )


def train_run(
    setting: Setting,
    preset: Preset,
    data: Data,
    evals: EvalSets,
    lr: float,
    variant: Variant,
    epochs: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Trains one model for `epochs` epochs with its own cosine schedule and evaluates it.

    Args:
        variant (`Variant`): plain, hf_tract, official, ... (see [`Variant`]).
        evals (`EvalSets`): preprocessed training-loss slice, validation and test inputs.

    Returns:
        `dict`: the run's record: training loss (fixed slice, eval mode), validation and test accuracy and
        loss, training wall time (evaluation excluded), the first per-step minibatch losses, whether the
        loss became non-finite.
    """
    model = apply_variant(build_model(setting, preset, seed).to(device), variant)
    model.train()
    optimizers = make_optimizers(setting, model, lr, variant)
    steps_per_epoch = len(data.train_x) // preset.batch_size
    schedulers = [cosine_with_warmup(opt, epochs * steps_per_epoch) for opt in optimizers]
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1000)
    first_losses: list[float] = []
    diverged = False
    harness.sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data.train_x), generator=order_gen).to(device)
        for step in range(steps_per_epoch):
            idx = perm[step * preset.batch_size : (step + 1) * preset.batch_size]
            images = augment(data.train_x[idx], preset.crop_pad, preset.hflip, aug_gen)
            x = preprocess(images, setting.inputs, data, aug_gen)
            loss = F.cross_entropy(model(pixel_values=x).logits, data.train_y[idx])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, scheduler in zip(optimizers, schedulers):
                opt.step()
                scheduler.step()
            if len(first_losses) < FIRST_STEPS_LOGGED:
                first_losses.append(loss.item())
        if not math.isfinite(loss.item()):
            diverged = True
            break
    harness.sync(device)
    wall = time.perf_counter() - start
    train_acc, train_loss = evaluate(model, evals.train_x, evals.train_y)
    val_acc, val_loss = evaluate(model, evals.val_x, data.val_y)
    test_acc, test_loss = evaluate(model, evals.test_x, data.test_y)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_seconds": wall,
        "steps": epochs * steps_per_epoch,
        "final_batch_loss": loss.item(),
        "first_losses": first_losses,
        "diverged": diverged,
    }


def measure_step_times(
    setting: Setting, preset: Preset, data: Data, lr: float, device: torch.device, variants: list[Variant]
) -> dict[str, Any]:
    """Per-step training time of plain and TrAct models, measured interleaved in this process.

    All `variants` (same initialisation) take turns: every round each variant runs `preset.timing_steps`
    steps on the same batches, in a rotated order. The median over rounds of the per-step time is kept, so
    machine load that comes and goes hits every variant alike.

    Returns:
        `dict`: `seconds_per_step` per variant name, `ratio` (variant / plain) per TrAct variant, keyed by
        its lambda for the main hf_tract variants (`"0.1"`) and by its name for the others, and the raw
        per-round times.
    """
    models = {}
    for variant in variants:
        model = apply_variant(build_model(setting, preset, 0).to(device), variant)
        models[variant.name] = (model, make_optimizers(setting, model, lr, variant))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(preset.timing_steps):
        idx = torch.randint(len(data.train_x), (preset.batch_size,), generator=gen).to(device)
        images = augment(data.train_x[idx], preset.crop_pad, preset.hflip, gen)
        batches.append((preprocess(images, setting.inputs, data, gen), data.train_y[idx]))

    def run_steps(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> float:
        harness.sync(device)
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
        harness.sync(device)
        return (time.perf_counter() - start) / len(batches)

    names = list(models)
    for name in names:  # warm-up
        run_steps(*models[name])
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(preset.timing_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_round[name].append(run_steps(*models[name]))
    seconds = {name: statistics.median(times) for name, times in per_round.items()}
    ratio = {}
    for variant in variants:
        if variant.lambda_ is not None:
            key = str(variant.lambda_) if variant.name == f"tract_{variant.lambda_}" else variant.name
            ratio[key] = seconds[variant.name] / seconds["plain"]
    return {"seconds_per_step": seconds, "ratio": ratio, "per_round": per_round}


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
    _timing_overrides(preset, args)
    return preset


def _timing_overrides(preset: Preset, args: argparse.Namespace) -> None:
    if args.timing_rounds is not None:
        preset.timing_rounds = args.timing_rounds
    if args.timing_steps is not None:
        preset.timing_steps = args.timing_steps


PHASES = ("main", "fidelity", "ablations", "late")


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
    in_main = {(name, v, epochs, seed) for name, v, epochs, seed in main}
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


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the protocol for every setting of the preset, rewriting the results file after every run."""
    preset = preset_from_args(args)
    device = torch.device(args.device)
    harness.set_cpu_threads(device, args.threads)
    data_dir = find_data_dir(args.data_dir)
    data = load_fashion_mnist(data_dir, preset, device)
    out = Path(args.output)
    augmentation = []
    if preset.crop_pad:
        augmentation.append(f"random crop 28x28 of the {preset.crop_pad}-px zero-padded image")
    if preset.hflip:
        augmentation.append("random horizontal flip (p = 1/2)")
    result: dict[str, Any] = {
        "mode": args.mode,
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
        if previous.get("note") and not args.note:
            result["note"] = previous["note"]
    done = {r["key"]: r for r in result["runs"]}
    start = time.perf_counter()
    evals = {name: eval_sets(data, Setting.from_name(name).inputs, preset.n_train_eval) for name in preset.settings}

    def record(name: str, variant: Variant, lr: float, epochs: int, seed: int) -> dict[str, Any]:
        """Runs (or, when already in the results, looks up) one training run and saves the results."""
        key = run_key(name, variant.name, epochs, seed, lr)
        if key in done:
            return done[key]
        rec = {"key": key, "setting": name, "variant": variant.name, "lambda": variant.lambda_, "lr": lr}
        rec.update(implementation=variant.implementation, solve_dtype=variant.solve_dtype,
                   first_layer_sgd_lr=variant.first_layer_sgd_lr, epochs=epochs, seed=seed)
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
        if name not in result["lr_choice"]:
            grid = LR_GRIDS[setting.optimizer]
            scores = {lr: record(name, PLAIN, lr, preset.lr_budget, preset.seeds[0])["val_acc"] for lr in grid}
            best = max(grid, key=lambda lr: scores[lr])
            result["lr_choice"][name] = {
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
            record(name, variant, result["lr_choice"][name]["lr"], epochs, seed)
    result["environment"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["wall_seconds_total"] = time.perf_counter() - start
    harness.save_json(result, out)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--plots-dir", default=str(PLOTS_DIR), help="folder for the PNG plots")
    parser.add_argument("--note", default="", help="free text stored in the results (e.g. machine load)")
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
    args.output = args.output or str(RESULTS_DIR / f"convergence_{args.mode}.json")
    return args


def remeasure_step_times(result_path: Path, args: argparse.Namespace) -> Path:
    """Per-step time ratios of an existing results file's settings, measured again with the current code.

    The accuracy runs stay as they were; only the cost side of the wall-clock ratio is re-measured (e.g.
    after a change that makes TrAct's step cheaper). Writes `<result>_step_times.json` and returns its path.
    """
    previous = json.loads(result_path.read_text())
    preset = dataclasses.replace(PRESETS[previous["mode"]])
    _timing_overrides(preset, args)
    device = torch.device(args.device)
    harness.set_cpu_threads(device, args.threads)
    data = load_fashion_mnist(find_data_dir(args.data_dir), preset, device)
    out = {"source": str(result_path), "environment": harness.environment(device), "note": args.note, "step_times": {}}
    for name, choice in previous["lr_choice"].items():
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


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or, with `--report`, only the table and plots) and prints the written paths."""
    args = parse_args(argv)
    if args.remeasure_step_times:
        paths = [str(remeasure_step_times(Path(args.remeasure_step_times), args))]
    elif args.report:
        paths = convergence_report.write_report(Path(args.report), Path(args.plots_dir))
    elif args.adopt_step_times:
        adopt_step_times(Path(args.adopt_step_times), Path(args.output))
        paths = [args.output, *convergence_report.write_report(Path(args.output), Path(args.plots_dir))]
    elif args.merge:
        merge_results(Path(args.merge), Path(args.output), args.note)
        paths = [args.output, *convergence_report.write_report(Path(args.output), Path(args.plots_dir))]
    else:
        run_benchmark(args)
        paths = [args.output, *convergence_report.write_report(Path(args.output), Path(args.plots_dir))]
    print("\n".join(paths))


if __name__ == "__main__":
    main()
