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


def pair_cross_entropy(student_logits: jax.Array, t_probs: jax.Array, student_temp,
                       first_view: int = 0) -> jax.Array:
    """Sum over heads and (teacher view g, student view v != g) pairs of the batch-mean
    H(t_g, softmax(s_v / T_s)), for the student views first_view .. first_view + V - 1.

    student_logits [H, V, B, K], t_probs [H, G, B, K] (the teacher's targets; global view g of the
    student is view g of the teacher). Each term depends on one student view only, so the loss of
    all views is the sum of this over any split of the views (the step backpropagates the global
    and the local views one after the other)."""
    g, b = t_probs.shape[1], t_probs.shape[2]
    v = student_logits.shape[1]
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    ce = -jnp.einsum("hgbk,hvbk->hgv", t_probs, log_s) / b  # [H, G, V]
    same = jnp.arange(g)[:, None] == first_view + jnp.arange(v)[None, :]
    return jnp.sum(jnp.where(same[None], 0.0, ce))


def num_pairs(num_global: int, num_views: int) -> int:
    """(teacher view, student view) pairs the loss averages over: all but the G equal ones."""
    return num_global * num_views - min(num_global, num_views)


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temp, teacher_temp):
    """Mean over heads and over (teacher view g, student view v != g) pairs of
    H(softmax((t_g - c)/T_t), softmax(s_v/T_s)), averaged over the batch.

    student_logits [H, V, B, K] (the first G views are the global ones the teacher saw),
    teacher_logits [H, G, B, K], center [H, K]. Returns (loss, teacher probabilities).
    """
    h, g = teacher_logits.shape[:2]
    t = jax.lax.stop_gradient(teacher_probs(teacher_logits, center, teacher_temp))
    total = pair_cross_entropy(student_logits, t, student_temp)
    return total / (h * num_pairs(g, student_logits.shape[1])), t


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum) -> jax.Array:
    """EMA of the mean teacher output per head over views and batch: c <- m c + (1 - m) mean."""
    batch_center = jnp.mean(teacher_logits.astype(jnp.float32), axis=(1, 2))
    return center * momentum + batch_center * (1.0 - momentum)


def mean_entropy(probs: jax.Array) -> jax.Array:
    """Mean entropy (nats) of probability rows; log(K) means uniform, 0 means one-hot collapse."""
    return -jnp.mean(jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12)), axis=-1))
