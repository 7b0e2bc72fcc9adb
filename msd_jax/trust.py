"""What one party reads that another party wrote (a site's shards and manifest, its uploaded model,
the server's head, a checkpoint or a backbone on disk) is untrusted: a careless or hostile sender
can put anything there. This module holds the one error every such load raises, the rule that keeps
a path read from a file inside its folder, and the check of the numbers before training on them.
"""
from __future__ import annotations

import json
import os

import numpy as np

# Far above any patch embedding of normalised pixels (|x| ~ 10) or any trained weight, far below
# overflow: squares in LayerNorm variances and bf16 dot products of a few thousand such terms stay
# finite. What lies beyond it (3e38, 1e30) is an attack or a broken sender, never a model output.
MAX_ABS_VALUE = 1e4


class InputError(ValueError):
    """Input that cannot be read or trusted. The message names the file, the field and what was
    expected, so that the sender can fix it without reading the code."""


def inside(folder: str, name: str, what: str) -> str:
    """The path of `name` (a relative path read from a file, e.g. a manifest's shard entry) inside
    `folder`, after resolving every symlink; raises InputError when it is absolute or leads out of
    `folder`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise InputError(f"{what}: expected a file name inside {folder}, got {name!r}")
    if os.path.isabs(name):
        raise InputError(f"{what}: {name!r} is an absolute path; expected a file name inside {folder}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise InputError(f"{what}: {name!r} resolves to {path}, outside {root} (a path or symlink "
                         "out of the folder it was sent in is refused)")
    return path


def contained(path: str, what: str) -> str:
    """`path`, a file in the folder it was sent in, with its symlinks resolved; InputError when
    the file is a symlink out of that folder."""
    return inside(os.path.dirname(os.path.abspath(path)), os.path.basename(path), f"{path}: {what}")


def within(root: str, path: str, what: str) -> str:
    """`path` with its symlinks resolved, which must stay inside `root` (the work directory)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise InputError(f"{path}: {what} resolves to {real}, outside the work directory {real_root} "
                         "(a symlink out of the work directory is refused)")
    return real


def check_values(arr: np.ndarray, where: str, max_abs: float = MAX_ABS_VALUE) -> None:
    """Raises InputError unless every value of `arr` is finite with |x| <= max_abs."""
    a = np.asarray(arr)
    if a.size == 0 or a.dtype.kind in "iub":
        return
    values = a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)  # bf16, f16
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(a.size - np.count_nonzero(finite))
        raise InputError(f"{where}: {bad} of {a.size} values are NaN or infinite (expected finite numbers)")
    peak = float(np.max(np.abs(values)))
    if peak > max_abs:
        raise InputError(f"{where}: values up to {peak:.3g} in magnitude, expected |x| <= {max_abs:g} "
                         "(not the output of a model on normalised images)")


MAX_JSON_BYTES = 1 << 24  # descriptions and manifests list files and fields, never data


def read_json(path: str, what: str = "a JSON object") -> dict:
    """The JSON object in `path`; InputError naming the file when it is missing, too large, not
    UTF-8 JSON or not an object. `what` says what the file should be."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found (expected {what})")
    path = contained(path, "this file")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {size} bytes, expected {what} of at most {MAX_JSON_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({type(e).__name__}: {e}); expected {what}") from e
    if not isinstance(value, dict):
        raise InputError(f"{path}: a JSON {type(value).__name__}, expected {what}")
    return value
