"""The metrics of logged steps: read off the device (a non-finite one stops the run), appended to
a party's JSON-lines file, and read back."""
from __future__ import annotations

import json
import math
from typing import Optional

import jax


class TrainingDivergedError(FloatingPointError):
    pass


def finite_metrics(metrics: dict, party: str, step: int, ckpt_dir: Optional[str]) -> dict:
    """The step's metrics as Python floats; TrainingDivergedError when one is not finite."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in m.items() if not math.isfinite(v)]
    if bad:
        kept = f"; the last good checkpoint in {ckpt_dir} is kept" if ckpt_dir else ""
        raise TrainingDivergedError(
            f"[{party}] non-finite {', '.join(bad)} at step {step}: training stopped{kept} (try a "
            "lower config.optim.lr or config.optim.clip_grad)")
    return m


class MetricsFile:
    """Appends one JSON line per logged step, flushed at once (a killed run keeps its lines); a
    no-op when `path` is None."""

    def __init__(self, path: Optional[str]):
        self._file = open(path, "a") if path else None

    def write(self, line: dict) -> None:
        if self._file:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_metrics(path: str) -> list[dict]:
    """Metrics lines of one party's JSONL file in step order; the last line of a step wins (a
    resumed run logs again the steps after its last checkpoint). Unparsable lines (a line cut by a
    killed run) are skipped."""
    by_step = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(m, dict) and "step" in m:
                by_step[int(m["step"])] = m
    return [by_step[s] for s in sorted(by_step)]
