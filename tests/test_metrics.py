"""The top-k accuracy metric shipped as an evaluate module (hf_tract.metrics): offline loading, known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def reference_top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Top-k by sorting (no ties in random float logits)."""
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean([label in row for label, row in zip(labels, top)]))


@pytest.mark.parametrize("load_from", ["folder", "file", "helper"])
def test_top_k_metric_loads_offline_and_matches_reference(load_from, monkeypatch):
    import evaluate

    from hf_tract.metrics import TOP_K_ACCURACY_PATH, load_top_k_accuracy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if load_from == "helper":
        metric = load_top_k_accuracy()
    elif load_from == "file":
        metric = evaluate.load(str(Path(TOP_K_ACCURACY_PATH) / "top_k_accuracy.py"))
    else:
        metric = evaluate.load(TOP_K_ACCURACY_PATH)

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=300)
    # Batches added one by one give the same result as one compute (as during a Trainer evaluation).
    for start in range(0, 300, 128):
        metric.add_batch(predictions=logits[start : start + 128], references=labels[start : start + 128])
    result = metric.compute(top_k=(1, 3, 5))
    for k in (1, 3, 5):
        assert result[f"top{k}_accuracy"] == pytest.approx(reference_top_k(logits, labels, k))


def test_top_k_metric_known_values_and_class_ids():
    from hf_tract.metrics import load_top_k_accuracy

    metric = load_top_k_accuracy()
    scores = [[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]]
    assert metric.compute(predictions=scores, references=[2, 2, 2], top_k=(1, 2, 3)) == {
        "top1_accuracy": pytest.approx(1 / 3),
        "top2_accuracy": pytest.approx(1.0),
        "top3_accuracy": pytest.approx(1.0),
    }
    # Weighted: the only wrong example (first) carries half the weight.
    assert metric.compute(
        predictions=scores, references=[2, 2, 2], top_k=1, sample_weight=[2, 1, 1]
    ) == {"top1_accuracy": pytest.approx(0.25)}
    assert metric.compute(predictions=[1, 2, 2, 0], references=[1, 2, 0, 0], top_k=1) == {"top1_accuracy": 0.75}
    with pytest.raises(ValueError, match="only top_k=1"):
        metric.compute(predictions=[1, 2], references=[1, 2])
