"""The site's only computation: images -> head -> secret per-image permutation -> token subset.

The head (patch embedding + position embedding) is fixed and distributed before the round, as a file
with a fingerprint that every shard manifest repeats. The permutation keys come from a site key that
is never written: from `os.urandom` (`encrypt.key_source='urandom'`, what a real site should use) or
derived from the config seed and the site name (`'seed'`, reproducible runs).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.models import vit

HEAD_FILE = "head.msgpack"
HEAD_META = "head.json"
HEAD_FIELDS = ("image_size", "patch_size", "channels", "embed_dim", "pos_embed")


def head_fingerprint(cfg: vit.ViTConfig, head_params) -> str:
    """SHA-256 over the head's shape fields and its parameter bytes, in a fixed order."""
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in HEAD_FIELDS}, sort_keys=True).encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(head_params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf, np.float32)
        h.update(jax.tree_util.keystr(path).encode() + str(arr.shape).encode() + arr.tobytes())
    return h.hexdigest()


def save_head(head_dir: str, cfg: vit.ViTConfig, head_params) -> str:
    os.makedirs(head_dir, exist_ok=True)
    fp = head_fingerprint(cfg, head_params)
    data = flax.serialization.to_bytes(jax.device_get(head_params))
    tmp = os.path.join(head_dir, HEAD_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(head_dir, HEAD_FILE))
    with open(os.path.join(head_dir, HEAD_META), "w") as f:
        json.dump({"fingerprint": fp, **{k: getattr(cfg, k) for k in HEAD_FIELDS}}, f, indent=1)
    return fp


def load_head(head_dir: str, cfg: vit.ViTConfig):
    """Loads the distributed head; checks it fits the config's model and its fingerprint."""
    meta_path = os.path.join(head_dir, HEAD_META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: no head here (the server writes it in --mode encrypt "
                                "or all; copy the head/ folder to every site)")
    with open(meta_path) as f:
        meta = json.load(f)
    for k in HEAD_FIELDS:
        if meta.get(k) != getattr(cfg, k):
            raise ValueError(f"{meta_path}: field {k!r} is {meta.get(k)!r} but config.model.{k} is "
                             f"{getattr(cfg, k)!r}: this head belongs to another model")
    template = jax.device_get(vit.init_head(cfg, jax.random.key(0)))
    with open(os.path.join(head_dir, HEAD_FILE), "rb") as f:
        params = flax.serialization.from_bytes(template, f.read())
    if head_fingerprint(cfg, params) != meta["fingerprint"]:
        raise ValueError(f"{os.path.join(head_dir, HEAD_FILE)}: parameters do not match the fingerprint "
                         f"in {meta_path} (file corrupted or replaced)")
    return params, meta["fingerprint"]


def get_or_create_head(head_dir: str, cfg: vit.ViTConfig, key: jax.Array):
    if os.path.isfile(os.path.join(head_dir, HEAD_META)):
        return load_head(head_dir, cfg)
    params = jax.device_get(vit.init_head(cfg, key))
    return params, save_head(head_dir, cfg, params)


def site_key(key_source: str, seed: int, site_name: str) -> jax.Array:
    """The site's secret permutation key. Never written anywhere."""
    if key_source == "urandom":
        return jax.random.key(int.from_bytes(os.urandom(8), "little") >> 1)
    if key_source == "seed":
        base = jax.random.fold_in(jax.random.key(seed), 0x5EC12E7)
        return jax.random.fold_in(base, zlib.crc32(site_name.encode()) & 0x7FFFFFFF)
    raise ValueError(f"config.encrypt.key_source: expected 'urandom' or 'seed', got {key_source!r}")


def normalize(images, mean: float, std: float):
    return (images - mean) / std


@functools.partial(jax.jit, static_argnames=("cfg", "keep"))
def _encrypt_batch(head_params, images, keys, cfg: vit.ViTConfig, keep: int):
    tokens = vit.PatchHead(cfg).apply({"params": head_params}, images)
    order = jax.vmap(lambda k: jax.random.permutation(k, cfg.num_patches)[:keep])(keys)
    return jnp.take_along_axis(tokens, order[..., None], axis=1)


def encrypt_images(head_params, cfg: vit.ViTConfig, images: np.ndarray, key: jax.Array, *,
                   keep_ratio: float = 1.0, mean: float = 0.5, std: float = 0.25,
                   batch_size: int = 256) -> np.ndarray:
    """images [N, H, W, C] in [0, 1] -> encrypted tokens [N, keep, D] float32. Image i is permuted
    with fold_in(key, i): a fresh permutation per image."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"config.encrypt.keep_ratio: expected a fraction in (0, 1], got {keep_ratio}")
    keep = max(1, int(round(keep_ratio * cfg.num_patches)))
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalize(np.asarray(images[start:start + batch_size], np.float32), mean, std)
        ids = jnp.arange(start, start + len(batch))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        out.append(np.asarray(_encrypt_batch(head_params, batch, keys, cfg, keep)))
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _plain_tokens(head_params, images, cfg: vit.ViTConfig):
    return vit.PatchHead(cfg).apply({"params": head_params}, images)


def plain_tokens(head_params, cfg: vit.ViTConfig, images: np.ndarray, mean: float, std: float) -> jax.Array:
    """Head output in raster order (what a site computes for its own evaluation)."""
    return _plain_tokens(head_params, normalize(np.asarray(images, np.float32), mean, std), cfg)
