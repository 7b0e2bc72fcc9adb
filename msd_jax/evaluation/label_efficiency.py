"""Label efficiency: the probes of frozen features fitted on a fraction of the labelled train images,
scored on the whole test split, for several labelled fractions and seeded draws.

The subsets are stratified (each class keeps its share of the images, and at least
`min_per_class` of them, or all it has) and nested within a draw: every draw shuffles each class
once, and a fraction takes the first images of each class's order, so the 1 % subset lies inside the
5 % subset of the same draw and a curve follows one growing labelled set, not independent samples.

A row aggregates the draws of one (backbone, method, fraction): the mean of the draws' test
accuracy / AUC with their standard deviation (the spread from which images got labels), and a 95%
percentile-bootstrap interval of that mean over the test images (every draw scored on the same
resamples, so the interval is the test split's noise of the mean, not of one draw). Draws that pick
the same images (fraction 1.0, or classes too small to leave a choice) are counted once."""
from __future__ import annotations

import numpy as np

from msd_jax.evaluation.intervals import bootstrap_samples, percentile_interval
from msd_jax.evaluation.knn import knn_predict
from msd_jax.evaluation.linear import linear_probe
from msd_jax.evaluation.metrics import accuracy, roc_auc

__all__ = ["parse_fractions", "per_class_counts", "label_subsets", "distinct_subsets", "probe_probs",
           "summarise_draws", "run_probes", "PROBES"]

PROBES = ("knn", "linear")


def parse_fractions(value: str, field: str = "config.eval.label_fractions") -> list[float]:
    """'0.01,0.05,1.0' -> [0.01, 0.05, 1.0] (sorted, distinct, each in (0, 1]); '' -> []."""
    out = []
    for part in str(value).split(","):
        if not part.strip():
            continue
        try:
            f = float(part)
        except ValueError:
            f = float("nan")
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{field}: expected comma-separated fractions in (0, 1], got {value!r} "
                             f"({part.strip()!r})")
        out.append(f)
    return sorted(set(out))


def per_class_counts(class_sizes, fraction: float, min_per_class: int) -> np.ndarray:
    """Images taken from each class: round(fraction * size), at least min_per_class, at most size.
    Non-decreasing in `fraction`, which keeps the subsets nested."""
    sizes = np.asarray(class_sizes, np.int64)
    want = np.maximum(np.round(fraction * sizes).astype(np.int64), min_per_class)
    return np.minimum(want, sizes)


def label_subsets(labels, fractions, draws: int, seed: int, min_per_class: int) -> list[list[np.ndarray]]:
    """subsets[draw][i]: sorted indices into `labels` of fraction fractions[i] in that draw
    (stratified, nested in the fraction; draw d shuffles with numpy Generator([seed, d]))."""
    labels = np.asarray(labels)
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class!r}")
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    sizes = [len(m) for m in members]
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        orders = [rng.permutation(m) for m in members]
        per_fraction = []
        for f in fractions:
            counts = per_class_counts(sizes, f, min_per_class)
            per_fraction.append(np.sort(np.concatenate([o[:k] for o, k in zip(orders, counts)])))
        out.append(per_fraction)
    return out


def distinct_subsets(subsets: list[np.ndarray]) -> list[np.ndarray]:
    """The subsets without repeats (in first-seen order): draws that picked the same images."""
    seen, out = set(), []
    for s in subsets:
        key = s.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def summarise_draws(per_draw_probs: list[np.ndarray], test_labels, *, resamples: int, seed: int) -> dict:
    """The metric fields of a row from the test probabilities of each draw: {'accuracy', 'auc'
    (means over draws), 'accuracy_std', 'auc_std' (sample std over draws, 0 for one draw),
    'accuracy_ci95', 'auc_ci95' (bootstrap interval of the mean; absent when resamples == 0),
    'draws'}."""
    accs = np.array([accuracy(p, test_labels) for p in per_draw_probs])
    aucs = np.array([roc_auc(p, test_labels) for p in per_draw_probs])
    ddof = 1 if len(accs) > 1 else 0
    row = {"accuracy": float(accs.mean()), "auc": float(aucs.mean()),
           "accuracy_std": float(accs.std(ddof=ddof)), "auc_std": float(aucs.std(ddof=ddof)),
           "draws": len(per_draw_probs)}
    if resamples:
        samples = [bootstrap_samples(p, test_labels, resamples, seed) for p in per_draw_probs]
        for metric in ("accuracy", "auc"):
            mean = np.mean([s[metric] for s in samples], axis=0)  # nan where a draw's AUC is undefined
            row[f"{metric}_ci95"], skipped = percentile_interval(mean)
            if metric == "auc" and skipped:
                row["auc_ci95_skipped"] = skipped
    return row


def probe_probs(config, method: str, f_train, y_train, f_test, num_classes: int) -> np.ndarray:
    """Test probabilities of the kNN ('knn') or linear ('linear') probe with config.eval's settings."""
    ev = config.eval
    if method == "knn":
        return knn_predict(f_train, y_train, f_test, num_classes, k=ev.knn_k, temperature=ev.knn_temperature)
    return linear_probe(f_train, y_train, f_test, num_classes, steps=ev.linear_steps, learning_rate=ev.linear_lr,
                        weight_decay=ev.linear_weight_decay, seed=config.seed, optimizer=ev.linear_optimizer)


def run_probes(config, backbones: dict, train_labels, test_labels, num_classes: int,
               fractions: list[float] | None = None) -> list[dict]:
    """Rows {'backbone', 'method', 'fraction', 'num_labelled', 'accuracy', 'accuracy_ci95', 'auc',
    'auc_ci95', 'accuracy_std', 'auc_std', 'draws'} of the kNN and linear probes (config.eval
    settings) for every backbone, fraction and method. `backbones`: {name: (train features [N, D],
    test features [M, D])}, the train features in the order of `train_labels`, or {name: [such
    pairs]} for a backbone that is several models (one per site): every model's draws then count as
    draws of the row. Every backbone gets the same subsets (config.eval.label_draws draws from
    config.seed) and the same test resamples."""
    ev = config.eval
    if fractions is None:
        fractions = parse_fractions(ev.label_fractions)
    train_labels = np.asarray(train_labels)
    subsets = label_subsets(train_labels, fractions, int(ev.label_draws), config.seed,
                            int(ev.label_min_per_class))
    rows = []
    for name, models in backbones.items():
        models = models if isinstance(models, list) else [models]
        for i, fraction in enumerate(fractions):
            picks = distinct_subsets([per_fraction[i] for per_fraction in subsets])
            for method in PROBES:
                probs = [probe_probs(config, method, f_train[s], train_labels[s], f_test, num_classes)
                         for f_train, f_test in models for s in picks]
                rows.append({"backbone": name, "method": method, "fraction": fraction,
                             "num_labelled": int(len(picks[0])),
                             **summarise_draws(probs, test_labels, resamples=int(ev.bootstrap_resamples),
                                               seed=config.seed)})
    return rows
