"""Top-k accuracy as an `evaluate` metric module that loads offline.

`evaluate.load("accuracy")` fetches its script from the Hub and has no top-5; the TrAct paper reports
top-1 and top-5. This file is a self-contained `evaluate` module: `evaluate.load(<this file or its
folder>)` works without network access.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference class is among the k highest-scoring classes.
Predictions are per-class scores (logits or probabilities, shape (N, C)); with class ids (shape (N,))
only top-1 accuracy is defined. An example counts as correct for k when fewer than k classes score
strictly higher than its reference class, so ties are resolved in favour of the reference (as for any
threshold-based ranking metric, this only matters for exactly equal scores).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]` or `list[int]`): Per-class scores of shape (N, C), or predicted
        class ids of shape (N,).
    references (`list[int]`): Reference class ids, shape (N,).
    top_k (`int` or `tuple[int]`, defaults to `(1, 5)`): The k values to report. With class-id predictions
        only k=1 is allowed.
    sample_weight (`list[float]`, *optional*): Per-example weights; defaults to uniform.

Returns:
    `dict[str, float]`: `top{k}_accuracy` for every requested k, each in [0, 1].

Examples:

    >>> import evaluate
    >>> from hf_tract.metrics import TOP_K_ACCURACY_PATH
    >>> metric = evaluate.load(TOP_K_ACCURACY_PATH)
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[2, 2], top_k=(1, 2))
    {'top1_accuracy': 0.0, 'top2_accuracy': 1.0}
"""

_CITATION = """
@inproceedings{petersen2024tract,
  title = {TrAct: Making First-layer Pre-Activations Trainable},
  author = {Petersen, Felix and Borgelt, Christian and Ermon, Stefano},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year = {2024},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    """Top-k classification accuracy from per-class scores (or top-1 from class ids)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first format that matches the first batch it is given.
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
            reference_urls=["https://arxiv.org/abs/2410.23970"],
        )

    def _compute(self, predictions, references, top_k=(1, 5), sample_weight=None) -> dict[str, float]:
        ks = (top_k,) if isinstance(top_k, int) else tuple(top_k)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"top_k must be positive integers, got {top_k!r}")
        references = np.asarray(references, dtype=np.int64)
        predictions = np.asarray(predictions)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(references) == 0:
            raise ValueError("top-k accuracy of an empty set is undefined")

        if predictions.ndim == 1:
            if any(int(k) != 1 for k in ks):
                raise ValueError(
                    "predictions are class ids, so only top_k=1 is defined; pass per-class scores "
                    "(e.g. the logits) for top-5."
                )
            correct = {1: predictions.astype(np.int64) == references}
        else:
            if references.min() < 0 or references.max() >= predictions.shape[1]:
                raise ValueError(f"references must be class ids in [0, {predictions.shape[1]})")
            scores = predictions.astype(np.float64)
            reference_scores = scores[np.arange(len(references)), references]
            # Rank of the reference class = number of classes that score strictly higher.
            rank = (scores > reference_scores[:, None]).sum(axis=1)
            correct = {int(k): rank < int(k) for k in ks}

        total = weights.sum()
        return {f"top{int(k)}_accuracy": float((correct[int(k)] * weights).sum() / total) for k in ks}


__all__ = ["TopKAccuracy"]
