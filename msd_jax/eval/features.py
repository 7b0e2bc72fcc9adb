"""CLS features of the backbone (head + body) for labelled images, in batches."""
from __future__ import annotations

import functools

import jax
import numpy as np

from msd_jax import encrypt
from msd_jax.models import vit


@functools.partial(jax.jit, static_argnames=("cfg",))
def _features(head_params, body_params, images, cfg: vit.ViTConfig):
    tokens = vit.PatchHead(cfg).apply({"params": head_params}, images)
    return vit.encode_cls(cfg, body_params, tokens)


def extract_features(head_params, body_params, cfg: vit.ViTConfig, images: np.ndarray, *,
                     mean: float, std: float, batch_size: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = encrypt.normalize(np.asarray(images[start:start + batch_size], np.float32), mean, std)
        if len(batch) < batch_size and start > 0:  # pad the last batch: one compilation only
            pad = np.zeros((batch_size - len(batch),) + batch.shape[1:], np.float32)
            out.append(np.asarray(_features(head_params, body_params, np.concatenate([batch, pad]),
                                            cfg))[:len(batch)])
        else:
            out.append(np.asarray(_features(head_params, body_params, batch, cfg)))
    return np.concatenate(out)
