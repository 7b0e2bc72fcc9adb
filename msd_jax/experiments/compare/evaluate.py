"""The evaluation of a row's backbones, the same for every row: kNN + linear probe on frozen
features, and full fine-tuning with a linear head (on the pooled labelled set, and per site)."""
from __future__ import annotations

import numpy as np

from msd_jax.evaluation import evaluate_with_config
from msd_jax.evaluation.features import extract_features, parse_kinds
from msd_jax.evaluation.finetune import finetune_eval
from msd_jax.models import vit
from msd_jax.parties import site_eval_skip_reason


def evaluate_backbone(config, model: vit.ViTConfig, head, body, data) -> dict:
    """kNN + linear probe on the first feature kind of config.eval.features, fitted on the pooled
    labelled train split and scored on the test split: what parties.run_eval reports as "eval"."""
    ev = config.eval
    kind = parse_kinds(ev.features)[0]
    kw = dict(mean=config.data.mean, std=config.data.std, batch_size=ev.batch_size)
    train_set, test_set = data.labelled_train, data.test
    f_train = extract_features(head, body, model, train_set.images, **kw)[kind]
    f_test = extract_features(head, body, model, test_set.images, **kw)[kind]
    return evaluate_with_config(config, f_train, train_set.labels, f_test, test_set.labels,
                                len(test_set.class_names))


def _finetune(config, model: vit.ViTConfig, head, body, train_set, test_set, log) -> dict:
    c = config.compare
    r = finetune_eval(config, model, head, body, train_set, test_set, steps=int(c.finetune_steps),
                      train_head=bool(c.finetune_train_head), seed=config.seed, log=log)
    return {"accuracy": float(r["accuracy"]), "auc": float(r["auc"])}


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


def evaluate_row(config, model: vit.ViTConfig, backbones, data, log, *, finetune_sets=None,
                 own_finetune=None, finetune_start=None) -> dict:
    """Probes and fine-tuning of one row. `backbones`: [(name, head, body)]; with several (local
    only) the row reports their mean and keeps each one. `finetune_sets`: per backbone, the labelled
    set its per-site fine-tuning uses (default: every site's set for every backbone). A per-site
    fine-tuning accuracy is None where no site's set could carry it. For a backbone that is itself
    the result of fine-tuning on the pooled set (finetune_only): `own_finetune`, its test metrics,
    stand in for fine-tuning it again, and `finetune_start`, per backbone the (head, body) it was
    fine-tuned from, is where per-site fine-tuning starts."""
    per = []
    for i, (name, head, body) in enumerate(backbones):
        r = evaluate_backbone(config, model, head, body, data)
        if own_finetune is not None:
            r["finetune"] = dict(own_finetune)
        else:
            r["finetune"] = _finetune(config, model, head, body, data.labelled_train, data.test, log)
        if config.compare.finetune_per_site:
            sets = finetune_sets[i] if finetune_sets else data.sites
            h, b = finetune_start[i] if finetune_start else (head, body)
            r["finetune_per_site"] = _finetune_per_site(config, model, h, b, sets, data.test, log)
        per.append({"name": name, **r})
    out = {k: _mean_metrics([p[k] for p in per]) for k in ("knn", "linear", "finetune")}
    if config.compare.finetune_per_site:
        out["finetune_per_site"] = _mean_metrics([p["finetune_per_site"] for p in per])
    if len(per) > 1:
        out["per_backbone"] = per
        out["best"] = {k: max(p[k]["accuracy"] for p in per) for k in ("knn", "linear", "finetune")}
    return out
