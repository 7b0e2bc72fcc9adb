"""The progress line of a logged step: its metrics, the images per second since the previous
logged step, and the time left."""
from __future__ import annotations

import time

# optional metrics shown after the loss, with their format, when a trainer's step returns them
SHOWN = (("teacher_entropy", "teacher_entropy", ".3f"), ("effective_prototypes", "prototypes", ".1f"),
         ("accuracy", "accuracy", ".3f"))


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


class Clock:
    """Wall-clock rates of a run started at `start_step` with `batch` images a step."""

    def __init__(self, start_step: int, total_steps: int, batch: int):
        self.start, self.total, self.batch = start_step, total_steps, batch
        self.t0 = self.last_t = self.now = time.perf_counter()
        self.last_step = start_step

    def read(self, step: int) -> tuple[float, float]:
        """(images per second since the last logged step, seconds left) after `step` steps."""
        self.now = time.perf_counter()
        images_per_s = (step - self.last_step) * self.batch / max(self.now - self.last_t, 1e-9)
        eta = (self.total - step) * (self.now - self.t0) / max(step - self.start, 1)
        return images_per_s, eta

    def logged(self, step: int) -> None:
        """The rate window restarts at this logged step (at the time of its `read`)."""
        self.last_t, self.last_step = self.now, step


def progress_line(party: str, step: int, total_steps: int, m: dict, eta: float) -> str:
    shown = "".join(f" {label} {m[key]:{fmt}}" for key, label, fmt in SHOWN if key in m)
    return (f"[{party}] step {step}/{total_steps} loss {m['loss']:.4f}{shown} lr {m['lr']:.2e} "
            f"{m['images_per_s']:.1f} img/s ETA {format_eta(eta)}")
