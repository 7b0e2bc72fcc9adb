"""One party's Orbax checkpoints: a Composite of the training state ('state') and a JSON
description of the run ('meta') that must match when the run resumes."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from msd_jax.models import vit
from msd_jax.trust import InputError


class CheckpointMismatchError(InputError):
    pass


def check_meta(ckpt_dir: str, saved: dict, expected: dict) -> None:
    """Raises CheckpointMismatchError naming the first key of `expected` that `saved` disagrees on;
    "model" is compared field by field."""
    for key, want in expected.items():
        if key == "model":
            check_model_fields(ckpt_dir, saved.get("model", {}), want)
        elif saved.get(key) != want:
            raise CheckpointMismatchError(f"{ckpt_dir}: checkpoint has {key}={saved.get(key)!r}, this run "
                                          f"expects {want!r} (a different training budget or "
                                          "protocol; use a fresh --workdir)")


def check_model_fields(ckpt_dir: str, saved: dict, expected: dict) -> None:
    for k, v in expected.items():
        if k in vit.COMPUTE_FIELDS:
            continue  # how the model computes (a run may resume on other hardware), not what it is
        if saved.get(k) != v:
            raise CheckpointMismatchError(
                f"{ckpt_dir}: checkpoint was written for model.{k}={saved.get(k)!r}, "
                f"but config.model.{k}={v!r} (a checkpoint of another model; use a fresh --workdir)")


class Checkpoints:
    """The checkpoints in `ckpt_dir` of a run described by `meta` (JSON); keeps the latest
    `max_to_keep`. Closing waits for the saves still being written."""

    def __init__(self, ckpt_dir: str, meta: dict, max_to_keep: int):
        self.dir, self.meta = ckpt_dir, meta
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)

    def restore_latest(self, state: Any) -> tuple[Any, Optional[int]]:
        """(the latest checkpoint's state, its step), after checking its meta; (`state`, None)
        when there is none. `state` gives the shapes and dtypes to restore."""
        latest = self._manager.latest_step()
        if latest is None:
            return state, None
        saved = self._manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_meta(self.dir, saved, self.meta)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        restored = self._manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return restored, latest

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(self.meta)))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
