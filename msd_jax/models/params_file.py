"""Parameters that travel between parties (the head, the initial student, a site's model): a flax
msgpack file next to a JSON description, written atomically, and read back only when every leaf has
the template's path, shape and dtype and finite values."""
from __future__ import annotations

import json
import os

import flax.serialization
import jax
import numpy as np

from msd_jax import trust


def save(folder: str, params_name: str, params, meta_name: str, meta: dict) -> int:
    """Writes folder/params_name (msgpack) and folder/meta_name (JSON), each through a temporary
    file renamed into place; returns the bytes of both."""
    os.makedirs(folder, exist_ok=True)
    data = flax.serialization.to_bytes(jax.device_get(params))
    _replace(os.path.join(folder, params_name), data)
    _replace(os.path.join(folder, meta_name), json.dumps(meta, indent=1).encode())
    return len(data) + os.path.getsize(os.path.join(folder, meta_name))


def _replace(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def load(path: str, template):
    """The parameters in `path`, restored into `template`'s structure; InputError naming the file
    and the first leaf that differs (missing, extra, shape, dtype) or holds NaN, Inf or values
    beyond trust.MAX_ABS_VALUE."""
    if not os.path.isfile(path):
        raise trust.InputError(f"{path}: not found (expected a flax msgpack parameter file)")
    path = trust.contained(path, "this file")
    expected = flax.serialization.to_state_dict(jax.device_get(template))
    limit = 4 * _nbytes(expected) + (1 << 20)  # the template's size, with room for msgpack framing
    size = os.path.getsize(path)
    if size > limit:
        raise trust.InputError(f"{path}: {size} bytes, far more than the {_nbytes(expected)} bytes of "
                               "parameters this model has")
    with open(path, "rb") as f:
        data = f.read()
    try:
        restored = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 (msgpack raises many types on garbage; all mean the same)
        raise trust.InputError(f"{path}: not a flax msgpack parameter file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    _check_tree(path, restored, expected, "")
    return flax.serialization.from_state_dict(template, restored)


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def _check_tree(path: str, got, want, where: str) -> None:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise trust.InputError(f"{path}: {where or 'the file'} holds {type(got).__name__}, expected a "
                                   f"dict with keys {sorted(want)[:6]}")
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise trust.InputError(f"{path}: {where or 'top level'}: missing {missing[:6]}, unexpected "
                                   f"{extra[:6]} (parameters of another model)")
        for k in want:
            _check_tree(path, got[k], want[k], f"{where}/{k}")
        return
    want = np.asarray(want)
    if not isinstance(got, np.ndarray):
        raise trust.InputError(f"{path}: {where} is {type(got).__name__}, expected an array "
                               f"{want.dtype}{list(want.shape)}")
    if got.shape != want.shape or got.dtype != want.dtype:
        raise trust.InputError(f"{path}: {where} is {got.dtype}{list(got.shape)}, expected "
                               f"{want.dtype}{list(want.shape)} (parameters of another model)")
    trust.check_values(got, f"{path}: {where}")
