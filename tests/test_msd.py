"""Tests for msd_jax.msd.{views, loss, schedules} against independent float64 numpy references and
hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.msd import loss as loss_lib
from np_reference import np_dino_loss, np_softmax
from msd_jax.msd import schedules
from msd_jax.msd import views as views_lib

# ---------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------


def test_view_size_rounding():
    assert views_lib.view_size(64, 0.5) == 32
    assert views_lib.view_size(64, 0.2) == 13      # 12.8 -> 13
    assert views_lib.view_size(64, 0.19) == 12     # 12.16 -> 12
    assert views_lib.view_size(16, 0.3) == 5       # 4.8 -> 5
    assert views_lib.view_size(10, 1.0) == 10
    assert views_lib.view_size(10, 0.01) == 1      # never an empty view
    assert views_lib.view_size(1, 0.5) == 1


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, 2.0])
def test_view_size_errors_name_field(ratio):
    with pytest.raises(ValueError, match=r"config\.msd\.ratio_local"):
        views_lib.view_size(64, ratio, "ratio_local")


def _sample(key, ids, n, v, k):
    return np.asarray(jax.jit(views_lib.sample_view_indices, static_argnums=(2, 3, 4))(
        key, jnp.asarray(ids, jnp.int32), n, v, k))


@pytest.mark.parametrize("n,v,k", [(16, 3, 5), (16, 2, 16), (9, 4, 1)])
def test_sample_view_indices_in_range_distinct_and_counted(n, v, k):
    ids = np.random.default_rng(n + v + k).choice(100000, size=6, replace=False)
    idx = _sample(jax.random.key(7), ids, n, v, k)
    assert idx.shape == (6, v, k)
    assert np.issubdtype(idx.dtype, np.integer)
    assert idx.min() >= 0 and idx.max() < n
    for b in range(6):
        for j in range(v):
            assert len(set(idx[b, j].tolist())) == k          # no repeats within a view
    if k == n:  # a full view is a permutation
        np.testing.assert_array_equal(np.sort(idx, axis=-1), np.broadcast_to(np.arange(n), idx.shape))


def test_views_differ_between_views_and_examples_and_are_deterministic():
    ids = np.arange(10, 18)
    key = jax.random.key(3)
    a = _sample(key, ids, 32, 3, 8)
    np.testing.assert_array_equal(a, _sample(key, ids, 32, 3, 8))            # same ids -> same
    b = _sample(key, ids + 1000, 32, 3, 8)
    assert all(not np.array_equal(a[i], b[i]) for i in range(8))          # other ids -> other views
    assert all(not np.array_equal(a[i, 0], a[i, 1]) for i in range(8))    # views of one image differ
    c = _sample(jax.random.key(4), ids, 32, 3, 8)
    assert all(not np.array_equal(a[i], c[i]) for i in range(8))          # the key matters


def test_sampling_does_not_depend_on_batch_position():
    rng = np.random.default_rng(0)
    ids = rng.choice(5000, size=12, replace=False)
    tokens = rng.normal(size=(12, 20, 4)).astype(np.float32)
    order = rng.permutation(12)
    key = jax.random.key(11)
    idx = _sample(key, ids, 20, 2, 6)
    idx_shuf = _sample(key, ids[order], 20, 2, 6)
    np.testing.assert_array_equal(idx_shuf, idx[order])
    # the same through make_views: each example keeps its own views wherever it sits
    mv = jax.jit(views_lib.make_views, static_argnums=(3, 4, 5, 6))
    g, l = mv(key, jnp.asarray(tokens), jnp.asarray(ids, jnp.int32), 2, 6, 3, 4)
    g_s, l_s = mv(key, jnp.asarray(tokens[order]), jnp.asarray(ids[order], jnp.int32), 2, 6, 3, 4)
    g, l, g_s, l_s = (np.asarray(x) for x in (g, l, g_s, l_s))
    for v in range(2):
        np.testing.assert_array_equal(g_s[v * 12:(v + 1) * 12], g[v * 12:(v + 1) * 12][order])
    for v in range(3):
        np.testing.assert_array_equal(l_s[v * 12:(v + 1) * 12], l[v * 12:(v + 1) * 12][order])


def test_gather_views_matches_numpy():
    rng = np.random.default_rng(1)
    b, n, d, v, k = 3, 10, 5, 4, 6
    tokens = rng.normal(size=(b, n, d)).astype(np.float32)
    idx = np.stack([np.stack([rng.choice(n, k, replace=False) for _ in range(v)]) for _ in range(b)])
    got = np.asarray(views_lib.gather_views(jnp.asarray(tokens), jnp.asarray(idx)))
    ref = np.zeros((v * b, k, d), np.float32)
    for vi in range(v):
        for bi in range(b):
            for j in range(k):
                ref[vi * b + bi, j] = tokens[bi, idx[bi, vi, j]]
    np.testing.assert_array_equal(got, ref)


def test_make_views_shapes_and_no_local():
    tokens = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 8)), jnp.float32)
    ids = jnp.arange(4, dtype=jnp.int32)
    g, l = views_lib.make_views(jax.random.key(0), tokens, ids, 2, 8, 3, 3)
    assert g.shape == (8, 8, 8) and l.shape == (12, 3, 8)
    g2, l2 = views_lib.make_views(jax.random.key(0), tokens, ids, 2, 8, 0, 3)
    assert l2 is None
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g))
    # every view token is one of its own image's tokens
    t = np.asarray(tokens)
    for row in range(8):
        bi = row % 4
        for tok in np.asarray(g)[row]:
            assert (np.abs(t[bi] - tok).sum(-1) == 0).any()


# ---------------------------------------------------------------------------
# DINO loss
# ---------------------------------------------------------------------------

def _loss_inputs(h=3, g=2, v=5, b=4, k=11, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(h, v, b, k)).astype(np.float32)
    t = rng.normal(size=(h, g, b, k)).astype(np.float32)
    c = (0.3 * rng.normal(size=(h, k))).astype(np.float32)
    return s, t, c


@pytest.mark.parametrize("h,g,v", [(3, 2, 5), (1, 2, 2), (2, 1, 3)])
def test_dino_loss_matches_numpy(h, g, v):
    s, t, c = _loss_inputs(h, g, v)
    loss, probs = loss_lib.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), 0.1, 0.04)
    ref = np_dino_loss(s, t, c, 0.1, 0.04)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(probs),
                               np_softmax((t.astype(np.float64) - c[:, None, None]) / 0.04), atol=1e-6)


@pytest.mark.parametrize("split", [0, 1, 2, 3, 5])
def test_pair_cross_entropy_over_a_split_of_the_views_sums_to_the_loss(split):
    # The step backpropagates the global and the local student views separately; the two partial
    # sums must give the numpy loop's loss whatever the split (including splits inside the globals).
    h, g, v = 3, 2, 5
    s, t, c = _loss_inputs(h, g, v)
    q = loss_lib.teacher_probs(jnp.asarray(t), jnp.asarray(c), 0.04)
    parts = [loss_lib.pair_cross_entropy(jnp.asarray(s[:, :split]), q, 0.1, 0),
             loss_lib.pair_cross_entropy(jnp.asarray(s[:, split:]), q, 0.1, split)]
    total = float(sum(parts)) / (h * loss_lib.num_pairs(g, v))
    np.testing.assert_allclose(total, np_dino_loss(s, t, c, 0.1, 0.04), rtol=1e-5)


def test_dino_loss_bfloat16_inputs_are_computed_in_float32():
    s, t, c = _loss_inputs()
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    loss, probs = loss_lib.dino_loss(s16, t16, jnp.asarray(c), 0.1, 0.04)
    assert loss.dtype == jnp.float32 and probs.dtype == jnp.float32
    ref = np_dino_loss(np.asarray(s16.astype(jnp.float32)), np.asarray(t16.astype(jnp.float32)), c, 0.1, 0.04)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_dino_loss_gradient_matches_analytic_form():
    h, g, v, b = 3, 2, 5, 4
    ts, tt = 0.1, 0.04
    s, t, c = _loss_inputs(h, g, v, b)
    f = lambda s_, t_: loss_lib.dino_loss(s_, t_, jnp.asarray(c), ts, tt)[0]
    grad_s, grad_t = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    # d/ds[h,v,b] = sum_{g != v} (softmax(s/Ts) - q_g) / Ts / (H * #pairs * B)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    q = np_softmax((t64 - c[:, None, None]) / tt)
    p = np_softmax(s64 / ts)
    npairs = g * v - min(g, v)
    ref = np.zeros_like(s64)
    for vi in range(v):
        for gi in range(g):
            if gi != vi:
                ref[:, vi] += (p[:, vi] - q[:, gi]) / ts
    ref /= h * npairs * b
    np.testing.assert_allclose(np.asarray(grad_s), ref, atol=1e-6, rtol=1e-4)
    # the teacher is a target: no gradient flows into it
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)
    # and one central finite difference in float64 on the numpy reference agrees too
    eps = 1e-4
    i = (1, 3, 2, 5)
    sp, sm = s64.copy(), s64.copy()
    sp[i] += eps
    sm[i] -= eps
    fd = (np_dino_loss(sp, t, c, ts, tt) - np_dino_loss(sm, t, c, ts, tt)) / (2 * eps)
    np.testing.assert_allclose(ref[i], fd, rtol=1e-5)


def test_teacher_probs_sharpen_and_center():
    t = jnp.asarray([[[[1.0, 2.0, 3.0]]]])  # [1, 1, 1, 3]
    c = jnp.asarray([[0.0, 0.0, 3.0]])
    p = np.asarray(loss_lib.teacher_probs(t, c, 0.5))[0, 0, 0]
    e = np.exp(np.array([2.0, 4.0, 0.0]))
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-6)


def test_update_center_by_hand():
    center = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])                       # [H=2, K=2]
    t = np.zeros((2, 2, 3, 2), np.float32)                                 # [H, G, B, K]
    t[0] = np.arange(12, dtype=np.float32).reshape(2, 3, 2)               # head 0: mean (5, 6)
    t[1] = -1.0                                                            # head 1: mean (-1, -1)
    got = np.asarray(loss_lib.update_center(center, jnp.asarray(t), 0.9))
    expected = np.array([[0.9 * 1 + 0.1 * 5, 0.9 * 2 + 0.1 * 6],
                         [0.9 * 0 + 0.1 * -1, 0.9 * -1 + 0.1 * -1]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_mean_entropy():
    k = 17
    np.testing.assert_allclose(float(loss_lib.mean_entropy(jnp.full((3, k), 1.0 / k))), math.log(k), rtol=1e-6)
    np.testing.assert_allclose(float(loss_lib.mean_entropy(jnp.eye(k)[:4])), 0.0, atol=1e-6)
    p = np_softmax(np.random.default_rng(0).normal(size=(2, 5, k)))
    ref = np.mean(-np.sum(p * np.log(p), axis=-1))
    np.testing.assert_allclose(float(loss_lib.mean_entropy(jnp.asarray(p, jnp.float32))), ref, rtol=1e-5)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

def test_warmup_cosine_values():
    base, final, start, total, warm = 1.0, 0.1, 0.2, 12, 3
    f = lambda s: float(schedules.warmup_cosine(s, base, final, total, warm, start))
    span = total - warm - 1  # the cosine reaches `final` at step total - 1
    np.testing.assert_allclose(f(0), start, rtol=1e-6)
    np.testing.assert_allclose(f(1), start + (base - start) / 3, rtol=1e-6)
    np.testing.assert_allclose(f(warm), base, rtol=1e-6)                      # end of warm-up
    np.testing.assert_allclose(f(warm + span / 2), (base + final) / 2, rtol=1e-6)  # middle
    np.testing.assert_allclose(f(5), final + 0.5 * (base - final) * (1 + math.cos(math.pi * 2 / span)), rtol=1e-6)
    np.testing.assert_allclose(f(total - 1), final, rtol=1e-6)               # last step
    np.testing.assert_allclose(f(total + 10), final, rtol=1e-6)              # constant afterwards
    # usable inside jit with a traced step
    jf = jax.jit(lambda s: schedules.warmup_cosine(s, base, final, total, warm, start))
    np.testing.assert_allclose(float(jf(jnp.int32(5))), f(5), rtol=1e-6)


def test_warmup_cosine_without_warmup():
    f = lambda s: float(schedules.warmup_cosine(s, 5e-4, 1e-6, 101))
    np.testing.assert_allclose(f(0), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(f(25), 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 0.25)), rtol=1e-5)
    np.testing.assert_allclose(f(100), 1e-6, rtol=1e-4)
    # momentum-style schedule increasing to 1
    np.testing.assert_allclose(float(schedules.warmup_cosine(50, 0.996, 1.0, 101)), 0.998, rtol=1e-7)


def test_linear_warmup():
    f = lambda s, w=10: float(schedules.linear_warmup(s, 0.04, 0.07, w))
    np.testing.assert_allclose(f(0), 0.04, rtol=1e-6)
    np.testing.assert_allclose(f(5), 0.055, rtol=1e-6)
    np.testing.assert_allclose(f(10), 0.07, rtol=1e-6)
    np.testing.assert_allclose(f(500), 0.07, rtol=1e-6)
    np.testing.assert_allclose(f(0, 0), 0.07, rtol=1e-6)   # no warm-up: the end value at once
    jf = jax.jit(lambda s: schedules.linear_warmup(s, 0.04, 0.07, 10))
    np.testing.assert_allclose(float(jf(jnp.int32(3))), 0.049, rtol=1e-6)
