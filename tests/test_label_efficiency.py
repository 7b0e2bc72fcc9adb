"""Label efficiency (msd_jax/evaluation/label_efficiency.py): stratified subsets nested per draw with
the class minimum kept, draws aggregated as mean +- std with the bootstrap interval of the mean, and
the rows of run_probes. The report.json block and its plot: test_plots.py (test_run_eval_by_site)."""
import numpy as np
import pytest

from msd_jax import config as config_lib
from msd_jax.evaluation import intervals
from msd_jax.evaluation import label_efficiency as le

FRACTIONS = [0.01, 0.05, 0.1, 0.25, 1.0]


def test_parse_fractions():
    assert le.parse_fractions("0.1, 0.01,1.0,0.1") == [0.01, 0.1, 1.0]
    assert le.parse_fractions("") == []
    for bad in ("0", "1.5", "a,0.1", "-0.1"):
        with pytest.raises(ValueError, match=r"config.eval.label_fractions: expected comma-separated fractions in \(0, 1\]"):
            le.parse_fractions(bad)
    c = config_lib.base_config()
    c.eval.label_fractions = "0.1,2"
    with pytest.raises(ValueError, match="config.eval.label_fractions"):
        config_lib.validate(c)
    for key, value in (("label_draws", 0), ("label_min_per_class", 0), ("bootstrap_resamples", -1)):
        c = config_lib.base_config()
        c.eval[key] = value
        with pytest.raises(ValueError, match=f"config.eval.{key}"):
            config_lib.validate(c)


def test_subsets_are_stratified_nested_per_draw_and_keep_the_class_minimum():
    # 1,000 / 150 / 3 images: at 1 % the second class gets round(1.5) = 2 and the third its minimum
    labels = np.repeat([0, 1, 2], [1000, 150, 3])
    np.random.default_rng(0).shuffle(labels)
    subsets = le.label_subsets(labels, FRACTIONS, draws=3, seed=11, min_per_class=2)
    expected = {0.01: [10, 2, 2], 0.05: [50, 8, 2], 0.1: [100, 15, 2], 0.25: [250, 38, 2],
                1.0: [1000, 150, 3]}
    for draw in subsets:
        for f, idx in zip(FRACTIONS, draw):
            assert len(np.unique(idx)) == len(idx)
            assert np.bincount(labels[idx], minlength=3).tolist() == expected[f]
        for small, large in zip(draw, draw[1:]):           # nested within the draw
            assert set(small) <= set(large)
    # the draws differ below 100 %, and a seed repeats them
    assert not np.array_equal(subsets[0][1], subsets[1][1])
    again = le.label_subsets(labels, FRACTIONS, draws=3, seed=11, min_per_class=2)
    assert all(np.array_equal(a, b) for d, e in zip(subsets, again) for a, b in zip(d, e))
    # a class smaller than the minimum gives all it has
    one = le.label_subsets(np.array([0] * 50 + [1]), [0.01], draws=1, seed=0, min_per_class=2)[0][0]
    assert np.bincount(np.array([0] * 50 + [1])[one]).tolist() == [2, 1]


def test_per_class_counts_never_shrink_with_the_fraction():
    sizes = [7, 130, 999]
    counts = np.array([le.per_class_counts(sizes, f, 3) for f in np.linspace(0.001, 1.0, 300)])
    assert np.all(np.diff(counts, axis=0) >= 0)
    assert counts[0].tolist() == [3, 3, 3] and counts[-1].tolist() == sizes


def test_the_draws_are_summarised_as_mean_std_and_the_interval_of_the_mean():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 120)
    draws = [np.stack([1 - p, p], axis=1) for p in rng.random((3, 120)) * 0.6 + 0.4 * labels]
    row = le.summarise_draws(draws, labels, resamples=200, seed=4)
    accs = [np.mean(p.argmax(1) == labels) for p in draws]
    assert row["accuracy"] == pytest.approx(np.mean(accs))
    assert row["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert row["draws"] == 3
    # the interval of the mean over the same resamples, from explicit resampled test sets
    w = intervals.bootstrap_weights(120, 200, seed=4)
    means = [np.mean([np.mean(p[np.repeat(np.arange(120), r)].argmax(1) == np.repeat(labels, r))
                      for p in draws]) for r in w]
    assert row["accuracy_ci95"] == pytest.approx(np.quantile(means, [0.025, 0.975]), abs=1e-12)
    assert row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1]
    single = le.summarise_draws(draws[:1], labels, resamples=0, seed=4)
    assert single["accuracy_std"] == 0.0 and "accuracy_ci95" not in single


def test_run_probes_rows():
    rng = np.random.default_rng(0)
    n, m = 200, 60
    y, yt = rng.integers(0, 2, n), rng.integers(0, 2, m)
    good = (rng.normal(size=(n, 8)) + 3 * y[:, None], rng.normal(size=(m, 8)) + 3 * yt[:, None])
    noise = (rng.normal(size=(n, 8)), rng.normal(size=(m, 8)))
    c = config_lib.base_config()
    c.eval.update(label_fractions="0.1,1.0", label_draws=2, bootstrap_resamples=100, linear_steps=50)
    rows = le.run_probes(c, {"good": good, "noise": noise}, y, yt, 2)
    assert [(r["backbone"], r["method"], r["fraction"]) for r in rows] == [
        (b, mth, f) for b in ("good", "noise") for f in (0.1, 1.0) for mth in ("knn", "linear")]
    counts = np.bincount(y)
    for r in rows:
        assert set(r) >= {"backbone", "method", "fraction", "num_labelled", "accuracy", "accuracy_ci95",
                          "auc", "auc_ci95", "accuracy_std", "auc_std", "draws"}
        assert r["num_labelled"] == le.per_class_counts(counts, r["fraction"], 2).sum()
        assert r["draws"] == (1 if r["fraction"] == 1.0 else 2)   # one way to take every image
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
    by = {(r["backbone"], r["method"], r["fraction"]): r for r in rows}
    assert by[("good", "linear", 0.1)]["accuracy"] >= 0.9
    assert by[("noise", "linear", 1.0)]["accuracy"] < 0.75
