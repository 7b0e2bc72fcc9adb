"""TensorBoard scalars beside the metrics JSON lines, written with tensorboardX (no TensorFlow).

Events of a party go to WORKDIR/tensorboard/<party>/ (`Workdir.tensorboard`); view them with
`tensorboard --logdir WORKDIR/tensorboard`. A resumed run appends a new event file and logs again
the steps after its last checkpoint; TensorBoard shows the later values.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

# what the training loop writes, under "train/<name>", from its metrics line
TRAIN_SCALARS = ("loss", "teacher_entropy", "effective_prototypes", "lr", "momentum", "images_per_s")


class ScalarWriter:
    """A tensorboardX SummaryWriter for one party's folder; a no-op when `logdir` is None."""

    def __init__(self, logdir: Optional[str]):
        self._writer = None
        if logdir:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (only when writing events)
            self._writer = SummaryWriter(logdir=logdir)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        """Writes every finite number of `values` as `prefix + name` at `step`."""
        if self._writer is None:
            return
        for name, v in values.items():
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
                self._writer.add_scalar(prefix + name, float(v), global_step=int(step))

    def train_metrics(self, metrics: dict) -> None:
        """The TRAIN_SCALARS of one logged step's metrics (which holds 'step')."""
        self.scalars(metrics["step"], {k: metrics[k] for k in TRAIN_SCALARS if k in metrics}, "train/")

    def eval_results(self, results: dict, prefix: str, step: int = 0) -> None:
        """{feature kind: {'knn'|'linear': {'accuracy', 'auc'}}} as `prefix<kind>/<probe>_<metric>`."""
        for kind, probes in results.items():
            self.scalars(step, {f"{probe}_{k}": v for probe, r in probes.items() for k, v in r.items()},
                         f"{prefix}{kind}/")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
