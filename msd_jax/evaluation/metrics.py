"""Classification metrics on host numpy arrays (accuracy, ROC-AUC) plus the
input checks shared by the kNN / linear probes."""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "roc_auc"]


# ---------------------------------------------------------------------------
# Input validation (shared with knn.py / linear.py)
# ---------------------------------------------------------------------------

def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def _check_features(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_examples, feature_dim], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has feature dim {x.shape[1]}, expected {dim} (the train feature dim)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _check_labels(labels, name: str, num_examples: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [num_examples], got shape {labels.shape}")
    if labels.shape[0] != num_examples:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries, expected {num_examples} "
            f"(one per feature row)")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) or labels.dtype == bool):
            raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{name} must be integer class ids, got non-integer values")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), "
            f"got values in [{labels.min()}, {labels.max()}]")
    return labels


def check_probe_inputs(train_features, train_labels, test_features, num_classes):
    """A probe's inputs checked and converted: (train_features [N, D] float, train_labels [N] int,
    test_features [M, D] float, num_classes), with N >= 1."""
    num_classes = _check_num_classes(num_classes)
    train_features = _check_features(train_features, "train_features")
    if train_features.shape[0] == 0:
        raise ValueError("train_features must have at least one row, got 0")
    test_features = _check_features(test_features, "test_features", train_features.shape[1])
    train_labels = _check_labels(train_labels, "train_labels", train_features.shape[0], num_classes)
    return train_features, train_labels, test_features, num_classes


def _check_probs(probs, labels):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D [N, num_classes], got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or inf values")
    labels = _check_labels(labels, "labels", probs.shape[0], probs.shape[1])
    return probs, labels


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``argmax(probs, axis=1)`` against integer ``labels``.

    probs: [N, C] scores/probabilities; labels: [N] ints in [0, C). Returns nan for N == 0.
    """
    probs, labels = _check_probs(probs, labels)
    if probs.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``; tied values share the mean of their ranks. O(N log N)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)          # last 1-based rank of each tie group
    avg = ends - (counts - 1) / 2.0                      # mean of ranks end-count+1 .. end
    return avg[inverse.reshape(-1)]


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg) with average ranks (ties count 1/2)."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC.

    Binary (C == 2): ROC-AUC of probs[:, 1] vs labels == 1, ties counted 1/2 (Mann-Whitney U via
    ranks with average ranks for ties, O(N log N)). C > 2: macro average of one-vs-rest AUCs over
    classes present in labels with both positives and negatives. Returns nan (not raise) when
    undefined (a single class in labels, or C == 1).
    """
    probs, labels = _check_probs(probs, labels)
    num_classes = probs.shape[1]
    if num_classes < 2 or probs.shape[0] == 0:
        return float("nan")
    if num_classes == 2:
        return _binary_auc(probs[:, 1], labels == 1)
    aucs = []
    for c in np.unique(labels):
        positive = labels == c
        if 0 < np.count_nonzero(positive) < labels.size:
            aucs.append(_binary_auc(probs[:, c], positive))
    if not aucs:
        return float("nan")
    return float(np.mean(aucs))
