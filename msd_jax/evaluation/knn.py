"""Weighted k-nearest-neighbour probe on frozen features (DINO, Caron et al. 2021, eval_knn.py;
Wu et al. 2018)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.evaluation.metrics import check_probe_inputs

__all__ = ["knn_predict"]

_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


@jax.jit
def _l2_normalise(x: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, _NORM_EPS)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_batch(train_n: jax.Array, train_labels: jax.Array, test_batch: jax.Array,
               temperature: jax.Array, *, k: int, num_classes: int) -> jax.Array:
    """Class probabilities for one batch of test rows. train_n is already L2-normalised."""
    test_n = _l2_normalise(test_batch)
    sim = jnp.matmul(test_n, train_n.T, precision=jax.lax.Precision.HIGHEST)  # [B, N]
    top_sim, top_idx = jax.lax.top_k(sim, k)                                   # [B, k], sorted
    # exp(sim / T); subtracting the per-row max similarity cancels in the normalisation below but
    # keeps exp() from overflowing for small temperatures.
    weights = jnp.exp((top_sim - top_sim[:, :1]) / temperature)
    neighbour_labels = train_labels[top_idx]                                   # [B, k]
    votes = jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype)  # [B, k, C]
    scores = jnp.einsum("bk,bkc->bc", weights, votes, precision=jax.lax.Precision.HIGHEST)
    return scores / jnp.sum(scores, axis=-1, keepdims=True)


def knn_predict(train_features, train_labels, test_features, num_classes: int, k: int = 20,
                temperature: float = 0.07, batch_size: int = 512) -> np.ndarray:
    """DINO's weighted kNN classifier.

    L2-normalise the features, cosine similarity of each test feature to every train feature, take
    the top k (k clipped to the number of train examples), weights exp(sim / temperature),
    per-class sums of the weights of the neighbours of that class; return the class scores
    normalised to sum to 1 (probabilities, [M, num_classes], float32 numpy). Computed in jax,
    jitted, batched over test rows (``batch_size`` rows at a time, last batch zero-padded so one
    compilation serves all batches) so memory stays O(batch_size * num_train).
    """
    train_features, train_labels, test_features, num_classes = check_probe_inputs(
        train_features, train_labels, test_features, num_classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite positive float, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    num_test = test_features.shape[0]
    if num_test == 0:
        return np.zeros((0, num_classes), np.float32)
    k = int(min(k, train_features.shape[0]))
    batch_size = int(min(batch_size, num_test))

    train_n = _l2_normalise(jnp.asarray(train_features, jnp.float32))
    labels_j = jnp.asarray(train_labels, jnp.int32)
    temp = jnp.asarray(temperature, jnp.float32)
    test = np.asarray(test_features, np.float32)

    out = []
    for start in range(0, num_test, batch_size):
        batch = test[start:start + batch_size]
        n = batch.shape[0]
        if n < batch_size:  # zero rows normalise to 0 -> all similarities 0, no NaN; dropped below
            batch = np.concatenate([batch, np.zeros((batch_size - n, batch.shape[1]), np.float32)])
        probs = _knn_batch(train_n, labels_j, jnp.asarray(batch), temp,
                           k=k, num_classes=num_classes)
        out.append(probs[:n])
    return np.asarray(jnp.concatenate(out, axis=0), dtype=np.float32)
