"""What a run of the convergence benchmark is: settings, variants (each a `TrActConfig`) and presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hf_tract import TrActConfig


ARCHS = ("vit", "resnet")
OPTIMIZERS = ("adam", "sgd", "muon")
INPUTS = ("std", "unit", "raw255", "contrast")
# "muon": torch.optim.Muon for the hidden 2-D weights, AdamW (weight decay 0.05) for the rest; the grid is
# Muon's learning rate, the AdamW part keeps 1e-3 (the plain AdamW choice of cpu-full).
LR_GRIDS = {"adam": (3e-4, 1e-3, 3e-3), "sgd": (0.03, 0.1, 0.3), "muon": (0.01, 0.02, 0.05)}
FIRST_LAYER_INITS = ("default", "whiten", "whiten_frozen")

__all__ = [
    "ARCHS",
    "FIRST_LAYER_INITS",
    "INPUTS",
    "LR_GRIDS",
    "OPTIMIZERS",
    "PLAIN",
    "PRESETS",
    "RESULT_NAMES",
    "SMALL_RESNET",
    "SMALL_VIT",
    "Preset",
    "Setting",
    "Variant",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark setting: architecture, optimizer and input preprocessing.

    Args:
        arch (`str`): `"vit"` or `"resnet"`.
        optimizer (`str`): `"adam"` (AdamW), `"sgd"` (SGD with Nesterov momentum) or `"muon"` (Muon for the
            hidden 2-D weights, AdamW for the rest).
        inputs (`str`): `"std"`, `"unit"`, `"raw255"` or `"contrast"` (see [`data.preprocess`]).
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
        tract (`TrActConfig`, *optional*): the TrAct options of the first layer; `None` for plain training.
        implementation (`str`): `"hf_tract"` or `"official"` (`torch_tract.TrAct` with `tract.lambda_`,
            fidelity runs only).
        first_layer_sgd_lr (`float`, *optional*): train the first layer with SGD (momentum 0.9) at this
            learning rate while the rest keeps the setting's optimizer (through `hf_tract.optim`).
        first_layer_init (`str`): `"default"` (the model's own initialisation), `"whiten"` (patch whitening of
            the training images, see `hf_tract.whiten_first_layer`) or `"whiten_frozen"` (the same, then the
            weight is frozen; the bias trains, as in airbench).
        first_layer_lr (`float`, *optional*): the TrAct layer in its own group of the setting's optimizer at this
            learning rate (what `TrActTrainingArguments(tract_learning_rate=...)` does).
    """

    tract: TrActConfig | None = None
    implementation: str = "hf_tract"
    first_layer_sgd_lr: float | None = None
    first_layer_init: str = "default"
    first_layer_lr: float | None = None

    def __post_init__(self):
        if self.first_layer_init not in FIRST_LAYER_INITS:
            raise ValueError(f"first_layer_init must be one of {FIRST_LAYER_INITS}, got {self.first_layer_init!r}")
        if self.tract is None and (
            self.implementation != "hf_tract" or self.first_layer_sgd_lr is not None or self.first_layer_lr is not None
        ):
            raise ValueError("the official implementation and the first-layer optimizer variants need a TrAct config")
        if self.first_layer_sgd_lr is not None and self.first_layer_lr is not None:
            raise ValueError("first_layer_sgd_lr and first_layer_lr are two different variants; give one")

    @classmethod
    def with_tract(cls, lambda_: float, **kwargs: Any) -> Variant:
        """A TrAct variant with `TrActConfig(lambda_=lambda_, solve_dtype=...)`; `kwargs` other than
        `solve_dtype` are `Variant` fields."""
        solve_dtype = kwargs.pop("solve_dtype", None)
        return cls(TrActConfig(lambda_=lambda_, solve_dtype=solve_dtype), **kwargs)

    @property
    def lambda_(self) -> float | None:
        """TrAct's lambda, `None` for plain training."""
        return None if self.tract is None else self.tract.lambda_

    @property
    def solve_dtype(self) -> str | None:
        """`"float64"` when the variant forces hf_tract's float64 solve (fidelity reference), else `None`."""
        return "float64" if self.tract is not None and self.tract.solve_dtype == torch.float64 else None

    @property
    def name(self) -> str:
        """`"plain"`, `"tract_0.1"`, `"tract_0.1_sgd1"`, `"tract_0.1_f64"`, `"official_0.1"`, `"plain_whiten"`, ..."""
        if self.tract is None:
            name = "plain"
        else:
            name = f"{'official' if self.implementation == 'official' else 'tract'}_{self.lambda_}"
            if self.solve_dtype == "float64":
                name += "_f64"
            if self.first_layer_sgd_lr is not None:
                name += "_sgd1"
            if self.first_layer_lr is not None:
                name += f"_lr1st{self.first_layer_lr:g}"
        if self.first_layer_init != "default":
            name += f"_{self.first_layer_init}"
        return name

    def record(self) -> dict[str, Any]:
        """The variant's fields as stored in every run of the results file."""
        return {
            "variant": self.name,
            "lambda": self.lambda_,
            "implementation": self.implementation,
            "solve_dtype": self.solve_dtype,
            "first_layer_sgd_lr": self.first_layer_sgd_lr,
            "first_layer_init": self.first_layer_init,
            "first_layer_lr": self.first_layer_lr,
            "tract_config": None if self.tract is None else self.tract.to_dict(),
        }


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
        first_layer_inits (`list[str]`): first-layer initialisations of the main comparison besides the
            default (e.g. `["whiten", "whiten_frozen"]`): each runs plain and with every main lambda
            (a frozen weight only plain: TrAct changes the weight's gradient, nothing else).
        own_lr_inits (`list[str]`): first-layer initialisations that get their own learning-rate search (the
            plain model with that initialisation, same grid, budget and seed; its TrAct variants reuse the
            choice, as those of the default initialisation reuse the plain model's). Others use the setting's.
        first_layer_lrs (`list[float]`): the main comparison also runs TrAct (every main lambda) with the first
            layer in its own group at each of these learning rates (`Variant.first_layer_lr`).
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
    first_layer_inits: list[str] = dataclasses.field(default_factory=list)
    own_lr_inits: list[str] = dataclasses.field(default_factory=list)
    first_layer_lrs: list[float] = dataclasses.field(default_factory=list)

    def lambdas_for(self, setting: str) -> list[float]:
        """TrAct lambdas of the main comparison for `setting`."""
        return self.setting_lambdas.get(setting, self.lambdas)

    def main_variants(self, setting: str) -> list[Variant]:
        """Plain and one hf_tract variant per main lambda (and per first-layer learning rate), for the default and
        every extra first-layer init."""
        variants = [PLAIN, *(Variant.with_tract(lam) for lam in self.lambdas_for(setting))]
        variants += [Variant.with_tract(lam, first_layer_lr=lr) for lr in self.first_layer_lrs for lam in self.lambdas_for(setting)]
        for init in self.first_layer_inits:
            variants.append(Variant(first_layer_init=init))
            if init != "whiten_frozen":
                variants += [Variant.with_tract(lam, first_layer_init=init) for lam in self.lambdas_for(setting)]
        return variants

    def ablation_variants(self, setting: str) -> list[Variant]:
        """The ablation variants of `setting` (empty when it is not an ablation setting)."""
        if setting not in self.ablation_settings:
            return []
        variants = [Variant.with_tract(lam) for lam in self.ablation_lambdas if lam not in self.lambdas_for(setting)]
        if self.ablation_sgd_first_layer_lr is not None and Setting.from_name(setting).optimizer == "adam":
            variants.append(Variant.with_tract(self.lambdas_for(setting)[0], first_layer_sgd_lr=self.ablation_sgd_first_layer_lr))
        return variants

    def fidelity_variants(self, setting: str, seed: int) -> list[Variant]:
        """hf_tract, official torch-tract and (for `fidelity_f64_seeds`) hf_tract's float64 solve, first main lambda."""
        if setting not in self.fidelity_settings:
            return []
        lam = self.lambdas_for(setting)[0]
        variants = [PLAIN, Variant.with_tract(lam), Variant.with_tract(lam, implementation="official")]
        if self.fidelity_f64_seeds is None or seed in self.fidelity_f64_seeds:
            variants.append(Variant.with_tract(lam, solve_dtype=torch.float64))
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
        settings=[f"{a}-{o}-{i}" for a in ARCHS for o in ("adam", "sgd") for i in INPUTS],
        lr_budget=4, batch_size=256,
        vit={"patch_size": 4, "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 384},
        resnet={"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2], "layer_type": "basic"},
        timing_rounds=10, timing_steps=20,
    ),
}


# Issue 17, item 2: the cpu-full protocol (data, augmentation, seeds, models) at budgets 2 and 8 for the ViT,
# (a) with Muon for the hidden matrices (its learning rate chosen for plain Muon), (b) with the patch-whitening
# initialisation of the first layer, frozen and trainable. `--reuse-runs` takes the plain / TrAct runs that
# cpu-full already made (runs are deterministic per seed on CPU) instead of training them again.
_CPU_FULL_SUBSET = dict(budgets=[2, 8], late_budgets={}, ablation_settings=[], fidelity_settings=[], fidelity_seeds=[])
PRESETS["cpu-full-muon"] = dataclasses.replace(PRESETS["cpu-full"], settings=["vit-muon-std"], **_CPU_FULL_SUBSET)
PRESETS["cpu-full-whitening"] = dataclasses.replace(
    PRESETS["cpu-full"], settings=["vit-adam-std"], first_layer_inits=["whiten", "whiten_frozen"], **_CPU_FULL_SUBSET
)
# (c) the same whitening comparison with each whitened initialisation's own learning rate (chosen for its plain
# model), so that a negative result is not the learning rate's.
PRESETS["cpu-full-whitening-own-lr"] = dataclasses.replace(
    PRESETS["cpu-full-whitening"], own_lr_inits=["whiten", "whiten_frozen"]
)
# (d) at the plain model's learning rate of the extended AdamW grid (1e-2, where TrAct fell behind plain), TrAct with
# the first layer at the 3-point grid's 1e-3 (`tract_learning_rate`). Run with `--lr-grid 0.0003,0.001,0.003,0.01
# --reuse-runs benchmarks/results/whitening_cpu-full_own_lr.json`: the choice and the plain / TrAct runs come from there.
PRESETS["cpu-full-first-layer-lr"] = dataclasses.replace(
    PRESETS["cpu-full"], settings=["vit-adam-std"], first_layer_lrs=[1e-3], **dict(_CPU_FULL_SUBSET, budgets=[2, 8, 16])
)
# Where a mode's results go by default, when not `convergence_<mode>.json`.
RESULT_NAMES = {
    "cpu-full-muon": "muon_cpu-full",
    "cpu-full-whitening": "whitening_cpu-full",
    "cpu-full-whitening-own-lr": "whitening_cpu-full_own_lr",
    "cpu-full-first-layer-lr": "first_layer_lr_cpu-full",
}
