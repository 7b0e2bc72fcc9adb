"""Bootstrap and DeLong intervals (msd_jax/evaluation/intervals.py) against float64 numpy references
on explicit resamples, and their coverage on simulated test sets drawn from a known population."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from msd_jax.evaluation import intervals


def pair_count_auc(scores, positive):
    """P(score_pos > score_neg) + 1/2 P(equal) over all (pos, neg) pairs, float64."""
    scores = np.asarray(scores, np.float64)
    diff = scores[positive][:, None] - scores[~positive][None, :]
    if diff.size == 0:
        return float("nan")
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def reference_auc(probs, labels):
    """Binary: pair count on column 1; multiclass: mean one-vs-rest pair count over the classes
    with positives and negatives."""
    if probs.shape[1] == 2:
        return pair_count_auc(probs[:, 1], labels == 1)
    aucs = [pair_count_auc(probs[:, c], labels == c) for c in np.unique(labels)
            if 0 < np.sum(labels == c) < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def resample_indices(weights_row):
    return np.repeat(np.arange(len(weights_row)), weights_row)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_every_resample_matches_the_metrics_of_the_resampled_test_set(num_classes):
    rng = np.random.default_rng(num_classes)
    n = 40
    labels = rng.integers(0, num_classes, n)
    probs = rng.integers(0, 5, (n, num_classes)).astype(np.float64)  # many ties
    probs[np.arange(n), labels] += rng.integers(0, 3, n)
    s = intervals.bootstrap_samples(probs, labels, 30, seed=7)
    w = intervals.bootstrap_weights(n, 30, seed=7)
    assert w.sum(axis=1).tolist() == [n] * 30
    for b in range(30):
        idx = resample_indices(w[b])
        assert s["accuracy"][b] == pytest.approx(np.mean(probs[idx].argmax(1) == labels[idx]), abs=1e-12)
        assert s["auc"][b] == pytest.approx(reference_auc(probs[idx], labels[idx]), abs=1e-12)


def test_the_resamples_are_seeded():
    a = intervals.bootstrap_weights(50, 20, seed=3)
    assert np.array_equal(a, intervals.bootstrap_weights(50, 20, seed=3))
    assert not np.array_equal(a, intervals.bootstrap_weights(50, 20, seed=4))


def test_resamples_with_one_class_are_left_out_of_the_auc_and_counted():
    labels = np.array([1, 0, 0, 0, 0, 0])               # one positive: often not drawn
    scores = np.linspace(0.0, 1.0, 6)
    probs = np.stack([1 - scores, scores], axis=1)
    w = intervals.bootstrap_weights(6, 200, seed=0)
    without_positive = int(np.sum(w[:, 0] == 0))
    assert 0 < without_positive < 200
    ci = intervals.bootstrap_ci(probs, labels, resamples=200, seed=0)
    assert ci["auc_skipped"] == without_positive
    # the positive has the lowest score: every resample that holds it has AUC 0
    assert ci["auc"] == [0.0, 0.0]
    r = intervals.scores_with_intervals(probs, labels, resamples=200, seed=0)
    assert r["auc_ci95_skipped"] == without_positive
    assert math.isnan(intervals.bootstrap_ci(probs, np.zeros(6, int), resamples=20)["auc"][0])


def _simulated_test_set(rng, n):
    """Balanced binary labels; score ~ N(label, 1); the probabilities (1 - sigmoid, sigmoid) of it:
    argmax predicts 1 iff score > 0. True accuracy Phi(1/2), true AUC Phi(1 / sqrt(2))."""
    labels = rng.integers(0, 2, n)
    scores = labels + rng.normal(size=n)
    p = 1.0 / (1.0 + np.exp(-(scores - 0.5)))
    return np.stack([1 - p, p], axis=1), labels


TRUE_ACCURACY = NormalDist().cdf(0.5)
TRUE_AUC = NormalDist().cdf(1 / math.sqrt(2))


def test_the_interval_covers_the_true_value_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    sets, covered = 200, {"accuracy": 0, "auc": 0}
    for i in range(sets):
        probs, labels = _simulated_test_set(rng, 200)
        ci = intervals.bootstrap_ci(probs, labels, resamples=400, seed=i)
        covered["accuracy"] += ci["accuracy"][0] <= TRUE_ACCURACY <= ci["accuracy"][1]
        covered["auc"] += ci["auc"][0] <= TRUE_AUC <= ci["auc"][1]
    # 0.95 nominal; 3 binomial standard deviations of 200 sets: +- 0.046
    tolerance = 3 * math.sqrt(0.95 * 0.05 / sets)
    for metric, count in covered.items():
        assert abs(count / sets - 0.95) <= tolerance, (metric, count)


def test_the_width_shrinks_as_one_over_sqrt_n():
    rng = np.random.default_rng(1)

    def mean_width(n):
        widths = []
        for i in range(8):
            ci = intervals.bootstrap_ci(*_simulated_test_set(rng, n), resamples=400, seed=i)
            widths.append([ci["accuracy"][1] - ci["accuracy"][0], ci["auc"][1] - ci["auc"][0]])
        return np.mean(widths, axis=0)

    ratio = mean_width(100) / mean_width(1600)                # sqrt(16) = 4
    assert np.all((ratio > 3.2) & (ratio < 5.0)), ratio


def test_the_paired_interval_of_a_predictor_against_itself_is_zero():
    rng = np.random.default_rng(2)
    probs, labels = _simulated_test_set(rng, 300)
    d = intervals.paired_difference_ci(probs, probs, labels, resamples=300, seed=5)
    assert d["accuracy"] == {"difference": 0.0, "ci": [0.0, 0.0]}
    assert d["auc"] == {"difference": 0.0, "ci": [0.0, 0.0], "skipped": 0}


def test_the_paired_interval_resamples_both_predictors_alike():
    rng = np.random.default_rng(3)
    probs_a, labels = _simulated_test_set(rng, 60)
    probs_b = np.clip(probs_a + rng.normal(scale=0.2, size=probs_a.shape), 0.0, 1.0)
    d = intervals.paired_difference_ci(probs_a, probs_b, labels, resamples=100, seed=9)
    w = intervals.bootstrap_weights(60, 100, seed=9)
    diffs = []
    for row in w:
        idx = resample_indices(row)
        diffs.append(reference_auc(probs_a[idx], labels[idx]) - reference_auc(probs_b[idx], labels[idx]))
    assert d["auc"]["ci"] == pytest.approx(np.quantile(diffs, [0.025, 0.975]), abs=1e-12)
    assert d["auc"]["difference"] == pytest.approx(reference_auc(probs_a, labels) - reference_auc(probs_b, labels))
    # the shared spread cancels: the paired interval is narrower than either predictor's own
    own = intervals.bootstrap_ci(probs_a, labels, resamples=100, seed=9)["auc"]
    assert d["auc"]["ci"][1] - d["auc"]["ci"][0] < own[1] - own[0]
    with pytest.raises(ValueError, match="same test images"):
        intervals.paired_difference_ci(probs_a, probs_b[:, :1].repeat(3, axis=1), labels)


def test_delong_matches_its_pair_count_definition_and_the_bootstrap():
    rng = np.random.default_rng(4)
    probs, labels = _simulated_test_set(rng, 400)
    scores, positive = np.round(probs[:, 1], 2), labels == 1   # rounded: ties
    d = intervals.delong_auc_ci(scores, positive)
    # structural components by pair counting (DeLong et al. 1988), float64
    x, y = scores[positive], scores[~positive]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(y))
    assert d["auc"] == pytest.approx(psi.mean(), abs=1e-12)
    assert d["se"] == pytest.approx(se, rel=1e-10)
    assert d["ci"] == pytest.approx([psi.mean() - 1.959964 * se, psi.mean() + 1.959964 * se], abs=1e-5)
    boot = intervals.bootstrap_ci(np.stack([1 - scores, scores], 1), labels, resamples=1000, seed=0)["auc"]
    assert boot == pytest.approx(d["ci"], abs=0.015)


def test_format_with_ci():
    r = {"accuracy": 0.91, "accuracy_ci95": [0.8871, 0.9324], "auc": 0.5}
    assert intervals.format_with_ci(r, "accuracy") == "0.910 [0.887, 0.932]"
    assert intervals.format_with_ci(r, "auc") == "0.500"
