"""Tests for msd_jax.evaluation (metrics, kNN probe, linear probe) against independent float64 numpy
references."""

import math

import numpy as np
import pytest

from msd_jax.evaluation import evaluate_features
from msd_jax.evaluation.knn import knn_predict
from msd_jax.evaluation.linear import linear_probe
from msd_jax.evaluation.metrics import accuracy, roc_auc


# ---------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------

def brute_force_auc(scores, positive):
    """P(score_pos > score_neg) + 1/2 P(equal), over all (pos, neg) pairs, float64."""
    scores = np.asarray(scores, np.float64)
    pos = scores[positive]
    neg = scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def reference_knn(train, train_labels, test, num_classes, k, temperature):
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    k = min(k, len(train))
    out = np.zeros((len(test), num_classes))
    for i, row in enumerate(test):
        row = row / np.linalg.norm(row)
        sims = train @ row
        order = np.argsort(-sims, kind="stable")[:k]
        for j in order:
            out[i, train_labels[j]] += math.exp(sims[j] / temperature)
        out[i] /= out[i].sum()
    return out


def reference_logreg_probs(train, labels, test, num_classes, weight_decay, iters=50):
    """Damped Newton in float64 on mean CE + wd/2 ||W||^2 (bias unregularised), on features
    standardised with the train mean/std. Returns (test probabilities, final gradient norm)."""
    train = np.asarray(train, np.float64)
    mean, std = train.mean(0), train.std(0)
    x = (train - mean) / std
    xt = (np.asarray(test, np.float64) - mean) / std
    n, d = x.shape
    c = num_classes
    xa = np.hstack([x, np.ones((n, 1))])                 # [n, d+1]
    y = np.eye(c)[labels]
    reg = np.zeros((d + 1, c))
    reg[:d] = weight_decay                                 # no penalty on the bias row

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def loss(theta):
        z = xa @ theta
        logp = z - z.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        return -np.mean((y * logp).sum(1)) + 0.5 * np.sum(reg * theta ** 2)

    theta = np.zeros((d + 1, c))
    for _ in range(iters):
        p = softmax(xa @ theta)
        grad = xa.T @ (p - y) / n + reg * theta
        # Hessian over vec(theta) with theta index (feature a, class u) -> a * c + u.
        h = np.zeros((d + 1, c, d + 1, c))
        for i in range(n):
            s = np.diag(p[i]) - np.outer(p[i], p[i])
            h += np.einsum("a,b,uv->aubv", xa[i], xa[i], s)
        h = h.reshape((d + 1) * c, (d + 1) * c) / n + np.diag(reg.reshape(-1))
        # Softmax is invariant to adding a constant to all biases -> singular: use lstsq.
        step = np.linalg.lstsq(h, grad.reshape(-1), rcond=None)[0].reshape(d + 1, c)
        t, f0 = 1.0, loss(theta)
        while loss(theta - t * step) > f0 and t > 1e-8:
            t *= 0.5
        theta = theta - t * step
    p = softmax(xa @ theta)
    grad = xa.T @ (p - y) / n + reg * theta
    xta = np.hstack([xt, np.ones((len(xt), 1))])
    return softmax(xta @ theta), float(np.linalg.norm(grad))


def blobs(rng, num_classes, n_per_class, dim, sep, scale=1.0):
    centres = rng.normal(size=(num_classes, dim))
    centres = sep * centres / np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([c + scale * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(num_classes), n_per_class)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def test_accuracy_hand_case():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.75)


def test_roc_auc_hand_case():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - scores, scores], axis=1)
    assert roc_auc(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # One tie between a positive and a negative counts 1/2: pairs (0.5>0.2)=1, (0.5=0.5)=1/2.
    scores = np.array([0.2, 0.5, 0.5])
    probs = np.stack([1 - scores, scores], axis=1)
    assert roc_auc(probs, np.array([0, 0, 1])) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_binary_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 301
    scores = rng.integers(0, 7, size=n) / 6.0          # heavy ties
    labels = (rng.random(n) < 0.3 + 0.5 * scores).astype(np.int64)
    probs = np.stack([1 - scores, scores], axis=1)
    expected = brute_force_auc(scores, labels == 1)
    assert roc_auc(probs, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_multiclass_macro_ovr(seed):
    rng = np.random.default_rng(seed)
    n, c = 250, 5
    probs = rng.integers(0, 5, size=(n, c)).astype(np.float64)   # ties within each column
    labels = rng.choice([0, 1, 3, 4], size=n)                    # class 2 absent: skipped
    labels[0] = 0
    expected = np.mean([brute_force_auc(probs[:, k], labels == k) for k in (0, 1, 3, 4)])
    assert roc_auc(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_single_class_is_nan():
    rng = np.random.default_rng(0)
    assert math.isnan(roc_auc(rng.random((10, 2)), np.ones(10, np.int64)))
    assert math.isnan(roc_auc(rng.random((10, 4)), np.full(10, 2)))


def test_metrics_validation():
    with pytest.raises(ValueError, match="labels"):
        roc_auc(np.zeros((4, 2)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels"):
        accuracy(np.zeros((4, 2)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([[0.5, np.nan], [0.5, 0.5]]), np.array([0, 1]))


# ---------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,temperature,num_train", [(20, 0.07, 200), (5, 0.5, 200),
                                                     (50, 0.07, 13)])  # last: k > num_train
def test_knn_matches_numpy_loop(k, temperature, num_train):
    rng = np.random.default_rng(k)
    c, d = 4, 16
    train = rng.normal(size=(num_train, d)).astype(np.float32) * rng.uniform(0.5, 3, (num_train, 1))
    labels = rng.integers(0, c, size=num_train)
    test = rng.normal(size=(37, d)).astype(np.float32)
    got = knn_predict(train, labels, test, c, k=k, temperature=temperature, batch_size=8)
    expected = reference_knn(train, labels, test, c, k, temperature)
    assert got.shape == (37, c) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    # Batching does not change the answer.
    np.testing.assert_allclose(
        knn_predict(train, labels, test, c, k=k, temperature=temperature, batch_size=512),
        got, atol=1e-6)


def test_knn_hand_case():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    test = np.array([[1.0, 0.05], [0.0, 2.0]], np.float32)
    # k=2: both neighbours of each test point share its class -> one-hot answers.
    np.testing.assert_allclose(knn_predict(train, labels, test, 2, k=2),
                               [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)
    # k=3, huge temperature: weights ~equal -> 2/3 of the vote to the near class.
    np.testing.assert_allclose(knn_predict(train, labels, test, 3, k=3, temperature=1e6),
                               [[2 / 3, 1 / 3, 0.0], [1 / 3, 2 / 3, 0.0]], atol=1e-5)


def test_knn_validation():
    x = np.zeros((5, 3), np.float32) + 1
    y = np.array([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="test_features.*expected 3"):
        knn_predict(x, y, np.ones((2, 4)), 2)
    with pytest.raises(ValueError, match="train_labels.*expected 5"):
        knn_predict(x, y[:4], x, 2)
    with pytest.raises(ValueError, match=r"train_labels.*\[0, 2\)"):
        knn_predict(x, np.array([0, 1, 2, 1, 0]), x, 2)
    with pytest.raises(ValueError, match=r"train_labels.*\[0, 2\)"):
        knn_predict(x, np.array([0, 1, -1, 1, 0]), x, 2)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="train_features.*NaN or inf"):
        knn_predict(bad, y, x, 2)
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="test_features.*NaN or inf"):
        knn_predict(x, y, bad, 2)


# ---------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_linear_probe_separable_blobs(num_classes, optimizer):
    rng = np.random.default_rng(num_classes)
    x, y = blobs(rng, num_classes, 120, 8, sep=6.0)
    n_train = 80 * num_classes
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    assert len(yte) == 40 * num_classes
    probs = linear_probe(xtr, ytr, xte, num_classes, optimizer=optimizer)
    assert probs.shape == (len(yte), num_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(1) == yte) >= 0.95


@pytest.mark.parametrize("weight_decay", [1e-1, 1e-2, 1e-4])
def test_linear_probe_reaches_regularised_optimum(weight_decay):
    rng = np.random.default_rng(7)
    x, y = blobs(rng, 3, 25, 3, sep=1.5)              # overlapping: optimum is finite
    x = x * np.array([1.0, 10.0, 0.1], np.float32) + 5.0   # standardisation matters
    xte = rng.normal(size=(20, 3)).astype(np.float32) * [1.0, 10.0, 0.1] + 5.0
    expected, grad_norm = reference_logreg_probs(x, y, xte, 3, weight_decay)
    assert grad_norm < 1e-8                           # the reference itself converged
    got = linear_probe(x, y, xte, 3, weight_decay=weight_decay)
    # Observed error ~1e-6 (float32); 1e-3 still separates wd from 2 * wd at every wd here.
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_linear_probe_deterministic():
    rng = np.random.default_rng(3)
    x, y = blobs(rng, 3, 30, 5, sep=2.0)
    a = linear_probe(x, y, x, 3, seed=5)
    b = linear_probe(x, y, x, 3, seed=5)
    np.testing.assert_array_equal(a, b)
    a = linear_probe(x, y, x, 3, seed=5, optimizer="adam", steps=50)
    b = linear_probe(x, y, x, 3, seed=5, optimizer="adam", steps=50)
    np.testing.assert_array_equal(a, b)


def test_linear_probe_validation():
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="test_features.*expected 3"):
        linear_probe(x, y, x[:, :2], 3)
    with pytest.raises(ValueError, match="train_labels.*expected 6"):
        linear_probe(x, y[:5], x, 3)
    with pytest.raises(ValueError, match=r"train_labels.*\[0, 2\)"):
        linear_probe(x, y, x, 2)
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="train_features.*NaN or inf"):
        linear_probe(bad, y, x, 3)


def test_evaluate_features_structure_and_values():
    rng = np.random.default_rng(11)
    x, y = blobs(rng, 3, 60, 6, sep=6.0)
    probes = dict(knn_k=20, knn_temperature=0.07, linear_steps=100, linear_optimizer="lbfgs",
                  linear_lr=0.1, linear_weight_decay=1e-4, seed=0)
    res = evaluate_features(x[:120], y[:120], x[120:], y[120:], 3, **probes)
    assert set(res) == {"knn", "linear"}
    for probe in res.values():
        assert set(probe) == {"accuracy", "auc"}
        assert isinstance(probe["accuracy"], float) and isinstance(probe["auc"], float)
        assert probe["accuracy"] >= 0.95 and probe["auc"] >= 0.98
    with pytest.raises(ValueError, match="test_labels.*expected 60"):
        evaluate_features(x[:120], y[:120], x[120:], y[121:], 3, **probes)
    # with resamples, each also holds its 95% bootstrap intervals around the same point values
    with_ci = evaluate_features(x[:120], y[:120], x[120:], y[120:], 3, bootstrap_resamples=50, **probes)
    for name, probe in with_ci.items():
        assert set(probe) == {"accuracy", "auc", "accuracy_ci95", "auc_ci95"}
        assert probe["accuracy"] == res[name]["accuracy"] and probe["auc"] == res[name]["auc"]
        assert probe["accuracy_ci95"][0] <= probe["accuracy"] <= probe["accuracy_ci95"][1]
