"""Where the comparison's results live in the work directory, and how they are written: one
DIR/runs/<row>/seed<k>/result.json per row and seed, each written atomically so a killed run leaves
either a whole result (skipped on the next run) or none."""
from __future__ import annotations

import json
import os

import numpy as np

RESULT = "result.json"


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
