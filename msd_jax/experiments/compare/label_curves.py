"""Label efficiency in the comparison: for each row, its backbone's kNN and linear probes, and the
row's way of using labels, fitted on stratified, nested subsets of the labelled train images
(evaluation/label_efficiency.py) and scored on the whole test split.

The way of using labels is what the row's own fine-tune column measures, at every fraction:
fine-tuning of the pretrained backbone (`finetune`) for the pretraining rows, the same recipe from
the random-init backbone (`finetune_only`, the paper's fine-tuning only baseline) and supervised
training from scratch (`supervised`), each with the optimizer steps and batch of the full-label
fine-tuning. `no_pretraining` gets the probes only (its fine-tuning is `finetune_only`), so do the
label-trained rows' backbones (they have seen every label) and `local_only` (one model per site;
its probes are the mean over the site models, each draw of each site counted once).

Every row uses the same subsets (eval.label_draws draws of config.seed) and, for the trained
methods, the first compare.label_train_draws of them at the fractions of
compare.label_train_fractions; at fraction 1.0 the row's full-label result is reused.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np

from msd_jax.evaluation import label_efficiency as le
from msd_jax.evaluation.finetune import finetune
from msd_jax.models import vit
from msd_jax.protocols import supervised

# the method each row trains with labels (rows absent: probes only)
TRAINED = {"msd_token_upload": "finetune", "msd_model_upload": "finetune", "fedavg_msd": "finetune",
           "centralized_dino": "finetune", "centralized_msd": "finetune", "finetune_only": "finetune_only",
           "supervised_scratch": "supervised"}
PROBED = ("msd_token_upload", "msd_model_upload", "fedavg_msd", "local_only", "centralized_dino",
          "centralized_msd", "no_pretraining")


def fractions(config) -> tuple[list[float], list[float]]:
    """(the probes' fractions, the trained methods' fractions): config.eval.label_fractions ('' =
    no label efficiency), and config.compare.label_train_fractions ('' = the same; each must be one
    of the probes'; 1.0 joins them whenever the probes have it)."""
    probe = le.parse_fractions(config.eval.label_fractions)
    if int(config.compare.label_train_draws) < 1:
        raise ValueError(f"config.compare.label_train_draws: expected >= 1, got {config.compare.label_train_draws}")
    value = config.compare.label_train_fractions
    if not probe or not str(value).strip():
        return probe, probe
    trained = le.parse_fractions(value, "config.compare.label_train_fractions")
    extra = [f for f in trained if f not in probe]
    if extra:
        raise ValueError(f"config.compare.label_train_fractions: {extra} not in config.eval.label_fractions "
                         f"({config.eval.label_fractions!r}); the trained methods use the probes' subsets")
    # the full-label point costs nothing: it is the row's own fine-tune column
    return probe, sorted(set(trained) | ({1.0} & set(probe)))


def _subsets(config, labels, probe_fractions):
    ev = config.eval
    return le.label_subsets(labels, probe_fractions, int(ev.label_draws), config.seed, int(ev.label_min_per_class))


def _row(backbone, method, fraction, picks, probs, test_labels, config) -> dict:
    return {"backbone": backbone, "method": method, "fraction": fraction, "num_labelled": int(len(picks[0])),
            **le.summarise_draws(probs, test_labels, resamples=int(config.eval.bootstrap_resamples),
                                 seed=config.seed)}


def probe_rows(config, row: str, features: list[tuple[np.ndarray, np.ndarray]], data) -> list[dict]:
    """The kNN and linear rows of `row` from its backbones' (train features, test features): with
    several backbones, every backbone's draws count as draws of the row."""
    if row not in PROBED:
        return []
    return le.run_probes(config, {row: list(features)}, data.labelled_train.labels, data.test.labels,
                         len(data.test.class_names), fractions(config)[0])


def _train_probs(config, row: str, model: vit.ViTConfig, start, subset, data, plan: dict, log) -> np.ndarray:
    """Test probabilities of the row's label-trained method on one labelled subset."""
    c = config.compare
    if row == "supervised_scratch":
        cfg = copy.deepcopy(config)
        cfg.train.batch_size = int(plan["batch"]["server"])
        params = supervised.train_supervised(cfg, model, subset, total_steps=int(plan["steps"]["server"]), log=log)
        return np.asarray(supervised.predict_supervised(cfg, model, params, data.test.images))
    head, body = start
    return np.asarray(finetune(config, model, head, body, subset, data.test, steps=int(c.finetune_steps),
                               train_head=bool(c.finetune_train_head), seed=config.seed, log=log)["probs"])


def trained_rows(config, row: str, model: vit.ViTConfig, start, full_probs: np.ndarray, data, plan: dict,
                 log: Callable[[str], None]) -> list[dict]:
    """The rows of `row`'s label-trained method (TRAINED) at compare.label_train_fractions, on the
    first compare.label_train_draws draws; `start`: the (head, body) it starts from (unused for
    supervised_scratch); `full_probs`: its test probabilities with every label (fraction 1.0)."""
    if row not in TRAINED:
        return []
    probe_fractions, train_fractions = fractions(config)
    labels = np.asarray(data.labelled_train.labels)
    subsets = _subsets(config, labels, probe_fractions)[:int(config.compare.label_train_draws)]
    out = []
    for fraction in train_fractions:
        i = probe_fractions.index(fraction)
        picks = le.distinct_subsets([per_fraction[i] for per_fraction in subsets])
        if len(picks) == 1 and len(picks[0]) == len(labels):
            probs = [np.asarray(full_probs)]
        else:
            probs = []
            for d, s in enumerate(picks):
                log(f"[compare] {row}: {TRAINED[row]} on {len(s)} labelled images ({fraction:g}, draw {d})")
                probs.append(_train_probs(config, row, model, start, data.labelled_train.subset(s), data, plan, log))
        out.append(_row(row, TRAINED[row], fraction, picks, probs, np.asarray(data.test.labels), config))
    return out
