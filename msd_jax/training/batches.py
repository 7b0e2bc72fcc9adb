"""What each training step's batch is: the global batch size, the order of the examples, which
rows each process owns, and the image arrays the image trainers draw batches from.

The rows (examples 0 .. N-1) are split into G contiguous, near-equal *row groups* (the first N % G
groups one row longer, as `np.array_split`). Each group has its own stream of seeded per-epoch
permutations, and global batch b is the concatenation over the groups g of the b-th run of B / G
rows of group g's stream. With P processes (G a multiple of P) process p owns the groups
[p G / P, (p + 1) G / P), a contiguous range of rows, and those rows are exactly its block of every
global batch (msd/step.py `shard_batch`): a process needs only its own rows. With G = 1 epoch e
visits the examples in the order of `jax.random.permutation(fold_in(key, e), N)`.

Batches are a pure function of (key, G, step), so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would have seen, on any process count with the same G.
"""
from __future__ import annotations

import math

import jax
import numpy as np

ROW_GROUPS_KEY = "config.distributed.row_groups"


def row_groups_for(requested: int, num_processes: int) -> int:
    """The number of row groups G: `requested` (config.distributed.row_groups), 0 meaning one per
    process; a ValueError naming the key unless it is a multiple of the process count."""
    groups = num_processes if requested == 0 else requested
    if groups < 1 or groups % num_processes:
        raise ValueError(f"{ROW_GROUPS_KEY}={requested}: expected 0 (one group per process) or a "
                         f"positive multiple of the {num_processes} processes")
    return groups


def group_bounds(num_rows: int, groups: int) -> np.ndarray:
    """[G + 1] row boundaries: group g holds rows [bounds[g], bounds[g + 1])."""
    if groups > num_rows:
        raise ValueError(f"{ROW_GROUPS_KEY}: {groups} row groups cannot split {num_rows} examples "
                         "(expected at most one group per example)")
    sizes = np.full(groups, num_rows // groups, np.int64)
    sizes[:num_rows % groups] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def process_rows(num_rows: int, groups: int, process: int, num_processes: int) -> tuple[int, int]:
    """The rows [lo, hi) process `process` of `num_processes` owns: those of its row groups."""
    if groups % num_processes:
        raise ValueError(f"{ROW_GROUPS_KEY}: {groups} row groups cannot be shared by "
                         f"{num_processes} processes (expected a multiple of the process count)")
    bounds, per = group_bounds(num_rows, groups), groups // num_processes
    return int(bounds[process * per]), int(bounds[(process + 1) * per])


def batch_size_for(requested: int, num_examples: int, num_devices: int, groups: int = 1) -> int:
    """The global batch: the requested size, capped by the data (every row group must fill its
    share), a multiple of the device count and of the row group count."""
    if requested % num_devices:
        raise ValueError(f"config.train.batch_size={requested} is not divisible by the "
                         f"{num_devices} devices")
    if requested % groups:
        raise ValueError(f"config.train.batch_size={requested} is not divisible by the {groups} row "
                         f"groups ({ROW_GROUPS_KEY})")
    step = math.lcm(num_devices, groups)
    b = min(requested, num_examples // groups * groups) // step * step
    if b == 0:
        raise ValueError(f"{num_examples} examples cannot fill one batch on {num_devices} devices"
                         + (f" in {groups} row groups" if groups > 1 else ""))
    return b


class BatchOrder:
    """Example ids of each step's global batch, drawn from `groups` row groups (module docstring).
    An epoch is as many steps as the smallest group fills; the rest of each group's permutation
    (its last partial run) is dropped."""

    def __init__(self, key: jax.Array, num_examples: int, batch_size: int, groups: int = 1):
        if batch_size % groups:
            raise ValueError(f"batch size {batch_size} is not divisible by the {groups} row groups "
                             f"({ROW_GROUPS_KEY})")
        self.key, self.n, self.b, self.groups = key, num_examples, batch_size, groups
        self.bounds = group_bounds(num_examples, groups)
        self.per_group = batch_size // groups
        self.steps_per_epoch = int(np.diff(self.bounds).min()) // self.per_group
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_examples} examples in {groups} row groups cannot fill a batch of "
                             f"{batch_size}")
        self._epoch, self._perms = -1, None

    def group_key(self, group: int) -> jax.Array:
        """The key of group `group`'s stream; one group keeps the key itself."""
        return self.key if self.groups == 1 else jax.random.fold_in(self.key, group)

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perms = [np.asarray(jax.random.permutation(jax.random.fold_in(self.group_key(g), epoch),
                                                             int(self.bounds[g + 1] - self.bounds[g])))
                           for g in range(self.groups)]
            self._epoch = epoch
        k = self.per_group
        return np.concatenate([self.bounds[g] + perm[pos * k:(pos + 1) * k]
                               for g, perm in enumerate(self._perms)]).astype(np.int32)

    def process_rows(self, process: int, num_processes: int) -> tuple[int, int]:
        """The rows [lo, hi) of process `process`'s block of every batch."""
        return process_rows(self.n, self.groups, process, num_processes)


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
