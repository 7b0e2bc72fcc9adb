"""Models that travel between parties: a params file (flax msgpack) plus a JSON description.

What travels is small and plain on purpose: the initial student (server -> sites) and each site's
trained model (site -> server: its EMA teacher in model upload; student, teacher and centre in
FedAvg). The final backbone is an Orbax checkpoint others can reuse.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from msd_jax import distributed, trust
from msd_jax.models import params_file, vit
from msd_jax.training import checkpoints

PARAMS_FILE = "params.msgpack"
META_FILE = "model.json"


def save_params(out_dir: str, params, model_cfg: vit.ViTConfig, **meta) -> int:
    """Writes params and their description atomically; returns the bytes written."""
    return params_file.save(out_dir, PARAMS_FILE, params, META_FILE, {"model": model_cfg.to_dict(), **meta})


def check_model(meta_path: str, meta: dict, model_cfg: vit.ViTConfig, ignore=()) -> None:
    """A description's 'model' must be this config's model (compute fields and `ignore` aside)."""
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise trust.InputError(f"{meta_path}: field 'model' is {saved!r}, expected the model's fields")
    for k, v in model_cfg.to_dict().items():
        if k in vit.COMPUTE_FIELDS or k in ignore:
            continue  # how the model computes, not what it is
        if saved.get(k) != v:
            raise trust.InputError(f"{meta_path}: model.{k} is {saved.get(k)!r} but config.model.{k} "
                                   f"is {v!r}: a model of another shape")


def load_params(in_dir: str, template, model_cfg: vit.ViTConfig):
    """(params, description) of a model another party wrote, each leaf checked against `template`
    (paths, shapes, dtypes, finite values); trust.InputError naming the file otherwise."""
    meta_path = os.path.join(in_dir, META_FILE)
    meta = trust.read_json(meta_path, f"the description of a model, next to {PARAMS_FILE}")
    check_model(meta_path, meta, model_cfg)
    return params_file.load(os.path.join(in_dir, PARAMS_FILE), template), meta


def file_bytes(in_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(in_dir, f)) for f in (PARAMS_FILE, META_FILE))


def save_backbone(out_dir: str, head_params, body_params, model_cfg: vit.ViTConfig, **meta) -> None:
    """Orbax checkpoint {'head', 'body'} plus backbone.json describing the model."""
    path = os.path.abspath(out_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), {"head": head_params, "body": body_params}, force=True)
    if distributed.is_writer():  # Orbax saves from every process together; the description, once
        with open(os.path.join(path, "backbone.json"), "w") as f:
            json.dump({"model": model_cfg.to_dict(), **meta}, f, indent=1)


def load_backbone(in_dir: str, model_cfg: vit.ViTConfig):
    """Returns (head_params, body_params, meta); checks the model shape first."""
    path = os.path.abspath(in_dir)
    meta_path = os.path.join(path, "backbone.json")
    if not os.path.isfile(meta_path):
        raise trust.InputError(f"{meta_path}: no backbone here (run --mode server first)")
    meta = trust.read_json(meta_path, "the backbone's description")
    # the projection head is not part of the backbone
    check_model(meta_path, meta, model_cfg,
                ignore=("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers"))
    template = {"head": vit.init_head(model_cfg, jax.random.key(0)),
                "body": vit.init_student(model_cfg, jax.random.key(0))["body"]}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(path, "params"), abstract)
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for one cause)
        _drop_pending_reads()
        raise trust.InputError(f"{os.path.join(path, 'params')}: the backbone's Orbax checkpoint cannot "
                               f"be read ({checkpoints.error_summary(e)}); write it again with --mode "
                               "server or copy it again") from None
    for name, tree in params.items():
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            trust.check_values(np.asarray(leaf), f"{os.path.join(path, 'params')}: "
                                                 f"{name}{jax.tree_util.keystr(leaf_path)}")
    return params["head"], params["body"], meta


def _drop_pending_reads() -> None:
    """After a failed restore, Orbax leaves the reads of the other arrays as coroutines that
    report the same fault again, as pages of 'Exception ignored' tracebacks, when they are
    collected; collect them now, quietly: the fault is already reported, once, with its file."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
