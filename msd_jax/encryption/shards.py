"""Token shards: what a site uploads. `.npy` files plus a JSON manifest with their SHA-256.

bfloat16 has no numpy dtype of its own in `.npy`, so bf16 shards hold the raw 16-bit patterns as
uint16 and the manifest says `"dtype": "bfloat16"`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import ml_dtypes
import numpy as np

from msd_jax import trust
from msd_jax.trust import InputError

MANIFEST = "manifest.json"
SHARD_FILE = "tokens-{:05d}.npy"
SHARD_NAME = re.compile(r"tokens-\d{5,}\.npy")
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
            name = SHARD_FILE.format(i)
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
        remove_own_shards(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _field(path: str, manifest: dict, name: str, kind, minimum=None):
    """manifest[name], which must be of `kind` (an int field never a bool) and >= minimum."""
    value = manifest.get(name)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and minimum is not None and value < minimum:
        ok = False
    if not ok:
        what = {int: "an integer", str: "a string", list: "a list"}[kind]
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ShardError(f"{path}: field {name!r} is {value!r}, expected {what}{bound}")
    return value


def remove_own_shards(out_dir: str) -> None:
    """Deletes a shard folder this tool wrote (a manifest and tokens-NNNNN.npy files, nothing else);
    refuses, deleting nothing, a symlink or a folder holding anything else."""
    if not os.path.lexists(out_dir):
        return
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise ShardError(f"{out_dir}: exists and is not a shard folder this tool wrote (a symlink or a "
                         "file); it is left untouched: move it away or choose another site name")
    entries = os.listdir(out_dir)
    foreign = [e for e in entries if not (e == MANIFEST or SHARD_NAME.fullmatch(e))
               or os.path.islink(os.path.join(out_dir, e)) or not os.path.isfile(os.path.join(out_dir, e))]
    if foreign:
        raise ShardError(f"{out_dir}: holds {sorted(foreign)[:5]}, which this tool did not write; the "
                         "folder is left untouched: move them away or choose another site name")
    for e in entries:
        os.remove(os.path.join(out_dir, e))
    os.rmdir(out_dir)


def read_manifest(shard_dir: str) -> dict:
    """The manifest of a site's shard folder, every field checked for presence and type."""
    path = os.path.join(shard_dir, MANIFEST)
    try:
        manifest = trust.read_json(path, "the manifest --mode encrypt writes, an object with the fields "
                                   "site, num_images, tokens_per_image, embed_dim, dtype, head_fingerprint, "
                                   "shards")
    except trust.InputError as e:
        raise ShardError(str(e)) from None
    for field in ("site", "num_images", "tokens_per_image", "embed_dim", "dtype", "head_fingerprint",
                  "shards"):
        if field not in manifest:
            raise ShardError(f"{path}: field {field!r} missing")
    _field(path, manifest, "site", str)
    _field(path, manifest, "head_fingerprint", str)
    for field in ("num_images", "tokens_per_image", "embed_dim"):
        _field(path, manifest, field, int, 1)
    if manifest["dtype"] not in DTYPES:
        raise ShardError(f"{path}: field 'dtype' is {manifest['dtype']!r}, expected one of {sorted(DTYPES)}")
    if not isinstance(manifest["shards"], list) or not manifest["shards"]:
        raise ShardError(f"{path}: field 'shards' is {manifest['shards']!r}, expected a non-empty list "
                         "of shard entries")
    for i, entry in enumerate(manifest["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ShardError(f"{where} is {entry!r}, expected an object with file, num_images, sha256, bytes")
        missing = [k for k in ("file", "num_images", "sha256", "bytes") if k not in entry]
        if missing:
            raise ShardError(f"{where} lacks field(s) {missing}")
        _field(where, entry, "file", str)
        _field(where, entry, "num_images", int, 1)
        _field(where, entry, "bytes", int, 0)
        if not isinstance(entry["sha256"], str) or len(entry["sha256"]) != 64:
            raise ShardError(f"{where}: field 'sha256' is {entry['sha256']!r}, expected 64 hex digits")
    listed = sum(e["num_images"] for e in manifest["shards"])
    if listed != manifest["num_images"]:
        raise ShardError(f"{path}: field 'num_images' is {manifest['num_images']}, but its shards list "
                         f"{listed} images")
    return manifest


def check_against_model(shard_dir: str, manifest: dict, *, tokens_per_image: int, embed_dim: int) -> None:
    """The manifest's token shape must be what this server's model and encryption mode expect."""
    path = os.path.join(shard_dir, MANIFEST)
    for field, want in (("embed_dim", embed_dim), ("tokens_per_image", tokens_per_image)):
        if manifest[field] != want:
            raise ShardError(f"{path}: field {field!r} is {manifest[field]}, expected {want} (this "
                             "server's config.model and encryption mode; the site encrypted with "
                             "another model or keep ratio)")


def _shard_path(shard_dir: str, mpath: str, i: int, entry: dict) -> str:
    """A shard entry's file: a regular file inside the shard folder, of the size the manifest says."""
    path = trust.inside(shard_dir, entry["file"], f"{mpath}: shards[{i}].file")
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard listed in {mpath} is missing")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ShardError(f"{path}: {size} bytes, but {mpath} says shards[{i}].bytes = {entry['bytes']} "
                         "(truncated or altered in transit)")
    return path


def _read_npy(path: str, stored: np.dtype, shape: tuple) -> np.ndarray:
    """The array of a `.npy` file whose header must say `stored` and `shape` before any data is read
    (a header may claim any size); never unpickles."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ShardError(f"{path}: .npy format version {version}, expected 1.0 or 2.0")
            h_shape, fortran, h_dtype = readers[version](f)
            if h_dtype != stored or tuple(h_shape) != shape or fortran:
                raise ShardError(f"{path}: .npy header says dtype {h_dtype}, shape {tuple(h_shape)}"
                                 f"{', Fortran order' if fortran else ''}; expected dtype {stored}, "
                                 f"shape {shape} (the manifest's dtype, tokens_per_image and embed_dim)")
        return np.load(path, allow_pickle=False)
    except ShardError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise ShardError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from e


def check_manifest(shard_dir: str, manifest: dict, expected_fingerprint: Optional[str] = None, *,
                   tokens_per_image: Optional[int] = None, embed_dim: Optional[int] = None) -> None:
    """A read manifest's token shape and head fingerprint against what the reader expects (each
    when given)."""
    mpath = os.path.join(shard_dir, MANIFEST)
    if tokens_per_image is not None or embed_dim is not None:
        check_against_model(shard_dir, manifest, tokens_per_image=tokens_per_image or manifest["tokens_per_image"],
                            embed_dim=embed_dim or manifest["embed_dim"])
    if expected_fingerprint is not None and manifest["head_fingerprint"] != expected_fingerprint:
        raise ShardError(f"{mpath}: field 'head_fingerprint' is {manifest['head_fingerprint'][:16]}..., "
                         f"expected {expected_fingerprint[:16]}... (the shards were encrypted with "
                         "another head than this server's; re-encrypt with the distributed head)")


def shard_starts(manifest: dict) -> np.ndarray:
    """[num_shards + 1]: shard i holds the folder's rows [starts[i], starts[i + 1])."""
    return np.concatenate([[0], np.cumsum([e["num_images"] for e in manifest["shards"]])]).astype(np.int64)


def shards_for_rows(manifest: dict, lo: int, hi: int) -> list[int]:
    """The indices of the shards holding any of the folder's rows [lo, hi)."""
    starts = shard_starts(manifest)
    return [i for i in range(len(manifest["shards"])) if starts[i] < hi and starts[i + 1] > lo]


def load_shards(shard_dir: str, expected_fingerprint: Optional[str] = None, *,
                tokens_per_image: Optional[int] = None, embed_dim: Optional[int] = None,
                rows: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, dict]:
    """Verifies a site's shard folder and returns (tokens [N, n, D] in the stored dtype, manifest);
    with `rows` = (lo, hi), only the folder's rows [lo, hi), read from the shards holding them
    (`shards_for_rows`) and no other. Checked, in this order, before anything is trained on: the
    manifest's fields and types, the head fingerprint and the token shape when given, then each
    shard read: a regular file inside the folder, of the listed size and SHA-256, a .npy header of
    the listed dtype and shape, finite values within trust.MAX_ABS_VALUE."""
    manifest = read_manifest(shard_dir)
    mpath = os.path.join(shard_dir, MANIFEST)
    check_manifest(shard_dir, manifest, expected_fingerprint, tokens_per_image=tokens_per_image,
                   embed_dim=embed_dim)
    lo, hi = (0, manifest["num_images"]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo <= hi <= manifest["num_images"]:
        raise ShardError(f"{mpath}: rows [{lo}, {hi}) asked for, but the folder holds rows "
                         f"[0, {manifest['num_images']}) (field 'num_images')")
    shape = (manifest["tokens_per_image"], manifest["embed_dim"])
    stored = np.dtype(np.uint16) if manifest["dtype"] == "bfloat16" else np.dtype(DTYPES[manifest["dtype"]])
    starts = shard_starts(manifest)
    chunks = [_from_storage(np.zeros((0,) + shape, stored), manifest["dtype"])]
    for i in shards_for_rows(manifest, lo, hi):
        chunk = _verified_shard(shard_dir, mpath, i, manifest, stored, shape)
        chunks.append(chunk[max(lo - starts[i], 0):hi - starts[i]])
    return np.concatenate(chunks), manifest


def _verified_shard(shard_dir: str, mpath: str, i: int, manifest: dict, stored: np.dtype,
                    shape: tuple) -> np.ndarray:
    """Shard i's tokens, after its size, SHA-256, .npy header and values are checked."""
    entry = manifest["shards"][i]
    path = _shard_path(shard_dir, mpath, i, entry)
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ShardError(f"{path}: SHA-256 {digest[:16]}... does not match the manifest's "
                         f"{entry['sha256'][:16]}... (corrupted or altered in transit)")
    chunk = _from_storage(_read_npy(path, stored, (entry["num_images"],) + shape), manifest["dtype"])
    try:
        trust.check_values(chunk, f"{path}: tokens")
    except trust.InputError as e:
        raise ShardError(str(e)) from None
    return chunk


def shard_bytes(shard_dir: str) -> int:
    """Bytes a site uploads: every shard plus the manifest, as they are on disk."""
    manifest = read_manifest(shard_dir)
    return sum(e["bytes"] for e in manifest["shards"]) + os.path.getsize(os.path.join(shard_dir, MANIFEST))
