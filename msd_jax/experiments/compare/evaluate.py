"""The evaluation of a row's backbones, the same for every row: kNN + linear probe on frozen
features, full fine-tuning with a linear head (on the pooled labelled set, and per site), and the
label-efficiency curves (label_curves.py). Each metric dict carries its 95% bootstrap interval over
the test images; the first backbone's test probabilities are returned for paired comparisons."""
from __future__ import annotations

import numpy as np

from msd_jax.evaluation import evaluate_with_config
from msd_jax.evaluation.features import extract_features, parse_kinds
from msd_jax.evaluation.finetune import finetune
from msd_jax.evaluation.intervals import scores_with_intervals
from msd_jax.experiments.compare import label_curves
from msd_jax.models import vit
from msd_jax.parties import site_eval_skip_reason


def backbone_features(config, model: vit.ViTConfig, head, body, data) -> tuple[np.ndarray, np.ndarray]:
    """(labelled train features, test features) of the first kind of config.eval.features."""
    ev = config.eval
    kind = parse_kinds(ev.features)[0]
    kw = dict(mean=config.data.mean, std=config.data.std, batch_size=ev.batch_size)
    return (extract_features(head, body, model, data.labelled_train.images, **kw)[kind],
            extract_features(head, body, model, data.test.images, **kw)[kind])


def evaluate_backbone(config, features, data, probs_out: dict | None = None) -> dict:
    """kNN + linear probe fitted on the pooled labelled train split and scored on the test split:
    what parties.run_eval reports as "eval"; `probs_out` receives their test probabilities."""
    f_train, f_test = features
    return evaluate_with_config(config, f_train, data.labelled_train.labels, f_test, data.test.labels,
                                len(data.test.class_names), probs_out=probs_out)


def _scores(config, probs, labels) -> dict:
    return scores_with_intervals(probs, labels, resamples=int(config.eval.bootstrap_resamples), seed=config.seed)


def _finetune(config, model: vit.ViTConfig, head, body, train_set, test_set, log, probs_out=None) -> dict:
    c = config.compare
    r = finetune(config, model, head, body, train_set, test_set, steps=int(c.finetune_steps),
                 train_head=bool(c.finetune_train_head), seed=config.seed, log=log)
    if probs_out is not None:
        probs_out["finetune"] = np.asarray(r["probs"])
    return _scores(config, r["probs"], test_set.labels)


def _mean_metrics(results: list[dict]) -> dict:
    """Means over the results that have numbers (a skipped site has None); None when none has."""
    out = {}
    for k in ("accuracy", "auc"):
        vals = [r[k] for r in results if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _finetune_per_site(config, model: vit.ViTConfig, head, body, sets, test_set, log) -> dict:
    """Fine-tuning on each site's labelled set alone, scored on the pooled test split; a site whose
    set cannot carry it (parties.site_eval_skip_reason) is skipped with its reason and left out of
    the mean."""
    site_r = {}
    for name, ds in sets:
        reason = site_eval_skip_reason(config, ds, "per-site fine-tuning needs")
        if reason is None:
            site_r[name] = _finetune(config, model, head, body, ds, test_set, log)
        else:
            log(f"[compare] site {name!r}: no per-site fine-tuning: {reason}")
            site_r[name] = {"accuracy": None, "auc": None, "skipped": reason}
    return {**_mean_metrics(list(site_r.values())), "sites": site_r}


def evaluate_row(config, row: str, model: vit.ViTConfig, backbones, data, plan: dict, log, *,
                 finetune_sets=None, own_finetune=None, finetune_start=None) -> tuple[dict, dict]:
    """Probes, fine-tuning and label efficiency of one row. `backbones`: [(name, head, body)]; with
    several (local only) the row reports their mean and keeps each one. `finetune_sets`: per
    backbone, the labelled set its per-site fine-tuning uses (default: every site's set for every
    backbone). A per-site fine-tuning accuracy is None where no site's set could carry it. For a
    row trained on the labels itself (finetune_only, supervised_scratch): `own_finetune`, the test
    probabilities of its own classifier, stand in for fine-tuning its backbone again (which is
    kept as 'finetune_of_backbone'), and `finetune_start`, per backbone the (head, body) its label
    training started from, is where per-site fine-tuning and the label-efficiency runs start.
    Returns (the result fields, the first backbone's test probabilities {'knn', 'linear', 'finetune'})."""
    per, features, first_probs = [], [], {}
    for i, (name, head, body) in enumerate(backbones):
        probs = {}
        feats = backbone_features(config, model, head, body, data)
        features.append(feats)
        r = evaluate_backbone(config, feats, data, probs_out=probs)
        if own_finetune is not None and row == "supervised_scratch":
            r["finetune_of_backbone"] = _finetune(config, model, head, body, data.labelled_train, data.test, log)
        if own_finetune is not None:
            probs["finetune"] = np.asarray(own_finetune)
            r["finetune"] = _scores(config, own_finetune, data.test.labels)
        else:
            r["finetune"] = _finetune(config, model, head, body, data.labelled_train, data.test, log, probs)
        if config.compare.finetune_per_site:
            sets = finetune_sets[i] if finetune_sets else data.sites
            h, b = finetune_start[i] if finetune_start else (head, body)
            r["finetune_per_site"] = _finetune_per_site(config, model, h, b, sets, data.test, log)
        per.append({"name": name, **r})
        if i == 0:
            first_probs = probs
    if len(per) == 1:  # one backbone: its metrics with their intervals
        out = {k: dict(v) for k, v in per[0].items() if k in ("knn", "linear", "finetune", "finetune_of_backbone")}
    else:
        out = {k: _mean_metrics([p[k] for p in per]) for k in ("knn", "linear", "finetune")}
    if config.compare.finetune_per_site:
        out["finetune_per_site"] = _mean_metrics([p["finetune_per_site"] for p in per])
    if len(per) > 1:
        out["per_backbone"] = per
        out["best"] = {k: max(p[k]["accuracy"] for p in per) for k in ("knn", "linear", "finetune")}
    start = finetune_start[0] if finetune_start else backbones[0][1:]
    out["label_efficiency"] = (label_curves.probe_rows(config, row, features, data)
                               + label_curves.trained_rows(config, row, model, start, first_probs["finetune"],
                                                           data, plan, log))
    return out, first_probs
