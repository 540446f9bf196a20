"""hf_tract: TrAct (NeurIPS 2024) for Hugging Face vision models.

TrAct changes only how the first layer of a vision model is trained: the weight gradient of that
layer is right-multiplied by `(A^T A / N + lambda I)^-1`, `A` being the input patches of the batch.
Forward pass, inference cost and saved weights are those of the plain model.

Importing this package imports torch and nothing else heavy; the Trainer glue (which imports
transformers' Trainer) is loaded on first access.
"""

from .config import TrActConfig
from .patching import apply_tract, is_tract_applied, remove_tract, tract_config_of, tract_layers
from .targets import find_first_layer, find_first_layers
from .whitening import whiten_first_layer


__version__ = "0.1.0"

_LAZY = {
    "TrActTrainer": "trainer",
    "TrActTrainingArguments": "training_args",
    "TrActCallback": "trainer",
    "tract_model_init": "trainer",
    "create_or_update_model_card": "hub",
}

__all__ = [
    "TrActConfig",
    "apply_tract",
    "remove_tract",
    "is_tract_applied",
    "tract_layers",
    "tract_config_of",
    "find_first_layer",
    "find_first_layers",
    "whiten_first_layer",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
