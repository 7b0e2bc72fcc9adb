"""The run's initial weights: seeded random, or from `config.model.init_from` (docs/pretrained.md).

init_from names a timm/DINO ViT state dict (.pth/.pt/.bin, .safetensors, .npz) or an msd_jax
backbone folder (or a work directory holding backbone/). The body comes from it whole; the fixed
head the sites use takes the file's patch embedding and position table where their shapes fit the
model (position table resized to the grid, RGB filters folded to grayscale), the rest of the head
stays seeded random. Every protocol and baseline starts from `initial_head` and `initial_student`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import numpy as np

from msd_jax import trust
from msd_jax.models import state_files, timm_layout, vit
from msd_jax.encryption import modes as modes_lib
from msd_jax.protocols import model_io
from msd_jax.training import train

BACKBONE_META = "backbone.json"


def backbone_dir(path: str) -> Optional[str]:
    """The msd_jax backbone folder at `path` (itself or path/backbone), or None."""
    for cand in (path, os.path.join(path, "backbone")):
        if os.path.isfile(os.path.join(cand, BACKBONE_META)) and os.path.isdir(os.path.join(cand, "params")):
            return cand
    return None


def backbone_state(folder: str):
    """(timm-layout state dict of an msd_jax backbone, whether its head is real). A backbone of a
    secret encryption mode holds a zero placeholder head: then only its body is usable."""
    meta_path = os.path.join(folder, BACKBONE_META)
    meta = trust.read_json(meta_path, "the backbone's description")
    saved = meta.get("model")
    fields = {f.name for f in dataclasses.fields(vit.ViTConfig)}
    if not isinstance(saved, dict) or not fields <= set(saved):
        raise trust.InputError(f"{meta_path}: field 'model' is {saved!r}, expected the model's fields "
                               f"{sorted(fields)}")
    try:
        cfg = vit.ViTConfig(**{k: saved[k] for k in fields}).validate()
    except (TypeError, ValueError) as e:
        raise trust.InputError(f"{meta_path}: field 'model' is not a valid model: {e}") from None
    head, body, meta = model_io.load_backbone(folder, cfg)
    try:
        secret = modes_lib.EncryptionMode.parse(meta.get("encrypt_mode", modes_lib.PAPER)).secret_transform
    except ValueError as e:
        raise trust.InputError(f"{meta_path}: field 'encrypt_mode': {e}") from None
    return timm_layout.to_timm(cfg, jax.device_get(head), jax.device_get(body)), not secret


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp: tuple, model: vit.ViTConfig) -> timm_layout.Imported:
    folder = backbone_dir(path)
    if folder is not None:
        state, head_is_real = backbone_state(folder)
        imported = timm_layout.from_timm(model, state, folder)
        if not head_is_real:
            imported.head = {}
            imported.notes.append("the backbone's encryption mode kept its head secret: body only")
        return imported
    if os.path.isdir(path):
        raise trust.InputError(f"{path}: config.model.init_from is a folder but not an msd_jax backbone "
                               f"({BACKBONE_META} + params/, or a work directory holding backbone/)")
    return timm_layout.from_timm(model, state_files.read_state_dict(path), path)


def load_init(config, model: vit.ViTConfig) -> Optional[timm_layout.Imported]:
    """What config.model.init_from gives for `model` (None when it is ''), read once per file."""
    path = config.model.get("init_from", "")
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    stamp = (os.path.getmtime(path), os.path.getsize(path)) if os.path.exists(path) else ()
    return _load(path, stamp, _shape_only(model))


def _shape_only(model: vit.ViTConfig) -> vit.ViTConfig:
    """The model with its compute fields fixed, so one read serves every compute setting."""
    return dataclasses.replace(model, dtype="float32", matmul_dtype="float32")


def describe(config, model: vit.ViTConfig) -> str:
    """One line for the log: what init_from loaded and adapted ('' without init_from)."""
    imported = load_init(config, model)
    if imported is None:
        return ""
    head = ", ".join(sorted(imported.head)) or "nothing"
    notes = "; ".join(imported.notes)
    return (f"initial weights from {config.model.init_from}: body, head {head}"
            + (f" ({notes})" if notes else ""))


def initial_head(config, model: vit.ViTConfig) -> dict:
    """The fixed head before encryption: the seeded random head (party 'head') with the parts
    init_from provides put in."""
    head = jax.device_get(vit.init_head(model, train.party_key(config.seed, "head")))
    imported = load_init(config, model)
    if imported is not None:
        head = {**head, **{k: jax.tree_util.tree_map(np.asarray, v) for k, v in imported.head.items()}}
    return head


def initial_student(config, model: vit.ViTConfig, num_heads_out: int = 1) -> dict:
    """The initial student: seeded random (party 'init'), its body from init_from when set (the
    DINO projection heads stay seeded random)."""
    student = train.init_student_params(config, model, num_heads_out)
    imported = load_init(config, model)
    if imported is not None:
        student = {**student, "body": jax.tree_util.tree_map(np.asarray, imported.body)}
    return student
