"""What each training step's batch is: the global batch size, the order of the examples, and the
image arrays the image trainers draw batches from.

Batches are a pure function of (key, step): epoch e visits the examples in the order of
`jax.random.permutation(fold_in(key, e), N)`, so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import jax
import numpy as np


def batch_size_for(requested: int, num_examples: int, num_devices: int) -> int:
    """The global batch: the requested size, capped by the data, a multiple of the device count."""
    if requested % num_devices:
        raise ValueError(f"config.train.batch_size={requested} is not divisible by the "
                         f"{num_devices} devices")
    b = min(requested, num_examples) // num_devices * num_devices
    if b == 0:
        raise ValueError(f"{num_examples} examples cannot fill one batch on {num_devices} devices")
    return b


class BatchOrder:
    """Example ids of each step's batch; the last partial batch of an epoch is dropped."""

    def __init__(self, key: jax.Array, num_examples: int, batch_size: int):
        self.key, self.n, self.b = key, num_examples, batch_size
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.n)
            self._epoch, self._perm = epoch, np.asarray(perm)
        return self._perm[pos * self.b:(pos + 1) * self.b].astype(np.int32)


def check_images(images, model_cfg, what: str = "images") -> np.ndarray:
    """float32 [N, image_size, image_size, channels] in [0, 1], or a ValueError naming the field."""
    images = np.asarray(images)
    want = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if images.ndim != 4 or images.shape[1:] != want:
        raise ValueError(f"{what}: expected float images [N, {want[0]}, {want[1]}, {want[2]}] "
                         f"(config.model.image_size / channels), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{what}: expected float images in [0, 1], got dtype {images.dtype}")
    if len(images) == 0:
        raise ValueError(f"{what}: no images")
    return images.astype(np.float32, copy=False)
