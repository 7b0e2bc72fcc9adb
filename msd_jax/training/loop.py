"""The step loop the baselines share: batches from train.BatchOrder (a pure function of seed, party
and step), optional Orbax checkpoints with resume (as training/train.py), progress lines and metrics JSONL
every config.train.log_every steps, and a clear error on a non-finite metric."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from msd_jax.training import train as train_lib
from msd_jax.msd import step as step_lib


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


def run(config, *, party: str, state: Any, step_fn: Callable, arrays: tuple, order: train_lib.BatchOrder,
        mesh, key: jax.Array, total_steps: int, batch: int, ckpt_dir: Optional[str],
        metrics_path: Optional[str], log: Callable[[str], None], log_every: Optional[int] = None,
        describe: str = "", on_log: Optional[Callable[[int, dict], None]] = None,
        meta: Optional[dict] = None):
    """Runs step_fn(state, *batch_arrays, ids, key) -> (state, metrics) from state.step to
    total_steps. `arrays` are host arrays indexed by the batch's example ids. `meta` (JSON) is
    stored with each checkpoint and must match on resume. Returns the final state (host)."""
    log_every = log_every or config.train.log_every
    mngr = None
    if ckpt_dir:
        options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
        mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)
        meta = {"party": party, "total_steps": total_steps, **(meta or {})}
        latest = mngr.latest_step()
        if latest is not None:
            saved = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            for k, v in meta.items():
                if saved.get(k) != v:
                    raise train_lib.CheckpointMismatchError(
                        f"{ckpt_dir}: checkpoint has {k}={saved.get(k)!r}, this run expects {v!r} "
                        "(another baseline or budget; use a fresh directory)")
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
            state = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
            log(f"[{party}] resumed from {ckpt_dir} at step {latest}/{total_steps}")
    state = step_lib.replicate(mesh, state)
    start = int(state.step)
    if start < total_steps:
        log(f"[{party}] training {total_steps} steps on {len(arrays[0])} images, batch {batch} on "
            f"{mesh.devices.size} {jax.default_backend()} device(s){describe}")
    metrics_file = open(metrics_path, "a") if metrics_path else None
    t0 = last_t = time.perf_counter()
    last_step = start
    try:
        for s in range(start, total_steps):
            ids = order(s)
            dev = step_lib.shard_batch(mesh, *(a[ids] for a in arrays), ids)
            state, metrics = step_fn(state, *dev, key)
            done = s + 1
            is_log = done % log_every == 0 or done == total_steps
            is_ckpt = mngr is not None and (done % config.train.checkpoint_every == 0
                                            or done == total_steps)
            if not (is_log or is_ckpt):
                continue
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = [k for k, v in m.items() if not math.isfinite(v)]
            if bad:
                raise train_lib.TrainingDivergedError(
                    f"[{party}] non-finite {', '.join(bad)} at step {done}: training stopped (try a "
                    "lower config.optim.lr or config.optim.clip_grad)")
            now = time.perf_counter()
            ips = (done - last_step) * batch / max(now - last_t, 1e-9)
            m.update(step=done, images_per_s=ips)
            if is_log:
                eta = (total_steps - done) * (now - t0) / max(done - start, 1)
                extra = "".join(f" {k} {m[k]:.3f}" for k in ("teacher_entropy", "accuracy") if k in m)
                log(f"[{party}] step {done}/{total_steps} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} "
                    f"{ips:.1f} img/s ETA {train_lib._format_eta(eta)}")
                if metrics_file:
                    metrics_file.write(json.dumps({"party": party, **m}) + "\n")
                    metrics_file.flush()
                if on_log:
                    on_log(done, m)
                last_t, last_step = now, done
            if is_ckpt:
                mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
    finally:
        if metrics_file:
            metrics_file.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    return jax.device_get(state)
