"""Where the comparison's results live in the work directory, and how they are written: one
DIR/runs/<row>/seed<k>/result.json per row and seed, each written atomically so a killed run leaves
either a whole result (skipped on the next run) or none, and beside it predictions.npz, the test
probabilities of the row's (first) backbone that paired comparisons read."""
from __future__ import annotations

import json
import os

import numpy as np

RESULT = "result.json"
PREDICTIONS = "predictions.npz"


def run_dir(workdir: str, row: str, k: int) -> str:
    return os.path.join(workdir, "runs", row, f"seed{k}")


def result_path(workdir: str, row: str, k: int) -> str:
    return os.path.join(run_dir(workdir, row, k), RESULT)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def predictions_path(workdir: str, row: str, k: int) -> str:
    return os.path.join(run_dir(workdir, row, k), PREDICTIONS)


def write_predictions(run_dir_: str, probs: dict, labels) -> None:
    """run_dir/predictions.npz: {'labels', and each method's [N, classes] test probabilities}."""
    path = os.path.join(run_dir_, PREDICTIONS)
    os.makedirs(run_dir_, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, labels=np.asarray(labels), **{k: np.asarray(v, np.float32) for k, v in probs.items()})
    os.replace(path + ".tmp", path)


def read_predictions(path: str) -> dict | None:
    """The arrays of a predictions.npz; None when the file is missing (a result written before)."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
