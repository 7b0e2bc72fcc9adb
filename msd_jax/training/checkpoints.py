"""One party's Orbax checkpoints: a Composite of the training state ('state') and a JSON
description of the run ('meta') that must match when the run resumes.

A run resumes from the newest checkpoint it can read. One that cannot be read (a truncated file, a
missing item: a disk filled or a machine lost mid-write) is moved aside to `<ckpt_dir>.unreadable/`
and the run falls back to the one before it; a readable checkpoint of another run (meta, or the
state's tree, shapes and dtypes) raises CheckpointMismatchError instead."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from msd_jax.models import vit
from msd_jax.trust import InputError

UNREADABLE_SUFFIX = ".unreadable"


class CheckpointMismatchError(InputError):
    pass


class UnreadableCheckpointError(InputError):
    """A part of a checkpoint that cannot be read; the message names the part and the cause."""


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


def check_tree(where: str, saved: dict, expected: dict) -> None:
    """Raises CheckpointMismatchError naming the first leaf whose presence, shape or dtype differs.
    `saved`, `expected`: flat dicts {key path: leaf with .shape and .dtype}."""
    for key in sorted(set(saved) | set(expected)):
        name = "state." + ".".join(key)
        if key not in expected or key not in saved:
            has, lacks = ("checkpoint", "this run's state") if key in saved else \
                ("this run's state", "checkpoint")
            raise CheckpointMismatchError(f"{where}: the {has} has {name}, the {lacks} has not (a "
                                          "checkpoint of another model or trainer; use a fresh --workdir)")
        got, want = leaf_type(saved[key]), leaf_type(expected[key])
        if None not in (got, want) and got != want:
            raise CheckpointMismatchError(f"{where}: checkpoint has {name} of {got[1]}{list(got[0])}, this "
                                          f"run expects {want[1]}{list(want[0])} (a checkpoint of another "
                                          "model or trainer; use a fresh --workdir)")


def leaf_type(leaf: Any) -> Optional[tuple]:
    """(shape, dtype) of an array or its metadata; None for a leaf without them (a Python scalar)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return None if shape is None or dtype is None else (tuple(shape), np.dtype(dtype))


def error_summary(e: BaseException, max_chars: int = 500) -> str:
    """'Type: first line of the message' of the innermost error in `e`'s chain, short enough for a
    log line. The innermost one names the file and the fault (e.g. OUT_OF_RANGE: a byte range past a
    truncated file's end); TensorStore wraps it in errors that quote array indices and print their
    spec (kilobytes of JSON, or a bound method's repr)."""
    chain, x = [], e
    while x is not None and len(chain) < 16:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in reversed(chain):
        lines = str(x).strip().splitlines()
        first = lines[0] if lines else ""
        for marker in (" [tensorstore_spec=", " See full TensorStore details", "<bound method"):
            first = first.split(marker)[0]
        first = first.strip()
        if first:
            if len(first) > max_chars:
                first = first[:max_chars] + "..."
            return f"{type(x).__name__}: {first}"
    return type(e).__name__


@contextlib.contextmanager
def reading(part: str):
    """Raises UnreadableCheckpointError naming `part` for whatever fails while reading it (Orbax,
    TensorStore, JSON, OS errors...); a CheckpointMismatchError passes unchanged."""
    try:
        yield
    except CheckpointMismatchError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure to read a file the run wrote is its damage
        raise UnreadableCheckpointError(f"{part}: {error_summary(e)}") from e


def unused_path(path: str) -> str:
    """`path`, else `path.1`, `path.2`, ...: the first that does not exist."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


class Checkpoints:
    """The checkpoints in `ckpt_dir` of a run described by `meta` (JSON); keeps the latest
    `max_to_keep`. Closing waits for the saves still being written."""

    def __init__(self, ckpt_dir: str, meta: dict, max_to_keep: int):
        self.dir, self.meta = ckpt_dir, meta
        self.unreadable_dir = os.path.abspath(ckpt_dir) + UNREADABLE_SUFFIX
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        # the handlers let the manager read a step's metadata before its arrays
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options,
                                              item_handlers=handlers)

    def restore_latest(self, state: Any, log: Callable[[str], None]) -> tuple[Any, Optional[int]]:
        """(the newest readable checkpoint's state, its step), after checking it belongs to this
        run; (`state`, None) when there is none. `state` gives the tree, shapes and dtypes to
        restore. Each unreadable checkpoint on the way is moved aside and logged."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return self._restore(step, state), step
            except UnreadableCheckpointError as e:  # a mismatch is raised: it is another run's
                moved_to = self._set_aside(step)
                then = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps)
                        else "no other checkpoint: starting from the initial state")
                log(f"checkpoint step {step} in {self.dir} cannot be read ({e}); moved to {moved_to}: {then}")
        return state, None

    def _restore(self, step: int, state: Any) -> Any:
        """Checkpoint `step`'s state, in the tree, shapes and dtypes of `state`; raises
        CheckpointMismatchError for a checkpoint of another run, UnreadableCheckpointError for one
        that cannot be read."""
        check_meta(self.dir, self._saved_meta(step), self.meta)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        # Orbax casts to the target's dtypes, and checks shapes of jax.Array targets only
        expected = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract))
        check_tree(f"{self.dir} (step {step})", self._saved_tree(step), expected)
        with reading("state arrays"):
            return self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]

    def _saved_meta(self, step: int) -> dict:
        with reading("meta"):
            saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(saved, dict):
                raise InputError(f"a JSON {type(saved).__name__}, expected an object")
        return saved

    def _saved_tree(self, step: int) -> dict:
        """{key path: ArrayMetadata} of checkpoint `step`'s state."""
        with reading("state metadata"):
            metadata = self._manager.item_metadata(step)["state"]
            if metadata is None or metadata.tree is None:
                raise InputError("none found")
            return ocp.tree.to_flat_dict(metadata.tree)

    def _set_aside(self, step: int) -> str:
        """Moves checkpoint `step` to a new folder under `unreadable_dir` and makes the manager forget
        it, so that the run can save that step again; returns the new folder."""
        path = str(ocp.step.build_step_path(self._manager.directory, ocp.step.standard_name_format(), step))
        moved_to = unused_path(os.path.join(self.unreadable_dir, os.path.basename(path)))
        if ocp.multihost.is_primary_host(0):  # every process sees the folder; one moves it
            os.makedirs(self.unreadable_dir, exist_ok=True)
            os.rename(path, moved_to)
        ocp.multihost.sync_global_processes(f"msd_jax_checkpoint_set_aside_{step}")
        self._manager.reload()
        return moved_to

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(self.meta)))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
