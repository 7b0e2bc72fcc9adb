"""A malicious (or careless) site: writes the hostile work directories the server must survive.

`honest_workdir` builds what honest parties send, with the real writers (the head, real encrypted
tokens of random images, uploaded site models); every other function rewrites one part of it the way
an attacker would, keeping the manifest's SHA-256 and byte counts consistent so that only the check
under test can catch it.
"""
import json
import os

import jax
import numpy as np

from msd_jax.encryption import encrypt, shards
from msd_jax.layout import Workdir
from msd_jax.protocols import model_io
from msd_jax.training import train

SITES = ("site0", "site1")


def honest_workdir(root, config, model, *, images_per_site=(6, 5), uploads=True) -> Workdir:
    wd = Workdir(str(root))
    _, fp = encrypt.get_or_create_head(wd.head, model, train.party_key(config.seed, "head"))
    head, _ = encrypt.load_head(wd.head, model)
    rng = np.random.default_rng(0)
    for i, (site, n) in enumerate(zip(SITES, images_per_site)):
        images = rng.random((n, model.image_size, model.image_size, model.channels), np.float32)
        tokens = encrypt.encrypt_images(head, model, images, jax.random.key(i))
        shards.write_shards(wd.shards(site), site, tokens, dtype=config.encrypt.dtype,
                            head_fingerprint=fp, shard_size=4)
        if uploads:
            model_io.save_params(wd.upload(site), train.init_student_params(config, model), model,
                                 site=site)
    return wd


def manifest(wd: Workdir, site: str) -> dict:
    with open(os.path.join(wd.shards(site), shards.MANIFEST)) as f:
        return json.load(f)


def write_manifest(wd: Workdir, site: str, value) -> str:
    path = os.path.join(wd.shards(site), shards.MANIFEST)
    with open(path, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))
    return path


def point_entry_at(wd: Workdir, site: str, target: str, *, relative: bool) -> None:
    """Shard entry 0 names `target` (a file outside the work directory), with its true hash and
    size, so that a server following the name would read it as a valid shard."""
    m = manifest(wd, site)
    name = os.path.relpath(target, wd.shards(site)) if relative else target
    m["shards"][0].update(file=name, sha256=shards.sha256_file(target), bytes=os.path.getsize(target))
    write_manifest(wd, site, m)


def replace_shard(wd: Workdir, site: str, index: int, data: bytes) -> str:
    """Shard `index` becomes `data`; the manifest's hash and size follow (the attacker controls both)."""
    m = manifest(wd, site)
    path = os.path.join(wd.shards(site), m["shards"][index]["file"])
    with open(path, "wb") as f:
        f.write(data)
    m["shards"][index].update(sha256=shards.sha256_file(path), bytes=len(data))
    write_manifest(wd, site, m)
    return path


def shard_tokens(wd: Workdir, site: str, index: int = 0) -> np.ndarray:
    m = manifest(wd, site)
    return np.load(os.path.join(wd.shards(site), m["shards"][index]["file"]))


def npy_bytes(arr: np.ndarray, allow_pickle=False) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_with_header(shape, dtype, payload: bytes) -> bytes:
    """A .npy whose header claims `shape` (any size) followed by only `payload`."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                "shape": tuple(shape)})
    return buf.getvalue() + payload


def set_tokens(wd: Workdir, site: str, value: float) -> None:
    """One value of shard 0 becomes `value` (NaN, Inf, 3e38), stored in the manifest's dtype."""
    m = manifest(wd, site)
    arr = shard_tokens(wd, site)
    dtype = shards.DTYPES[m["dtype"]]
    vals = arr.view(dtype) if m["dtype"] == "bfloat16" else arr.copy()
    vals = vals.copy()
    vals[0, 0, 0] = value
    stored = vals.view(np.uint16) if m["dtype"] == "bfloat16" else vals
    replace_shard(wd, site, 0, npy_bytes(stored))


def tamper_upload(wd: Workdir, site: str, data: bytes) -> str:
    path = os.path.join(wd.upload(site), model_io.PARAMS_FILE)
    with open(path, "wb") as f:
        f.write(data)
    return path
