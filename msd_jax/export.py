"""Export the trained backbone (fixed head + body, no DINO head) in timm's ViT layout.

    python -m msd_jax.export --checkpoint DIR --format {npz,torch} [--out FILE]

DIR is a backbone folder written by `model_io.save_backbone` (backbone.json + params/) or a work
directory holding one in backbone/. Both formats use the state-dict names of
`timm.models.vision_transformer.VisionTransformer` (class token, no register tokens, qkv bias,
final norm, `num_classes=0`, `global_pool='token'`); docs/export.md describes the layout, the
preprocessing and how to load it. The torch format needs only torch, imported when used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np

from msd_jax.trust import InputError
from msd_jax.protocols import model_io
from msd_jax.models import timm_layout, vit
from msd_jax.encryption import modes as modes_lib

FORMATS = ("npz", "torch")
DEFAULT_NAMES = {"npz": "timm_vit.npz", "torch": "timm_vit.pt"}
BACKBONE_META = "backbone.json"
FEATURE = ("CLS token of the final LayerNorm output (timm: model(x) with num_classes=0 and "
           "global_pool='token', i.e. forward_features(x)[:, 0]); the 'avgpool' feature of "
           "msd_jax.evaluation is forward_features(x)[:, 1:].mean(1), 'cls_avgpool' their concatenation")


class ExportError(ValueError):
    pass


def resolve_backbone_dir(path: str) -> str:
    """The backbone folder itself, or WORKDIR/backbone; anything else is an error."""
    path = os.path.abspath(path)
    for cand in (path, os.path.join(path, "backbone")):
        if os.path.isfile(os.path.join(cand, BACKBONE_META)) and os.path.isdir(os.path.join(cand, "params")):
            return cand
    if not os.path.isdir(path):
        raise ExportError(f"--checkpoint {path}: no such folder")
    raise ExportError(f"--checkpoint {path}: neither a backbone folder ({BACKBONE_META} + params/, as "
                      f"written by --mode server) nor a work directory with backbone/{BACKBONE_META}")


def read_backbone(backbone_dir: str):
    """(ViTConfig, head params, body params, backbone.json dict) of a backbone folder."""
    meta_path = os.path.join(backbone_dir, BACKBONE_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{meta_path}: not valid JSON ({e})") from e
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict):
        raise ExportError(f"{meta_path}: field 'model' missing; expected the model description "
                          "(image_size, patch_size, embed_dim, ...)")
    fields = {f.name for f in dataclasses.fields(vit.ViTConfig)}
    unknown = sorted(set(model) - fields)
    if unknown:
        raise ExportError(f"{meta_path}: unknown model field(s) {unknown}; expected only {sorted(fields)}")
    try:
        cfg = vit.ViTConfig(**model).validate()
    except (TypeError, ValueError) as e:
        raise ExportError(f"{meta_path}: field 'model' is not a valid model: {e}") from e
    mode = meta.get("encrypt_mode", modes_lib.PAPER)
    try:
        secret = modes_lib.EncryptionMode.parse(mode).secret_transform
    except ValueError as e:
        raise ExportError(f"{meta_path}: field 'encrypt_mode': {e}") from e
    if secret:
        raise ExportError(f"{meta_path}: encrypt_mode {mode!r} keeps the head secret at the sites, so "
                          "this backbone holds only a zero placeholder head; a model without the "
                          "sites' head is not a usable backbone to export")
    head, body, meta = model_io.load_backbone(backbone_dir, cfg)
    return cfg, head, body, meta


def timm_state_dict(cfg: vit.ViTConfig, head_params, body_params) -> dict[str, np.ndarray]:
    """float32 arrays under timm VisionTransformer names, torch layout (models/timm_layout.py holds
    the mapping; `model.init_from` reads it back with its inverse)."""
    return timm_layout.to_timm(cfg, head_params, body_params)


def pixel_normalisation(meta: dict, meta_path: str, mean: Optional[float], std: Optional[float]):
    """(mean, std) applied to [0, 1] pixels before the head: the arguments, else backbone.json."""
    mean = meta.get("data_mean") if mean is None else mean
    std = meta.get("data_std") if std is None else std
    if mean is None or std is None:
        raise ExportError(f"{meta_path}: fields 'data_mean'/'data_std' (pixel normalisation) missing "
                          "(a backbone written before they were recorded); pass --mean and --std "
                          "(config.data.mean / config.data.std of the run)")
    if not float(std) > 0:
        raise ExportError(f"{meta_path}: data_std must be > 0, got {std!r}")
    return float(mean), float(std)


def export_meta(cfg: vit.ViTConfig, meta: dict, mean: float, std: float) -> dict:
    model = {k: v for k, v in cfg.to_dict().items()
             if k not in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers")}
    return {
        "format": "msd_jax backbone in timm VisionTransformer state-dict layout",
        "model": model,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "channels": cfg.channels,
        "num_features": cfg.embed_dim,
        "timm_kwargs": dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
                            num_classes=0, embed_dim=cfg.embed_dim, depth=cfg.depth,
                            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                            global_pool="token"),
        "input": "float32 [B, channels, image_size, image_size] (NCHW), pixels scaled to [0, 1] "
                 "(1 channel = grayscale), then (x - mean) / std",
        "mean": [mean] * cfg.channels, "std": [std] * cfg.channels,
        "feature": FEATURE,
        "protocol": meta.get("protocol"), "seed": meta.get("seed"),
    }


def _atomic(out: str, write) -> str:
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, out)
    return out


def write_npz(out: str, state: dict, meta: dict) -> str:
    """One array per state-dict name plus `meta`, a 0-d unicode array holding JSON (no pickle)."""
    if "meta" in state:
        raise ExportError("state dict has a 'meta' entry, which the npz format reserves")
    return _atomic(out, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **state))


def write_torch(out: str, state: dict, meta: dict) -> str:
    """A torch state dict (loads strict into timm's VisionTransformer) + OUT.json with the meta."""
    try:
        import torch  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ExportError("--format torch needs PyTorch: pip install torch") from e
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}  # a writable copy
    path = _atomic(out, lambda f: torch.save(tensors, f))
    _atomic(path + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return path


def export(checkpoint: str, fmt: str, out: Optional[str] = None, *, mean: Optional[float] = None,
           std: Optional[float] = None) -> str:
    """Writes the backbone of `checkpoint` as `fmt`; returns the written path."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {list(FORMATS)}, got {fmt!r}")
    backbone_dir = resolve_backbone_dir(checkpoint)
    cfg, head, body, meta = read_backbone(backbone_dir)
    mean, std = pixel_normalisation(meta, os.path.join(backbone_dir, BACKBONE_META), mean, std)
    state = timm_state_dict(cfg, head, body)
    info = export_meta(cfg, meta, mean, std)
    out = out or os.path.join(backbone_dir, DEFAULT_NAMES[fmt])
    return (write_npz if fmt == "npz" else write_torch)(out, state, info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msd_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="backbone folder (backbone.json + params/) or a work directory")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", default=None,
                        help=f"output file (default: DIR/{DEFAULT_NAMES['npz']} or DIR/{DEFAULT_NAMES['torch']})")
    parser.add_argument("--mean", type=float, default=None,
                        help="pixel mean, for backbones whose backbone.json lacks data_mean")
    parser.add_argument("--std", type=float, default=None,
                        help="pixel std, for backbones whose backbone.json lacks data_std")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.out, mean=args.mean, std=args.std)
    except (ExportError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
