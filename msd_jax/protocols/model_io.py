"""Models that travel between parties: a params file (flax msgpack) plus a JSON description.

What travels is small and plain on purpose: the initial student (server -> sites) and each site's
trained model (site -> server: its EMA teacher in model upload; student, teacher and centre in
FedAvg). The final backbone is an Orbax checkpoint others can reuse.
"""
from __future__ import annotations

import json
import os

import flax.serialization
import jax
import orbax.checkpoint as ocp

from msd_jax.models import vit

PARAMS_FILE = "params.msgpack"
META_FILE = "model.json"


def save_params(out_dir: str, params, model_cfg: vit.ViTConfig, **meta) -> int:
    """Writes params atomically; returns the bytes written (params + description)."""
    os.makedirs(out_dir, exist_ok=True)
    data = flax.serialization.to_bytes(jax.device_get(params))
    tmp = os.path.join(out_dir, PARAMS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out_dir, PARAMS_FILE))
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"model": model_cfg.to_dict(), **meta}, f, indent=1)
    return len(data) + os.path.getsize(os.path.join(out_dir, META_FILE))


def load_params(in_dir: str, template, model_cfg: vit.ViTConfig):
    meta_path = os.path.join(in_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: no model here")
    with open(meta_path) as f:
        meta = json.load(f)
    for k, v in model_cfg.to_dict().items():
        if k in vit.COMPUTE_FIELDS:
            continue  # how the model computes, not what it is
        if meta["model"].get(k) != v:
            raise ValueError(f"{meta_path}: model.{k} is {meta['model'].get(k)!r} but config.model.{k} "
                             f"is {v!r}: a model of another shape")
    with open(os.path.join(in_dir, PARAMS_FILE), "rb") as f:
        return flax.serialization.from_bytes(template, f.read()), meta


def file_bytes(in_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(in_dir, f)) for f in (PARAMS_FILE, META_FILE))


def save_backbone(out_dir: str, head_params, body_params, model_cfg: vit.ViTConfig, **meta) -> None:
    """Orbax checkpoint {'head', 'body'} plus backbone.json describing the model."""
    path = os.path.abspath(out_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), {"head": head_params, "body": body_params}, force=True)
    with open(os.path.join(path, "backbone.json"), "w") as f:
        json.dump({"model": model_cfg.to_dict(), **meta}, f, indent=1)


def load_backbone(in_dir: str, model_cfg: vit.ViTConfig):
    """Returns (head_params, body_params, meta); checks the model shape first."""
    path = os.path.abspath(in_dir)
    meta_path = os.path.join(path, "backbone.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: no backbone here (run --mode server first)")
    with open(meta_path) as f:
        meta = json.load(f)
    for k, v in model_cfg.to_dict().items():
        if k in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers"):
            continue  # the projection head is not part of the backbone
        if k in vit.COMPUTE_FIELDS:
            continue  # how the model computes, not what it is
        if meta["model"].get(k) != v:
            raise ValueError(f"{meta_path}: model.{k} is {meta['model'].get(k)!r} but config.model.{k} "
                             f"is {v!r}: a backbone of another model")
    template = {"head": vit.init_head(model_cfg, jax.random.key(0)),
                "body": vit.init_student(model_cfg, jax.random.key(0))["body"]}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"), abstract)
    return params["head"], params["body"], meta
