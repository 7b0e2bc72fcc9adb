"""Token shards: what a site uploads. `.npy` files plus a JSON manifest with their SHA-256.

bfloat16 has no numpy dtype of its own in `.npy`, so bf16 shards hold the raw 16-bit patterns as
uint16 and the manifest says `"dtype": "bfloat16"`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Optional

import ml_dtypes
import numpy as np

from msd_jax.trust import InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


class ShardError(InputError):
    """A shard or manifest that cannot be trusted or read."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_storage(tokens: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in DTYPES:
        raise ShardError(f"config.encrypt.dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    arr = np.asarray(tokens).astype(DTYPES[dtype])
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


def _from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    return arr.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else arr


def write_shards(out_dir: str, site: str, tokens: np.ndarray, *, dtype: str, head_fingerprint: str,
                 shard_size: int = 1024, extra: Optional[dict] = None) -> dict:
    """Writes tokens [N, n, D] as shards + manifest into `out_dir`, atomically (a temp folder renamed
    into place, so a killed run never leaves a half-written site). Returns the manifest."""
    if tokens.ndim != 3 or len(tokens) == 0:
        raise ShardError(f"{out_dir}: expected tokens [num_images > 0, tokens, dim], got {tokens.shape}")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-shards-", dir=parent)
    try:
        files = []
        for i, start in enumerate(range(0, len(tokens), shard_size)):
            name = f"tokens-{i:05d}.npy"
            path = os.path.join(tmp, name)
            chunk = _to_storage(tokens[start:start + shard_size], dtype)
            np.save(path, chunk, allow_pickle=False)
            files.append({"file": name, "num_images": int(len(chunk)), "sha256": sha256_file(path),
                          "bytes": os.path.getsize(path)})
        manifest = {
            "format_version": FORMAT_VERSION,
            "site": site,
            "num_images": int(len(tokens)),
            "tokens_per_image": int(tokens.shape[1]),
            "embed_dim": int(tokens.shape[2]),
            "dtype": dtype,
            "head_fingerprint": head_fingerprint,
            "shards": files,
            **(extra or {}),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: manifest not found (expected the output of --mode encrypt)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    for field in ("site", "num_images", "tokens_per_image", "embed_dim", "dtype", "head_fingerprint",
                  "shards"):
        if field not in manifest:
            raise ShardError(f"{path}: field {field!r} missing")
    if manifest["dtype"] not in DTYPES:
        raise ShardError(f"{path}: field 'dtype' is {manifest['dtype']!r}, expected one of {sorted(DTYPES)}")
    if not isinstance(manifest["shards"], list) or not manifest["shards"]:
        raise ShardError(f"{path}: field 'shards' is empty, expected a list of shard entries")
    for i, entry in enumerate(manifest["shards"]):
        missing = [k for k in ("file", "num_images", "sha256", "bytes") if k not in entry]
        if missing:
            raise ShardError(f"{path}: shards[{i}] lacks field(s) {missing}")
    return manifest


def load_shards(shard_dir: str, expected_fingerprint: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Verifies every shard's SHA-256 (and the head fingerprint when given) and returns
    (tokens [N, n, D] in the stored dtype, manifest)."""
    manifest = read_manifest(shard_dir)
    mpath = os.path.join(shard_dir, MANIFEST)
    if expected_fingerprint is not None and manifest["head_fingerprint"] != expected_fingerprint:
        raise ShardError(f"{mpath}: field 'head_fingerprint' is {manifest['head_fingerprint'][:16]}..., "
                         f"expected {expected_fingerprint[:16]}... (the shards were encrypted with "
                         "another head than this server's; re-encrypt with the distributed head)")
    chunks = []
    shape = (manifest["tokens_per_image"], manifest["embed_dim"])
    for entry in manifest["shards"]:
        path = os.path.join(shard_dir, entry["file"])
        if not os.path.isfile(path):
            raise ShardError(f"{path}: shard listed in {mpath} is missing")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: SHA-256 {digest[:16]}... does not match the manifest's "
                             f"{entry['sha256'][:16]}... (corrupted or altered in transit)")
        arr = np.load(path, allow_pickle=False)
        stored = np.dtype(np.uint16) if manifest["dtype"] == "bfloat16" else np.dtype(DTYPES[manifest["dtype"]])
        if arr.dtype != stored:
            raise ShardError(f"{path}: stored dtype {arr.dtype}, but the manifest's field 'dtype' is "
                             f"{manifest['dtype']!r} (expected stored dtype {stored})")
        if arr.shape != (entry["num_images"],) + shape:
            raise ShardError(f"{path}: shape {arr.shape}, expected {(entry['num_images'],) + shape}")
        chunks.append(_from_storage(arr, manifest["dtype"]))
    tokens = np.concatenate(chunks)
    if len(tokens) != manifest["num_images"]:
        raise ShardError(f"{mpath}: field 'num_images' is {manifest['num_images']}, shards hold {len(tokens)}")
    return tokens, manifest


def shard_bytes(shard_dir: str) -> int:
    """Bytes a site uploads: every shard plus the manifest, as they are on disk."""
    manifest = read_manifest(shard_dir)
    return sum(e["bytes"] for e in manifest["shards"]) + os.path.getsize(os.path.join(shard_dir, MANIFEST))
