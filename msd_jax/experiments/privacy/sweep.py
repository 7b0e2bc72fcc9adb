"""The audit's sweep of the defence strength, read from config.audit.sweep (no jax here: config.validate
reads it too)."""
from __future__ import annotations


def sweep_values(text: str) -> list[float]:
    """config.audit.sweep: '0.5,1,2' -> [0.5, 1.0, 2.0] (each >= 0); '' -> []."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or any(not v >= 0 for v in values):
        raise ValueError(f"config.audit.sweep: expected comma-separated numbers >= 0 (encrypt.pos_noise_std "
                         f"values), got {text!r}")
    return values
