"""Frozen features of the backbone (head + body) for labelled images, in batches: every kind of
vit.FEATURE_KINDS."""
from __future__ import annotations

import functools

import jax
import numpy as np

from msd_jax.encryption import encrypt
from msd_jax.models import vit

@functools.partial(jax.jit, static_argnames=("cfg",))
def _cls_and_avg(head_params, body_params, images, cfg: vit.ViTConfig):
    tokens = vit.PatchHead(cfg).apply({"params": head_params}, images)
    out = vit.Body(cfg).apply({"params": body_params}, tokens)
    return out[:, 0], out[:, 1:].mean(axis=1)


def extract_features(head_params, body_params, cfg: vit.ViTConfig, images: np.ndarray, *,
                     mean: float, std: float, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Returns {kind: [N, dim]} for every kind in vit.FEATURE_KINDS."""
    cls, avg = [], []
    for start in range(0, len(images), batch_size):
        batch = encrypt.normalize(np.asarray(images[start:start + batch_size], np.float32), mean, std)
        n = len(batch)
        if n < batch_size and start > 0:  # pad the last batch: one compilation only
            batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
        c, a = _cls_and_avg(head_params, body_params, batch, cfg)
        cls.append(np.asarray(c)[:n])
        avg.append(np.asarray(a)[:n])
    cls, avg = np.concatenate(cls), np.concatenate(avg)
    return {"cls": cls, "avgpool": avg, "cls_avgpool": np.concatenate([cls, avg], axis=1)}


def parse_kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in vit.FEATURE_KINDS]
    if not kinds or bad:
        raise ValueError(f"config.eval.features: expected a comma-separated list of {list(vit.FEATURE_KINDS)}, "
                         f"got {value!r}")
    return kinds
