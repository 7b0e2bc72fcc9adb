"""Schedules as pure functions of the step, usable inside jit (DINO's cosine_scheduler shape)."""
from __future__ import annotations

import jax.numpy as jnp


def warmup_cosine(step, base, final, total_steps: int, warmup_steps: int = 0, warmup_start=0.0):
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then cosine from `base` to
    `final` reaching it at step `total_steps - 1`, constant afterwards."""
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps, 1)
    span = max(total_steps - warmup_steps - 1, 1)
    progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
    cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)


def linear_warmup(step, start, end, warmup_steps: int):
    """Linear from `start` to `end` over `warmup_steps`, then constant `end` (teacher temperature)."""
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip(step / max(warmup_steps, 1), 0.0, 1.0) if warmup_steps > 0 else 1.0
    return start + (end - start) * frac
