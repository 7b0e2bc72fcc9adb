"""Full fine-tuning of a backbone with a new linear classifier (training/classifier.py), started from
a new head at N(0, 0.01^2) or from the linear probe's solution (LP-FT), scored on a test split.

Model selection never sees the test split: config.eval.finetune_val_fraction of the labelled train
images (stratified by class, seeded) are held out, the classifier (and the LP-FT start) is fitted on
the rest, and the parameters scored best on the held-out part (at the start and once per epoch, or
every config.eval.finetune_select_every steps) are the ones tested.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.evaluation import features as features_lib
from msd_jax.evaluation import linear as linear_lib
from msd_jax.evaluation.features import parse_kinds
from msd_jax.evaluation.metrics import accuracy, roc_auc
from msd_jax.models import vit
from msd_jax.training import classifier as classifier_lib
from msd_jax.training import train as train_lib


def fit_linear_classifier(train_features, labels, num_classes: int, *, steps: int, weight_decay: float,
                          seed: int = 0) -> dict:
    """The project's linear probe (evaluation/linear.py: train-standardised features, L-BFGS on mean
    cross-entropy + weight_decay / 2 ||W||^2, W0 ~ N(0, 0.01^2) from `seed`) expressed on the raw
    features: {"kernel": W / std, "bias": b - (mean / std) W}, so that
    softmax(features @ kernel + bias) equals linear_probe's probabilities."""
    x = np.asarray(train_features, np.float64)
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), linear_lib._STD_FLOOR)
    y = jax.nn.one_hot(jnp.asarray(labels, jnp.int32), num_classes, dtype=jnp.float32)
    w0 = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], num_classes), jnp.float32)
    w, b = linear_lib._fit((w0, jnp.zeros((num_classes,), jnp.float32)),
                           jnp.asarray((x - mean) / std, jnp.float32), y, jnp.float32(weight_decay),
                           jnp.float32(0.1), steps=int(steps), optimizer="lbfgs")
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    kernel = w / std[:, None]
    return {"kernel": kernel.astype(np.float32), "bias": (b - mean @ kernel).astype(np.float32)}


def validation_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) of a labelled set, disjoint and sorted: from each class with
    at least two images, round(fraction x its count) of them (at least one, and never all) drawn
    with numpy's Generator seeded by (seed, 1); a class of one image stays in the fit part. fraction
    0: every index fits, none validates."""
    labels = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.eval.finetune_val_fraction: expected in [0, 1), got {fraction}")
    if fraction == 0.0:
        return np.arange(len(labels)), np.zeros((0,), np.int64)
    rng = np.random.default_rng([int(seed), 1])
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.append(rng.permutation(idx)[:k])
    val = np.sort(np.concatenate(val)) if val else np.zeros((0,), np.int64)
    return np.setdiff1d(np.arange(len(labels)), val), val


def finetune(config, model: vit.ViTConfig, head_params, body_params, train_set, test_set, *, steps: int,
             train_head: bool = False, seed: int = 0, log: Callable[[str], None] = print,
             log_every: Optional[int] = None) -> dict:
    """`finetune_eval` plus the trained (selected) params, the logged training metrics ("history"),
    the validation scores of the selection ("selection": [{"step", "val_accuracy", "val_loss",
    "selected"}], empty without a validation split), the test probabilities ("probs") and the
    held-out indices of train_set ("val_indices")."""
    kind = config.eval.finetune_features or parse_kinds(config.eval.features)[0]
    parse_kinds(kind)
    num_classes = len(train_set.class_names)
    if num_classes < 2:
        raise ValueError(f"train_set: expected >= 2 classes, got class_names {train_set.class_names}")
    if tuple(test_set.class_names) != tuple(train_set.class_names):
        raise ValueError(f"test_set.class_names {test_set.class_names} differ from train_set's "
                         f"{train_set.class_names}")
    fit_idx, val_idx = validation_split(train_set.labels, float(config.eval.finetune_val_fraction), seed)
    fit_images, fit_labels = train_set.images[fit_idx], np.asarray(train_set.labels)[fit_idx]
    val = (train_set.images[val_idx], np.asarray(train_set.labels)[val_idx]) if len(val_idx) else None
    batch_size = int(config.eval.finetune_batch_size)
    batch = min(batch_size, len(fit_idx))
    s = classifier_lib.ClassifierSettings(
        num_classes=num_classes, total_steps=int(steps),
        lr=float(config.eval.finetune_lr) * batch / 256.0,
        min_lr=float(config.eval.finetune_min_lr),
        warmup_steps=int(round(float(config.eval.finetune_warmup_frac) * steps)),
        weight_decay=float(config.eval.finetune_weight_decay),
        layer_decay=float(config.eval.finetune_layer_decay),
        clip_grad=float(config.optim.clip_grad),
        crop_scale=tuple(float(v) for v in config.eval.finetune_crop_scale),
        feature_kind=kind, train_head=bool(train_head), b1=config.optim.b1, b2=config.optim.b2,
        drop_path_rate=float(config.model.drop_path_rate))
    if not 0 < s.layer_decay <= 1:
        raise ValueError(f"config.eval.finetune_layer_decay: expected in (0, 1], got {s.layer_decay}")
    key = jax.random.fold_in(train_lib.party_key(seed, "finetune"), 0)
    init = config.eval.finetune_init
    if init not in ("linear_probe", "random"):
        raise ValueError(f"config.eval.finetune_init: expected 'linear_probe' or 'random', got {init!r}")
    classifier = None
    if init == "linear_probe":
        feats = features_lib.extract_features(head_params, body_params, model, fit_images,
                                              mean=config.data.mean, std=config.data.std,
                                              batch_size=config.eval.batch_size)[kind]
        classifier = fit_linear_classifier(feats, fit_labels, num_classes,
                                           steps=config.eval.linear_steps,
                                           weight_decay=config.eval.linear_weight_decay,
                                           seed=seed)
    selection: list = []
    params, forward, history = classifier_lib.train_classifier(
        config, model, head_params, body_params, fit_images, fit_labels, s, batch_size=batch_size,
        key=key, party="finetune", log=log, log_every=log_every, classifier=classifier, val=val,
        select_every=int(config.eval.finetune_select_every) or None, selection=selection)
    probs = classifier_lib.predict(forward, params, test_set.images, config.eval.batch_size)
    result = {"accuracy": accuracy(probs, test_set.labels), "auc": roc_auc(probs, test_set.labels)}
    log(f"[finetune] {steps} steps ({'head + ' if train_head else ''}body, {kind}, {init} init): test accuracy "
        f"{result['accuracy']:.4f} auc {result['auc']:.4f}")
    return {**result, "params": params, "history": history, "selection": selection, "probs": probs,
            "val_indices": val_idx}


def finetune_eval(config, model: vit.ViTConfig, head_params, body_params, train_set, test_set, *, steps: int,
                  train_head: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Fine-tunes the backbone (the body, and the patch embedding if `train_head`) with a new linear
    classifier on train_set for `steps` steps (selected on a part of train_set held out, see the
    module); returns {"accuracy", "auc"} on test_set."""
    r = finetune(config, model, head_params, body_params, train_set, test_set, steps=steps,
                 train_head=train_head, seed=seed, log=log)
    return {"accuracy": r["accuracy"], "auc": r["auc"]}
