"""What the fine-tuning benchmark runs: transfers, label budgets, step budgets, grids, lambdas, seeds."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.convergence.presets import PRESETS as CONVERGENCE_PRESETS
from benchmarks.convergence.presets import SMALL_RESNET, SMALL_VIT


__all__ = ["ALL", "PRESETS", "FinetunePreset", "Transfer"]

ALL = 0  # label budget: every training image of the target task (after the validation split)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A source task (pretraining) and a target task (fine-tuning) with its label budgets.

    Args:
        source (`str`): `"fmnist04"` (Fashion-MNIST classes 0-4) or `"mnist"` (the ten digits).
        target (`str`): `"fmnist59"` (Fashion-MNIST classes 5-9, relabelled 0-4) or `"fmnist"` (all ten classes).
        labels (`tuple[int, ...]`): training images of the target task per cell (`ALL`: all of them).
    """

    source: str
    target: str
    labels: tuple[int, ...]

    @property
    def name(self) -> str:
        """E.g. `"fmnist04->fmnist59"`."""
        return f"{self.source}->{self.target}"


@dataclasses.dataclass
class FinetunePreset:
    """Everything a mode fixes.

    Args:
        archs (`list[str]`): `"vit"` / `"resnet"`, in run order.
        models (`dict[str, dict]`): config keyword arguments per architecture.
        optimizers (`dict[str, str]`): optimizer per architecture (`"adam"` / `"sgd"`, as in the convergence benchmark).
        pretrain_lr (`dict[str, float]`): pretraining learning rate per architecture (the plain choice of cpu-full).
        pretrain_epochs (`int`): pretraining epochs (plain, one run, seed 0).
        pretrain_n (`int`): pretraining images (`ALL`: the whole source training set).
        transfers (`list[Transfer]`): the transfers and their label budgets.
        n_val (`int`): validation images of the target task (learning-rate choice only).
        n_test (`int`): test images of the target task (`ALL`: all).
        n_train_eval (`int`): the training loss is measured on the first `min(n_train_eval, labels)` training images.
        min_steps (`int`), min_epochs (`int`): fine-tuning length, `max(min_steps, min_epochs * steps per epoch)`.
        batch_size (`int`): batch size of pretraining and fine-tuning.
        lr_grids (`dict[str, list[float]]`): fine-tuning learning rates tried for plain, per optimizer.
        lambdas (`list[float]`): TrAct lambdas.
        seeds (`list[int]`): fine-tuning seeds (head initialisation, data order, augmentation draws).
        crop_pad (`int`): random-crop padding of the training batches (Fashion-MNIST and MNIST).
    """

    archs: list[str]
    models: dict[str, dict[str, Any]]
    optimizers: dict[str, str]
    pretrain_lr: dict[str, float]
    pretrain_epochs: int
    pretrain_n: int
    transfers: list[Transfer]
    n_val: int
    n_test: int
    n_train_eval: int
    min_steps: int
    min_epochs: int
    batch_size: int
    lr_grids: dict[str, list[float]]
    lambdas: list[float]
    seeds: list[int]
    crop_pad: int = 2


_CPU_FULL = CONVERGENCE_PRESETS["cpu-full"]

PRESETS: dict[str, FinetunePreset] = {
    "smoke": FinetunePreset(
        archs=["vit", "resnet"], models={"vit": SMALL_VIT, "resnet": SMALL_RESNET}, optimizers={"vit": "adam", "resnet": "sgd"},
        pretrain_lr={"vit": 1e-3, "resnet": 0.1}, pretrain_epochs=1, pretrain_n=256,
        transfers=[Transfer("fmnist04", "fmnist59", (64,)), Transfer("mnist", "fmnist", (64,))],
        n_val=64, n_test=128, n_train_eval=64, min_steps=4, min_epochs=1, batch_size=32,
        lr_grids={"adam": [3e-4, 1e-3], "sgd": [0.03]}, lambdas=[0.1], seeds=[0, 1],
    ),
    # Sized for one core of the shared 2-core CPU: ~0.1 s per step, ~200-450 steps per fine-tuning run.
    "cpu": FinetunePreset(
        archs=["vit", "resnet"], models={"vit": _CPU_FULL.vit, "resnet": _CPU_FULL.resnet},
        optimizers={"vit": "adam", "resnet": "sgd"}, pretrain_lr={"vit": 1e-3, "resnet": 0.3},
        pretrain_epochs=3, pretrain_n=30_000,
        transfers=[Transfer("fmnist04", "fmnist59", (500, 2_000, ALL)), Transfer("mnist", "fmnist", (2_000,))],
        n_val=2_000, n_test=ALL, n_train_eval=5_000, min_steps=200, min_epochs=2, batch_size=128,
        # Widened by one point up after the first pass chose the top of the grid in all 8 cells (the earlier
        # choices and their runs stay in the results file, see the report).
        lr_grids={"adam": [1e-4, 3e-4, 1e-3, 3e-3], "sgd": [0.01, 0.03, 0.1, 0.3]}, lambdas=[0.1, 1.0], seeds=[0, 1, 2],
    ),
}
