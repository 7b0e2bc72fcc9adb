"""Masked sampling: the views of an encrypted image are random subsets of its tokens.

Pixel augmentations are impossible on encrypted tokens, so a view keeps a static number of the
image's tokens (static, so shapes stay fixed under jit). Each example's subsets are keyed on its
global example id, never on its place in a device shard, so the sampling does not depend on how the
batch is split across devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def view_size(num_tokens: int, ratio: float, field: str = "ratio") -> int:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"config.msd.{field}: expected a fraction in (0, 1], got {ratio}")
    return max(1, int(round(ratio * num_tokens)))


def sample_view_indices(key: jax.Array, example_ids: jax.Array, num_tokens: int, num_views: int,
                        size: int) -> jax.Array:
    """Indices [B, num_views, size]: for each example and view, `size` distinct token indices."""
    def one_example(example_id):
        keys = jax.random.split(jax.random.fold_in(key, example_id), num_views)
        return jax.vmap(lambda k: jax.random.permutation(k, num_tokens)[:size])(keys)
    return jax.vmap(one_example)(example_ids)


def gather_views(tokens: jax.Array, indices: jax.Array, view_major: bool = True) -> jax.Array:
    """tokens [B, N, D], indices [B, V, k] -> view-major tokens [V * B, k, D], or with
    `view_major=False` the unflattened [B, V, k, D] (what the step uses: the batch axis stays
    leading, so a batch sharded across devices stays sharded)."""
    b, v, k = indices.shape
    views = jnp.take_along_axis(tokens[:, None], indices[..., None], axis=2)  # [B, V, k, D]
    if not view_major:
        return views
    return views.transpose(1, 0, 2, 3).reshape(v * b, k, tokens.shape[-1])


def make_views(key: jax.Array, tokens: jax.Array, example_ids: jax.Array, num_global: int,
               size_global: int, num_local: int, size_local: int, view_major: bool = True):
    """Global views [G*B, kg, D] and local views [L*B, kl, D] (None when L == 0); with
    `view_major=False`, [B, G, kg, D] and [B, L, kl, D] (same tokens)."""
    kg, kl = jax.random.split(key)
    n = tokens.shape[1]
    globals_ = gather_views(tokens, sample_view_indices(kg, example_ids, n, num_global, size_global),
                            view_major)
    if num_local == 0:
        return globals_, None
    locals_ = gather_views(tokens, sample_view_indices(kl, example_ids, n, num_local, size_local),
                           view_major)
    return globals_, locals_
