"""Metrics shipped with hf_tract as `evaluate` modules, so that they load without the Hub."""

from __future__ import annotations

from pathlib import Path


TOP_K_ACCURACY_PATH = str(Path(__file__).resolve().parent / "top_k_accuracy")
"""Folder of the top-k accuracy module; `evaluate.load(TOP_K_ACCURACY_PATH)` works offline."""


def load_top_k_accuracy(**kwargs):
    """Load the top-k (top-1 / top-5) accuracy metric shipped with hf_tract, without network access.

    Args:
        **kwargs: Passed to `evaluate.load` (e.g. `experiment_id`, `num_process`, `process_id` for
            distributed evaluation).

    Returns:
        `evaluate.EvaluationModule`: call `.compute(predictions=logits, references=labels)` to get
        `{"top1_accuracy": ..., "top5_accuracy": ...}`.

    Example:

    ```python
    >>> from hf_tract.metrics import load_top_k_accuracy
    >>> metric = load_top_k_accuracy()
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=1)
    {'top1_accuracy': 0.5}
    ```
    """
    import evaluate

    return evaluate.load(TOP_K_ACCURACY_PATH, **kwargs)


__all__ = ["TOP_K_ACCURACY_PATH", "load_top_k_accuracy"]
