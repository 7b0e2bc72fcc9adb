"""Supervised baseline: the same ViT (trainable patch embedding, fixed position embedding, body)
trained from scratch on the labels, with a linear classifier on the CLS feature.

Light augmentation (random resized crop with config.baselines.supervised_scale, horizontal flip),
cross-entropy, AdamW: lr config.optim.lr per 256 images with config.optim.warmup_frac linear warm-up
then cosine to config.optim.min_lr, weight decay config.baselines.supervised_weight_decay (not on
biases, norms, CLS or position embeddings), DINO's per-tensor clipping config.optim.clip_grad, batch
config.train.batch_size. Starts from the pipeline's initial head and body (party_key(seed, 'head'),
party_key(seed, 'init')), so every method starts from the same weights.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from msd_jax.training import train as train_lib
from msd_jax.protocols import centralized
from msd_jax.training import batches
from msd_jax.training import classifier as classifier_lib
from msd_jax.models import vit

FEATURE = "cls"


def _settings(config, num_classes: int, total_steps: int, batch: int) -> classifier_lib.ClassifierSettings:
    o = config.optim
    return classifier_lib.ClassifierSettings(
        num_classes=num_classes, total_steps=int(total_steps), lr=o.lr * batch / 256.0,
        min_lr=o.min_lr, warmup_steps=int(round(o.warmup_frac * total_steps)),
        weight_decay=float(config.baselines.supervised_weight_decay), layer_decay=1.0,
        clip_grad=o.clip_grad, crop_scale=tuple(float(v) for v in config.baselines.supervised_scale),
        feature_kind=FEATURE, train_head=True, b1=o.b1, b2=o.b2,
        drop_path_rate=float(config.model.drop_path_rate))


def train_supervised(config, model: vit.ViTConfig, train_set, *, total_steps: int,
                     log: Callable[[str], None] = print) -> dict:
    """Returns {"head": {"patch_embed", "pos_embed"}, "body", "classifier": {"kernel", "bias"}}."""
    num_classes = len(train_set.class_names)
    if num_classes < 2:
        raise ValueError(f"train_set: expected >= 2 classes, got class_names {train_set.class_names}")
    init, pos = centralized.initial_params(config, model)
    batch = min(config.train.batch_size, len(train_set))
    s = _settings(config, num_classes, total_steps, batch)
    head = {"patch_embed": init["patch_embed"], "pos_embed": pos}
    params, _, _ = classifier_lib.train_classifier(
        config, model, head, init["student"]["body"], train_set.images, train_set.labels, s,
        batch_size=config.train.batch_size, key=train_lib.party_key(config.seed, "supervised"),
        party="supervised", log=log)
    params = jax.device_get(params)
    return {"head": {"patch_embed": params["patch_embed"], "pos_embed": pos},
            "body": params["body"], "classifier": params["classifier"]}


def predict_supervised(config, model: vit.ViTConfig, params: dict, images) -> np.ndarray:
    """Class probabilities [N, num_classes] of raw images [N, H, W, C] in [0, 1]."""
    for k in ("head", "body", "classifier"):
        if k not in params:
            raise ValueError(f"params: expected keys 'head', 'body', 'classifier' (train_supervised's "
                             f"output), missing {k!r}")
    images = batches.check_images(images, model)
    num_classes = int(np.shape(params["classifier"]["bias"])[0])
    s = _settings(config, num_classes, 1, 1)
    forward = classifier_lib.make_forward(model, s, params["head"]["pos_embed"], None, config.data.mean,
                              config.data.std)
    p = {"patch_embed": params["head"]["patch_embed"], "body": params["body"],
         "classifier": params["classifier"]}
    return classifier_lib.predict(forward, p, images, config.eval.batch_size)
