"""DINO cross-entropy between teacher and student views, with centering and sharpening.

All in float32 whatever the compute dtype of the body.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, temperature) -> jax.Array:
    """teacher_logits [H, G, B, K], center [H, K] -> softmax((t - c) / T) in float32."""
    t = teacher_logits.astype(jnp.float32) - center[:, None, None, :].astype(jnp.float32)
    return jax.nn.softmax(t / temperature, axis=-1)


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temp, teacher_temp):
    """Mean over heads and over (teacher view g, student view v != g) pairs of
    H(softmax((t_g - c)/T_t), softmax(s_v/T_s)), averaged over the batch.

    student_logits [H, V, B, K] (the first G views are the global ones the teacher saw),
    teacher_logits [H, G, B, K], center [H, K]. Returns (loss, teacher probabilities).
    """
    h, g, b, _ = teacher_logits.shape
    v = student_logits.shape[1]
    t = jax.lax.stop_gradient(teacher_probs(teacher_logits, center, teacher_temp))
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.einsum("hgbk,hvbk->hgv", t, log_s) / b  # [H, G, V]
    pairs = 1.0 - jnp.eye(g, v, dtype=jnp.float32)     # skip the student view equal to the teacher's
    return jnp.sum(ce * pairs[None]) / (h * jnp.sum(pairs)), t


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum) -> jax.Array:
    """EMA of the mean teacher output per head over views and batch: c <- m c + (1 - m) mean."""
    batch_center = jnp.mean(teacher_logits.astype(jnp.float32), axis=(1, 2))
    return center * momentum + batch_center * (1.0 - momentum)


def mean_entropy(probs: jax.Array) -> jax.Array:
    """Mean entropy (nats) of probability rows; log(K) means uniform, 0 means one-hot collapse."""
    return -jnp.mean(jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12)), axis=-1))
