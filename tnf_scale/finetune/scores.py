"""The standard GLUE metrics on predictions: accuracy, F1 (positive class 1), Matthews correlation, Pearson and
Spearman correlation. Small numpy formulas; no metric library is a dependency."""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
REGRESSION_METRICS = ("pearson", "spearman")


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    true_pos = float(np.sum((predictions == 1) & (labels == 1)))
    predicted, actual = float(np.sum(predictions == 1)), float(np.sum(labels == 1))
    return 0.0 if true_pos == 0 else 2 * true_pos / (predicted + actual)


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (binary or multi-class, Gorodkin's R_K); 0 when either side is constant."""
    classes = np.union1d(predictions, labels)
    confusion = np.array(
        [[np.sum((labels == t) & (predictions == p)) for p in classes] for t in classes], dtype=np.float64
    )
    n, correct = confusion.sum(), np.trace(confusion)
    true_totals, pred_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = np.sqrt((n**2 - pred_totals @ pred_totals) * (n**2 - true_totals @ true_totals))
    return 0.0 if denominator == 0 else float((correct * n - pred_totals @ true_totals) / denominator)


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    x, y = predictions.astype(np.float64) - predictions.mean(), labels.astype(np.float64) - labels.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denominator == 0 else float(x @ y / denominator)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values), dtype=np.float64)
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return pearson(ranks(predictions), ranks(labels))


def score(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """`metric` (one of METRICS) of predictions against labels."""
    return {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}[metric](
        predictions, labels
    )
