"""Confidence intervals of test-set accuracy and ROC-AUC: a seeded percentile bootstrap over test
images, a paired bootstrap of the difference between two predictors scored on the same images, and
DeLong's interval of a binary AUC (a closed-form check of the bootstrap).

A bootstrap resample is a vector of multiplicities w (how often each test image was drawn, summing
to N), so a statistic of a resampled test set is a weighted statistic of the original one: accuracy
is w . correct / N, and the AUC, with ties counted 1/2 as in metrics.roc_auc, is the weighted
Mann-Whitney count sum_pos sum_neg w_i w_j [s_i > s_j] / (W_pos W_neg), computed for all resamples
at once from one sort of the scores. The AUC of a resample holding a single class (binary), or no
class with both positives and negatives (multiclass), is undefined: such resamples are left out of
the AUC's interval and counted."""
from __future__ import annotations

import numpy as np

from msd_jax.evaluation.metrics import _check_probs, accuracy, roc_auc

__all__ = ["bootstrap_weights", "bootstrap_samples", "percentile_interval", "bootstrap_ci",
           "scores_with_intervals", "paired_difference_ci", "delong_auc_ci"]

LEVEL = 0.95
# resamples per chunk: bounds the [chunk, N] weight matrices to a few tens of MB on large test sets
_CHUNK_CELLS = 4_000_000


def bootstrap_weights(num_examples: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_examples] int multiplicities of `resamples` draws of num_examples test images
    with replacement, from a numpy Generator seeded with `seed`: the same seed, size and count give
    the same resamples, so predictors scored with one seed are paired."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num_examples, size=(resamples, num_examples))
    flat = idx + num_examples * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * num_examples).reshape(resamples, num_examples)


def _weighted_binary_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] AUC of `scores` [N] for `positive` [N] bool under each row of `weights` [B, N]; nan where a
    row has no positive or no negative weight."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # last sorted position of each run of tied scores
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    w = weights[:, order].astype(np.float64)
    is_pos = positive[order]

    def per_group(x):  # [B, N] in score order -> [B, groups]: the sum over each tie group
        at_ends = np.cumsum(x, axis=1)[:, ends]
        return np.diff(at_ends, axis=1, prepend=0.0)
    pos = per_group(np.where(is_pos, w, 0.0))
    neg = per_group(np.where(is_pos, 0.0, w))
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    w_pos, w_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((w_pos > 0) & (w_neg > 0), wins / (w_pos * w_neg), np.nan)


def _weighted_auc(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] metrics.roc_auc of each resample: binary AUC of probs[:, 1], or the mean one-vs-rest AUC
    over the classes with both positives and negatives in the resample."""
    num_classes = probs.shape[1]
    if num_classes < 2:
        return np.full(weights.shape[0], np.nan)
    if num_classes == 2:
        return _weighted_binary_auc(probs[:, 1], labels == 1, weights)
    per_class = [_weighted_binary_auc(probs[:, c], labels == c, weights)
                 for c in np.unique(labels)]
    per_class = np.stack(per_class, axis=1)                   # [B, classes present in the test set]
    counted = np.isfinite(per_class)
    total = np.where(counted, per_class, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted.any(axis=1), total / counted.sum(axis=1), np.nan)


def bootstrap_samples(probs, labels, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """{'accuracy': [resamples], 'auc': [resamples]}: the metrics.accuracy and metrics.roc_auc of
    each bootstrap resample of the test images (seeded, see bootstrap_weights); auc is nan for a
    resample where it is undefined."""
    probs, labels = _check_probs(probs, labels)
    n = probs.shape[0]
    if n == 0:
        return {"accuracy": np.full(resamples, np.nan), "auc": np.full(resamples, np.nan)}
    weights = bootstrap_weights(n, resamples, seed)
    correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    chunk = max(1, _CHUNK_CELLS // n)
    acc, auc = [], []
    for start in range(0, resamples, chunk):
        w = weights[start:start + chunk]
        acc.append(w @ correct / n)
        auc.append(_weighted_auc(probs, labels, w))
    return {"accuracy": np.concatenate(acc), "auc": np.concatenate(auc)}


def percentile_interval(samples, level: float = LEVEL) -> tuple[list[float], int]:
    """([low, high], skipped): the (1 - level) / 2 and (1 + level) / 2 quantiles of the finite
    `samples` (linear interpolation), and how many were not finite (resamples where the statistic is
    undefined). [nan, nan] when none is finite."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    samples = np.asarray(samples, np.float64)
    finite = samples[np.isfinite(samples)]
    skipped = int(samples.size - finite.size)
    if finite.size == 0:
        return [float("nan"), float("nan")], skipped
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)], skipped


def bootstrap_ci(probs, labels, *, resamples: int = 1000, seed: int = 0,
                 level: float = LEVEL) -> dict:
    """Percentile bootstrap intervals over test images: {'accuracy': [low, high], 'auc': [low, high],
    'auc_skipped': resamples left out of the AUC's interval (one class, AUC undefined)}."""
    s = bootstrap_samples(probs, labels, resamples, seed)
    acc, _ = percentile_interval(s["accuracy"], level)
    auc, skipped = percentile_interval(s["auc"], level)
    return {"accuracy": acc, "auc": auc, "auc_skipped": skipped}


def scores_with_intervals(probs, labels, *, resamples: int, seed: int) -> dict:
    """The metric dict of one predictor on the test split: {'accuracy', 'accuracy_ci95', 'auc',
    'auc_ci95'} (point estimates on the whole split, 95% percentile bootstrap intervals), plus
    'auc_ci95_skipped' when some resamples held a single class. resamples == 0: no intervals."""
    out = {"accuracy": accuracy(probs, labels), "auc": roc_auc(probs, labels)}
    if resamples == 0:
        return out
    ci = bootstrap_ci(probs, labels, resamples=resamples, seed=seed, level=0.95)
    out.update(accuracy_ci95=ci["accuracy"], auc_ci95=ci["auc"])
    if ci["auc_skipped"]:
        out["auc_ci95_skipped"] = ci["auc_skipped"]
    return out


def paired_difference_ci(probs_a, probs_b, labels, *, resamples: int = 1000, seed: int = 0,
                         level: float = LEVEL) -> dict:
    """Paired percentile bootstrap of metric(a) - metric(b) for two predictors on the same test images
    (the same resamples for both): {'accuracy': {'difference', 'ci'}, 'auc': {'difference', 'ci',
    'skipped'}}. The interval leaves out the spread that the two predictors share, so it is the one
    that says whether a is better than b on this test split."""
    probs_a, labels_a = _check_probs(probs_a, labels)
    probs_b, _ = _check_probs(probs_b, labels)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"paired_difference_ci: probs_a has shape {probs_a.shape}, probs_b "
                         f"{probs_b.shape}; both predictors must score the same test images")
    sa = bootstrap_samples(probs_a, labels_a, resamples, seed)
    sb = bootstrap_samples(probs_b, labels_a, resamples, seed)
    out = {}
    for metric, fn in (("accuracy", accuracy), ("auc", roc_auc)):
        ci, skipped = percentile_interval(sa[metric] - sb[metric], level)
        out[metric] = {"difference": fn(probs_a, labels_a) - fn(probs_b, labels_a), "ci": ci}
        if metric == "auc":
            out[metric]["skipped"] = skipped
    return out


def delong_auc_ci(scores, positive, level: float = LEVEL) -> dict:
    """DeLong et al. (1988) interval of a binary AUC (ties 1/2), via midranks (Sun & Xu 2014):
    {'auc', 'se', 'ci': [low, high]} with the normal quantile at `level`, clipped to [0, 1]."""
    from statistics import NormalDist  # noqa: PLC0415

    from msd_jax.evaluation.metrics import _average_ranks  # noqa: PLC0415
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(positive, bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"delong_auc_ci: {scores.size} scores for {positive.size} labels")
    x, y = scores[positive], scores[~positive]
    m, n = x.size, y.size
    if m < 2 or n < 2:
        raise ValueError(f"delong_auc_ci needs >= 2 positives and >= 2 negatives, got {m} and {n}")
    rank_all = _average_ranks(np.concatenate([x, y]))
    rank_x, rank_y = _average_ranks(x), _average_ranks(y)
    auc = (rank_all[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v10 = (rank_all[:m] - rank_x) / n          # per positive: share of negatives below it
    v01 = 1.0 - (rank_all[m:] - rank_y) / m    # per negative: share of positives above it
    se = float(np.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n))
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    return {"auc": float(auc), "se": se,
            "ci": [float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))]}


def format_with_ci(metrics: dict, key: str, digits: int = 3) -> str:
    """'0.910 [0.887, 0.932]': metrics[key] with metrics[key + '_ci95'] when present."""
    value = metrics[key]
    text = "-" if value is None else f"{value:.{digits}f}"
    ci = metrics.get(f"{key}_ci95")
    if value is not None and ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text
