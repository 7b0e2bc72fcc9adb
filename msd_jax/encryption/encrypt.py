"""The site's only computation: images -> head -> secret per-image permutation -> token subset.

The head (patch embedding + position embedding) is fixed before the round. In `paper` and `masked`
modes it is public: the server writes it to head/ and every shard manifest repeats its fingerprint.
In the secret modes (`secret_head`, `feature_perm`, see msd_jax/encryption/modes.py) the head the sites
apply is derived from a key the sites share (`shared_key`) and never leaves them; the server only
receives head/transform.json (mode + the transform's SHA-256 fingerprint), and evaluation applies the
head at the site side (`eval_head`). The permutation keys come from a site key that is never
written: from `os.urandom` (`encrypt.key_source='urandom'`, what a real site should use) or derived
from the config seed and the site name (`'seed'`, reproducible runs).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax import trust
from msd_jax.models import params_file, vit
from msd_jax.encryption import modes as modes_lib

TRANSFORM_META = "transform.json"  # secret modes: what the sites tell the server (no parameters)
SECRET_DIR = "site_secret"         # default home of the sites' shared key file (never sent)
SHARED_KEY_BYTES = 32
HEAD_FILE = "head.msgpack"
HEAD_META = "head.json"
HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(vit.HeadConfig))


def head_fingerprint(cfg: vit.ViTConfig, head_params) -> str:
    """SHA-256 over the head's shape fields and its parameter bytes, in a fixed order."""
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in HEAD_FIELDS}, sort_keys=True).encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(head_params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf, np.float32)
        h.update(jax.tree_util.keystr(path).encode() + str(arr.shape).encode() + arr.tobytes())
    return h.hexdigest()


def save_head(head_dir: str, cfg: vit.ViTConfig, head_params) -> str:
    fp = head_fingerprint(cfg, head_params)
    params_file.save(head_dir, HEAD_FILE, head_params, HEAD_META,
                     {"fingerprint": fp, **{k: getattr(cfg, k) for k in HEAD_FIELDS}})
    return fp


def load_head(head_dir: str, cfg: vit.ViTConfig):
    """Loads the distributed head; checks it fits the config's model and its fingerprint."""
    meta_path = os.path.join(head_dir, HEAD_META)
    if not os.path.isfile(meta_path):
        raise trust.InputError(f"{meta_path}: no head here (the server writes it in --mode encrypt "
                               "or all; copy the head/ folder to every site)")
    meta = trust.read_json(meta_path, "the head's description (fingerprint and shape fields)")
    for k in HEAD_FIELDS:
        if meta.get(k) != getattr(cfg, k):
            raise trust.InputError(f"{meta_path}: field {k!r} is {meta.get(k)!r} but config.model.{k} is "
                                   f"{getattr(cfg, k)!r}: this head belongs to another model")
    template = jax.device_get(vit.init_head(cfg, jax.random.key(0)))
    params = params_file.load(os.path.join(head_dir, HEAD_FILE), template)
    if head_fingerprint(cfg, params) != meta.get("fingerprint"):
        raise trust.InputError(f"{os.path.join(head_dir, HEAD_FILE)}: parameters do not match the "
                               f"fingerprint in {meta_path} (file corrupted or replaced)")
    return params, meta["fingerprint"]


def get_or_create_head(head_dir: str, cfg: vit.ViTConfig, key: jax.Array, initial=None):
    """The head in head_dir, else a new one written there: `initial` (e.g. pretrained weights,
    see protocols/pretrained.py) or, without it, drawn from `key`."""
    if os.path.isfile(os.path.join(head_dir, HEAD_META)):
        return load_head(head_dir, cfg)
    params = jax.device_get(vit.init_head(cfg, key)) if initial is None else initial
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


def _orders(keys, num_patches: int, keep: int):
    return jax.vmap(lambda k: jax.random.permutation(k, num_patches)[:keep])(keys)


NOISE_TAG = 0x9051  # the per-image noise key is fold_in(the image's permutation key, NOISE_TAG)


def position_noise_scale(head_params, relative_std: float) -> float:
    """The std of the 'pos_noise' token noise: relative_std x the std of the head's position table."""
    return float(relative_std) * float(np.std(np.asarray(head_params["pos_embed"], np.float64)))


def image_noise(image_key: jax.Array, shape: tuple) -> jax.Array:
    """The unit gaussian 'pos_noise' draw of one image (raster order), from its permutation key."""
    return jax.random.normal(jax.random.fold_in(image_key, NOISE_TAG), shape)


@functools.partial(jax.jit, static_argnames=("cfg", "keep"))
def _encrypt_batch(head_params, images, keys, noise_scale, cfg: vit.ViTConfig, keep: int):
    tokens = vit.PatchHead(cfg).apply({"params": head_params}, images)
    noise = jax.vmap(lambda k: image_noise(k, tokens.shape[1:]))(keys)
    tokens = tokens + noise_scale * noise
    order = _orders(keys, cfg.num_patches, keep)
    return jnp.take_along_axis(tokens, order[..., None], axis=1)


def keep_count(keep_ratio: float, num_patches: int) -> int:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"config.encrypt.keep_ratio: expected a fraction in (0, 1], got {keep_ratio}")
    return max(1, int(round(keep_ratio * num_patches)))


def token_shape(encrypt_cfg, cfg: vit.ViTConfig, mode: modes_lib.EncryptionMode) -> tuple[int, int]:
    """(tokens per image, embed dim) of what a site uploads in `mode`: the shape every manifest
    must declare."""
    return keep_count(mode.upload_keep_ratio(encrypt_cfg), cfg.num_patches), cfg.embed_dim


def token_positions(key: jax.Array, num_images: int, num_patches: int, keep_ratio: float = 1.0,
                    start: int = 0) -> np.ndarray:
    """[num_images, keep] raster positions of the tokens `encrypt_images` emits for images
    start..start+num_images under `key` (the ground truth an audit scores attacks against)."""
    keep = keep_count(keep_ratio, num_patches)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + num_images))
    return np.asarray(jax.jit(_orders, static_argnums=(1, 2))(keys, num_patches, keep))


def encrypt_images(head_params, cfg: vit.ViTConfig, images: np.ndarray, key: jax.Array, *,
                   keep_ratio: float = 1.0, mean: float = 0.5, std: float = 0.25,
                   batch_size: int = 256, pos_noise_std: float = 0.0) -> np.ndarray:
    """images [N, H, W, C] in [0, 1] -> encrypted tokens [N, keep, D] float32. Image i is permuted
    with fold_in(key, i): a fresh permutation per image. With pos_noise_std > 0, every token (raster
    order, before the permutation) gets gaussian noise of std position_noise_scale(head,
    pos_noise_std) drawn from fold_in(fold_in(key, i), NOISE_TAG): a fresh position jitter."""
    keep = keep_count(keep_ratio, cfg.num_patches)
    noise_scale = jnp.float32(position_noise_scale(head_params, pos_noise_std))
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalize(np.asarray(images[start:start + batch_size], np.float32), mean, std)
        ids = jnp.arange(start, start + len(batch))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        out.append(np.asarray(_encrypt_batch(head_params, batch, keys, noise_scale, cfg, keep)))
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _plain_tokens(head_params, images, cfg: vit.ViTConfig):
    return vit.PatchHead(cfg).apply({"params": head_params}, images)


def plain_tokens(head_params, cfg: vit.ViTConfig, images: np.ndarray, mean: float, std: float) -> jax.Array:
    """Head output in raster order (what a site computes for its own evaluation)."""
    return _plain_tokens(head_params, normalize(np.asarray(images, np.float32), mean, std), cfg)


# ---------------------------------------------------------------------------------------------
# Encryption modes: the head transform the sites apply (see msd_jax/encryption/modes.py)
# ---------------------------------------------------------------------------------------------
def _key_from_bytes(data: bytes) -> jax.Array:
    """A jax key from secret bytes: the first 8 seed it, every further 4 are folded in."""
    key = jax.random.key(int.from_bytes(data[:8], "little") >> 1)
    for i in range(8, len(data) - 3, 4):
        key = jax.random.fold_in(key, int.from_bytes(data[i:i + 4], "little"))
    return key


def shared_key_path(encrypt_cfg, workdir: str) -> str:
    """Where the sites keep their shared key file: encrypt.shared_key_file, or
    <workdir>/site_secret/shared_key (a site-side folder: never copy it to the server)."""
    return encrypt_cfg.shared_key_file or os.path.join(workdir, SECRET_DIR, "shared_key")


def shared_key(source: str, seed: int, key_file: str = "") -> jax.Array:
    """The key every site shares for the secret head and the channel permutation. Never written
    outside `key_file`. 'seed': derived from the config seed (reproducible experiments; anyone with
    the config has it). 'urandom': 32 bytes from os.urandom kept in `key_file`, created by the first
    site and copied to the other sites out of band (never to the server)."""
    if source == "seed":
        return jax.random.fold_in(jax.random.key(seed), 0x5A4ED)
    if source != "urandom":
        raise ValueError(f"config.encrypt.shared_key_source: expected 'seed' or 'urandom', got {source!r}")
    if not key_file:
        raise ValueError("config.encrypt.shared_key_file: expected the path of the sites' shared key file "
                         "with shared_key_source='urandom'")
    if not os.path.isfile(key_file):
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SHARED_KEY_BYTES))
    with open(key_file, "rb") as f:
        data = f.read()
    if len(data) != SHARED_KEY_BYTES:
        raise ValueError(f"{key_file}: the shared key file holds {len(data)} bytes, expected "
                         f"{SHARED_KEY_BYTES} (written by the first site with os.urandom)")
    return _key_from_bytes(data)


def random_orthogonal(key: jax.Array, dim: int) -> np.ndarray:
    """A Haar-random orthogonal matrix [dim, dim] (QR of a Gaussian matrix, signs fixed)."""
    a = np.asarray(jax.random.normal(key, (dim, dim), jnp.float32), np.float64)
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None]


def secret_head_params(cfg: vit.ViTConfig, key: jax.Array):
    """A head only the key holders know: a fresh patch embedding, and the position embedding
    rotated by a secret orthogonal matrix (sincos: the positions' geometry, their inner products, is
    kept, their coordinates are secret) or drawn fresh (random)."""
    params = jax.device_get(vit.init_head(cfg, jax.random.fold_in(key, 1)))
    if cfg.pos_embed == "sincos":
        rot = random_orthogonal(jax.random.fold_in(key, 2), cfg.embed_dim)
        pos = vit.sincos_pos_embed(cfg.embed_dim, cfg.grid).astype(np.float64) @ rot
        params = {**params, "pos_embed": pos[None].astype(np.float32)}
    return params


def channel_permutation(cfg: vit.ViTConfig, key: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, 3), cfg.embed_dim))


def permute_channels(head_params, perm: np.ndarray):
    """The head whose output is the given head's output with channels reordered: out[..., perm]."""
    pe = head_params["patch_embed"]
    return {"patch_embed": {"kernel": np.asarray(pe["kernel"])[:, perm],
                            "bias": np.asarray(pe["bias"])[perm]},
            "pos_embed": np.asarray(head_params["pos_embed"])[..., perm]}


def transform_head(mode: modes_lib.EncryptionMode, cfg: vit.ViTConfig, public_head, key):
    """The head the sites apply in `mode`: the public head, or one derived from the shared `key`
    (secret_head), with the channels permuted by the key (feature_perm). `key` may be None when the
    mode has no secret part; `public_head` may be None when the mode has secret_head."""
    if mode.secret_transform and key is None:
        raise ValueError(f"encryption mode {mode.name!r} needs the sites' shared key")
    head = secret_head_params(cfg, key) if mode.secret_head else jax.device_get(public_head)
    if mode.feature_perm:
        head = permute_channels(head, channel_permutation(cfg, key))
    return head


def site_head(config, cfg: vit.ViTConfig, mode: modes_lib.EncryptionMode, workdir: str,
              public_key: jax.Array = None, initial_head=None):
    """(head params, fingerprint) the sites apply in `mode`. A public head comes from
    <workdir>/head/ (created the first time from `initial_head`, else from `public_key`: the
    server's job before the round);
    a secret one from the sites' shared key (config.encrypt's settings and config.seed). Writes
    nothing but the public head."""
    e = config.encrypt
    head_dir = os.path.join(workdir, "head")
    public = None
    if not mode.secret_head:
        if public_key is None:
            public, _ = load_head(head_dir, cfg)
        else:
            public, _ = get_or_create_head(head_dir, cfg, public_key, initial_head)
    key = None
    if mode.secret_transform:
        key = shared_key(modes_lib.resolve_shared_key_source(e), config.seed, shared_key_path(e, workdir))
    head = transform_head(mode, cfg, public, key)
    return head, head_fingerprint(cfg, head)


SAME_MODE = ("every party must run the same encrypt.mode; 'auto' follows encrypt.key_source, so set "
             "key_source in the config every party uses, or name the mode")


def write_transform(head_dir: str, cfg: vit.ViTConfig, mode: modes_lib.EncryptionMode,
                    fingerprint: str) -> None:
    """Secret modes: the sites' note to the server (mode and fingerprint, no parameters)."""
    os.makedirs(head_dir, exist_ok=True)
    path = os.path.join(head_dir, TRANSFORM_META)
    with open(path + ".tmp", "w") as f:
        json.dump({"mode": mode.name, "fingerprint": fingerprint,
                   **{k: getattr(cfg, k) for k in HEAD_FIELDS}}, f, indent=1)
    os.replace(path + ".tmp", path)


def expected_fingerprint(mode: modes_lib.EncryptionMode, head_dir: str, cfg: vit.ViTConfig) -> str:
    """The fingerprint the server checks every shard against: the public head's (head/head.json)
    or, in a secret mode, the one the sites sent (head/transform.json)."""
    path = os.path.join(head_dir, TRANSFORM_META)
    if not mode.secret_transform:
        if os.path.isfile(path):
            got = trust.read_json(path, "the sites' transform note").get("mode")
            raise trust.InputError(f"{path}: field 'mode' is {got!r}, but config.encrypt.mode is {mode.name!r} "
                                   f"(the sites encrypted with a secret transform; use their mode. {SAME_MODE})")
        return load_head(head_dir, cfg)[1]
    if not os.path.isfile(path):
        raise trust.InputError(f"{path}: no transform fingerprint here (config.encrypt.mode={mode.name!r} "
                                "is a secret mode: the sites write it in --mode encrypt)")
    meta = trust.read_json(path, "the sites' transform note (mode, fingerprint, head fields)")
    if meta.get("mode") != mode.name:
        raise trust.InputError(f"{path}: field 'mode' is {meta.get('mode')!r}, but config.encrypt.mode is "
                               f"{mode.name!r} ({SAME_MODE})")
    for k in HEAD_FIELDS:
        if meta.get(k) != getattr(cfg, k):
            raise trust.InputError(f"{path}: field {k!r} is {meta.get(k)!r} but config.model.{k} is "
                             f"{getattr(cfg, k)!r}")
    if not isinstance(meta.get("fingerprint"), str):
        raise trust.InputError(f"{path}: field 'fingerprint' is {meta.get('fingerprint')!r}, expected "
                               "the 64 hex digits of the transform's SHA-256")
    return meta["fingerprint"]


def server_head(mode: modes_lib.EncryptionMode, head_dir: str, cfg: vit.ViTConfig):
    """The head the server stores in backbone/: the public head, or in a secret mode a zero
    placeholder (the server never has the sites' head; eval_head puts it back at the site side)."""
    if mode.secret_transform:
        expected_fingerprint(mode, head_dir, cfg)
        return jax.tree_util.tree_map(np.zeros_like, jax.device_get(vit.init_head(cfg, jax.random.key(0))))
    return load_head(head_dir, cfg)[0]


def eval_head(config, cfg: vit.ViTConfig, mode: modes_lib.EncryptionMode, workdir: str, backbone_head):
    """The head a site applies to its own images for evaluation: the backbone's (public) head, or
    in a secret mode the site's own head, checked against the fingerprint the server holds."""
    if not mode.secret_transform:
        return backbone_head
    head, fp = site_head(config, cfg, mode, workdir)
    expected = expected_fingerprint(mode, os.path.join(workdir, "head"), cfg)
    if fp != expected:
        raise ValueError(f"{os.path.join(workdir, 'head', TRANSFORM_META)}: field 'fingerprint' is "
                         f"{expected[:16]}..., but this site's head (config.encrypt.shared_key_source="
                         f"{config.encrypt.shared_key_source!r}) has {fp[:16]}...: another shared key")
    return head
