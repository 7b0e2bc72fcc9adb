"""Tests for msd_jax.msd.step: the jitted MSD train step (EMA teacher, centre, last-layer freezing,
AdamW with decoupled weight decay and per-tensor clipping, learning on a fixed batch, data-parallel
equivalence, one-shot merge mode).

References are independent: views are rebuilt with views_lib.make_views and fold_in(key, step) as
the step documents, logits come from applying vit.Student directly, and the loss, clipping, Adam
and EMA arithmetic are redone here in numpy (float64) or plain jnp."""

import dataclasses
import functools
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.models import vit
from msd_jax.msd import step as step_lib
from msd_jax.msd import views as views_lib
from conftest import SHORT_MSD, SMALL_MODEL, tiny_config
from fake_devices import run_script
from np_reference import np_dino_loss, np_softmax

N_TOKENS = (SMALL_MODEL["image_size"] // SMALL_MODEL["patch_size"]) ** 2
DIM, OUT = SMALL_MODEL["embed_dim"], SMALL_MODEL["out_dim"]
NO_DECAY = {"bias", "scale", "cls_token", "cls_pos_embed", "pos_embed"}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def build(c, batch, total_steps=100, steps_per_epoch=10, num_heads_out=1, merge=False, seed=0):
    cfg = vit.ViTConfig.from_config(c.model)
    sc = step_lib.StepConfig.from_config(c, N_TOKENS, total_steps, steps_per_epoch, batch)
    params = jax.device_get(jax.jit(lambda k: vit.init_student(cfg, k, num_heads_out))(jax.random.key(seed)))
    mesh = step_lib.make_mesh()
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, sc, num_heads_out, merge), mesh, merge)
    # placed on the mesh as training/train.py does (an unplaced first state would make the second call retrace)
    state = step_lib.replicate(mesh, step_lib.init_state(params, num_heads_out, OUT, sc))
    return cfg, sc, params, fn, state, mesh


def batch_of(b, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(b, N_TOKENS, DIM)).astype(np.float32)
    ids = (rng.choice(10000, size=b, replace=False)).astype(np.int32)
    return tokens, ids


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def host(state):
    """Copy a state to host numpy before it is donated to the next step."""
    return jax.tree_util.tree_map(lambda x: np.array(x), jax.device_get(state))


def views_for(sc, key, step, tokens, ids):
    return views_lib.make_views(jax.random.fold_in(key, step), jnp.asarray(tokens), jnp.asarray(ids),
                                sc.num_global, sc.size_global, sc.num_local, sc.size_local)


def jnp_dino_loss(s, t, c, ts, tt):
    """Same loss in jnp (for jax.grad): s [H, V, B, K] traced, t/c constants."""
    q = jax.nn.softmax((t - c[:, None, None]) / tt, axis=-1)
    ls = jax.nn.log_softmax(s / ts, axis=-1)
    vals = [jnp.mean(-jnp.sum(q[:, g] * ls[:, v], -1), axis=-1)
            for g in range(t.shape[1]) for v in range(s.shape[1]) if v != g]
    return jnp.mean(jnp.stack(vals))


@functools.lru_cache(maxsize=None)
def _student_apply(cfg, num_heads_out):
    return jax.jit(lambda p, x: vit.Student(cfg, num_heads_out).apply({"params": p}, x))


def logits(cfg, params, views, num_views, num_heads_out=1):
    out = _student_apply(cfg, num_heads_out)(params, views)
    h, vb, k = out.shape
    return np.asarray(out).reshape(h, num_views, vb // num_views, k)


# ---------------------------------------------------------------------------
# StepConfig.from_config
# ---------------------------------------------------------------------------

def test_step_config_from_config():
    c = tiny_config(SHORT_MSD, optim=dict(lr=0.064, warmup_frac=0.1, freeze_last_layer_epochs=1.5),
                    msd=dict(ratio_global=0.5, ratio_local=0.2, teacher_temp_warmup_frac=0.3))
    sc = step_lib.StepConfig.from_config(c, 64, total_steps=40, steps_per_epoch=6, batch_size=32)
    assert sc.lr == pytest.approx(0.064 * 32 / 256)       # linear scaling rule
    assert sc.warmup_steps == 4
    assert sc.freeze_last_layer_steps == 9
    assert sc.teacher_temp_warmup_steps == 12
    assert (sc.size_global, sc.size_local) == (32, 13)
    assert (sc.num_global, sc.num_local, sc.total_steps) == (2, 2, 40)


@pytest.mark.parametrize("msd,match", [(dict(num_global=0), "config.msd.num_global"),
                                       (dict(num_local=-1), "config.msd.num_local"),
                                       (dict(num_global=1, num_local=0), "config.msd"),
                                       (dict(ratio_local=0.0), "config.msd.ratio_local"),
                                       (dict(ratio_global=1.5), "config.msd.ratio_global")])
def test_step_config_errors(msd, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        step_lib.StepConfig.from_config(tiny_config(SHORT_MSD, msd=msd), 64, 10, 5, 8)


def test_clip_per_tensor():
    rng = np.random.default_rng(0)
    g = {"a": rng.normal(size=(3, 4)).astype(np.float32) * 10, "b": rng.normal(size=(5,)).astype(np.float32) * 0.01}
    out = jax.device_get(step_lib.clip_per_tensor(jax.tree_util.tree_map(jnp.asarray, g), 1.0))
    na = np.linalg.norm(g["a"].astype(np.float64))
    np.testing.assert_allclose(out["a"], g["a"] / (na + 1e-6), rtol=1e-5)        # clipped to norm 1
    np.testing.assert_allclose(out["b"], g["b"], rtol=1e-6)                      # small: untouched
    same = jax.device_get(step_lib.clip_per_tensor(g, 0.0))                     # 0 disables clipping
    np.testing.assert_array_equal(same["a"], g["a"])


# ---------------------------------------------------------------------------
# Two steps of self-distillation: EMA, centre, loss, AdamW arithmetic, clipping, weight decay
# ---------------------------------------------------------------------------

B = 8
LR = 1e-4
WD = 1.0
MT = 0.9      # teacher momentum at step 0
CM = 0.8      # centre momentum
CLIP = 1.0
TOTAL = 50


def run_steps(num_steps=3):
    """A few self-distillation steps on one fixed batch; host copies of every state."""
    c = tiny_config(SHORT_MSD,
                    msd=dict(momentum_teacher=MT, center_momentum=CM, teacher_temp=0.05,
                             warmup_teacher_temp=0.05),
                    optim=dict(lr=LR * 256 / B, weight_decay=WD, weight_decay_end=0.4, clip_grad=CLIP))
    cfg, sc, params, fn, state, mesh = build(c, B, total_steps=TOTAL)
    tokens, ids = batch_of(B)
    key = jax.random.key(42)
    toks, ids_d = step_lib.shard_batch(mesh, tokens, ids)
    states, metrics = [host(state)], []
    for _ in range(num_steps):
        state, m = fn(state, toks, ids_d, key)
        states.append(host(state))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return dict(cfg=cfg, sc=sc, tokens=tokens, ids=ids, key=key, states=states, metrics=metrics,
                batch_devices=len(toks.sharding.device_set))


@pytest.fixture(scope="module", params=["default passes", "one pass per view group"])
def three_steps(request):
    # The step backpropagates its views in groups (step.backward_passes); at these small shapes the
    # default puts each kind of view in one pass, so the checks also run with a budget of 1 token,
    # which splits the global views into one pass each.
    saved = step_lib.MIN_PASS_TOKENS
    if request.param != "default passes":
        step_lib.MIN_PASS_TOKENS = 1
    try:
        return run_steps()
    finally:
        step_lib.MIN_PASS_TOKENS = saved


DEMO_VIEWS, VIT_VIEWS = (2, 32, 6, 13), (2, 118, 8, 39)   # (G, global size, L, local size)


@pytest.mark.parametrize("views,batch,min_tokens,expected", [
    (DEMO_VIEWS, 64, 512, [(0, 1), (1, 1), (2, 2), (4, 2), (6, 2)]),
    (VIT_VIEWS, 8, 512, [(0, 1), (1, 1), (2, 3), (5, 3), (8, 2)]),
    (VIT_VIEWS, 2, 512, [(0, 2), (2, 6), (8, 2)]),   # few tokens per view: fewer, larger passes
    (DEMO_VIEWS, 2, 1, [(0, 1), (1, 1), (2, 2), (4, 2), (6, 2)]),
])
def test_backward_passes_cover_every_view_once_in_order(views, batch, min_tokens, expected, monkeypatch):
    # (index of the group's first view, views in the group), by hand from the rule in the docstring
    monkeypatch.setattr(step_lib, "MIN_PASS_TOKENS", min_tokens)
    sc = dataclasses.replace(step_lib.StepConfig.from_config(tiny_config(SHORT_MSD), N_TOKENS, 1, 1, batch),
                             num_global=views[0], size_global=views[1], num_local=views[2],
                             size_local=views[3])
    # views [B, V, k, D] with entry (b, v) = 100 * v + b (locals offset by 10,000)
    g = (100 * np.arange(sc.num_global)[None, :] + np.arange(batch)[:, None])[..., None, None]
    l = 10_000 + (100 * np.arange(sc.num_local)[None, :] + np.arange(batch)[:, None])[..., None, None]
    passes = step_lib.backward_passes(sc, g, l, batch)
    assert [(first, n) for _, n, first in passes] == expected
    got = np.concatenate([v[:, :, 0, 0] for v, _, _ in passes], axis=1)   # [B, G + L] in pass order
    np.testing.assert_array_equal(got, np.concatenate([g[:, :, 0, 0], l[:, :, 0, 0]], axis=1))
    for views, n, _ in passes:
        assert views.shape[:2] == (batch, n)


def test_schedule_values_in_metrics(three_steps):
    m0, m1 = three_steps["metrics"][:2]
    assert m0["lr"] == pytest.approx(LR, rel=1e-6)
    assert m0["weight_decay"] == pytest.approx(WD, rel=1e-6)
    assert m0["momentum"] == pytest.approx(MT, rel=1e-7)
    assert m0["teacher_temp"] == pytest.approx(0.05, rel=1e-6)
    assert m1["momentum"] == pytest.approx(1 - 0.5 * (1 - MT) * (1 + math.cos(math.pi / (TOTAL - 1))), rel=1e-7)
    assert int(three_steps["states"][1].step) == 1 and int(three_steps["states"][2].step) == 2


def test_ema_teacher_update(three_steps):
    s0, s1, s2 = three_steps["states"][:3]
    m1 = 1 - 0.5 * (1 - MT) * (1 + math.cos(math.pi / (TOTAL - 1)))   # momentum at step 1, by hand
    for (k, e0), p1, e1, p2, e2 in zip(flat(s0.ema_params).items(), flat(s1.params).values(),
                                        flat(s1.ema_params).values(), flat(s2.params).values(),
                                        flat(s2.ema_params).values()):
        np.testing.assert_allclose(e1, MT * e0 + (1 - MT) * p1, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(e2, m1 * e1 + (1 - m1) * p2, atol=1e-7, err_msg=k)
    # initially teacher == student; after a step they differ
    p0 = flat(s0.params)
    assert all(np.array_equal(p0[k], v) for k, v in flat(s0.ema_params).items())
    assert any(not np.allclose(v, flat(s1.ema_params)[k]) for k, v in flat(s1.params).items())


def test_center_and_loss_match_independent_computation(three_steps):
    d = three_steps
    cfg, sc = d["cfg"], d["sc"]
    center_ref = np.zeros((1, OUT))
    for step in range(2):
        state = d["states"][step]
        g_views, l_views = views_for(sc, d["key"], step, d["tokens"], d["ids"])
        t = logits(cfg, state.ema_params, g_views, sc.num_global).astype(np.float64)  # [1, G, B, K]
        s = np.concatenate([logits(cfg, state.params, g_views, sc.num_global),
                            logits(cfg, state.params, l_views, sc.num_local)], axis=1)
        # the loss is computed with the centre before the update
        np.testing.assert_allclose(d["metrics"][step]["loss"], np_dino_loss(s, t, center_ref, sc.student_temp, 0.05),
                                   rtol=1e-4)
        q = np_softmax((t - center_ref[:, None, None]) / 0.05)
        np.testing.assert_allclose(d["metrics"][step]["teacher_entropy"],
                                   np.mean(-np.sum(q * np.log(np.maximum(q, 1e-30)), -1)), rtol=1e-3, atol=1e-5)
        center_ref = CM * center_ref + (1 - CM) * t.mean(axis=(1, 2))
        np.testing.assert_allclose(np.asarray(d["states"][step + 1].center), center_ref, atol=1e-6, rtol=1e-5)
    assert np.abs(center_ref).max() > 1e-3   # the centre moved: the check is not vacuous


def test_adamw_first_step_arithmetic_and_weight_decay_mask(three_steps):
    d = three_steps
    cfg, sc = d["cfg"], d["sc"]
    s0, s1 = d["states"][0], d["states"][1]
    g_views, l_views = views_for(sc, d["key"], 0, d["tokens"], d["ids"])
    t = jnp.asarray(logits(cfg, s0.ema_params, g_views, sc.num_global))
    student = vit.Student(cfg, 1)

    def loss(p):
        sg = student.apply({"params": p}, g_views)
        sl = student.apply({"params": p}, l_views)
        s = jnp.concatenate([sg.reshape(1, sc.num_global, B, OUT), sl.reshape(1, sc.num_local, B, OUT)], 1)
        return jnp_dino_loss(s, t, jnp.zeros((1, OUT)), sc.student_temp, 0.05)

    grads = flat(jax.jit(jax.grad(loss))(s0.params))
    p0, p1 = flat(s0.params), flat(s1.params)
    clipped_any = unclipped_any = False
    sq = 0.0
    for k, g in grads.items():
        norm = np.linalg.norm(g)
        factor = min(1.0, CLIP / (norm + 1e-6))
        clipped_any |= factor < 1.0
        unclipped_any |= factor == 1.0
        g = g * factor
        sq += np.sum(g * g)
        u = g / (np.abs(g) + 1e-8)                     # bias-corrected Adam, first step
        decay = k.split("'")[-2] not in NO_DECAY
        expected = p0[k] - LR * (u + (WD * p0[k] if decay else 0.0))
        # where |g| is at float noise level the sign of u is arbitrary: check those only by bound
        sure = np.abs(g) > 1e-4 * np.abs(g).max() + 1e-9
        np.testing.assert_allclose(p1[k][sure], expected[sure], atol=LR * 1e-3, rtol=1e-6, err_msg=k)
        step_ = p0[k] - p1[k] - (LR * WD * p0[k] if decay else 0.0)
        assert np.all(np.abs(step_) <= LR * (1 + 1e-4) + 2.4e-7 * np.abs(p0[k])), k   # |u| <= 1 (+ f32 rounding)
        assert np.all(np.sign(step_[sure]) == np.sign(g[sure])), k
        if decay:  # the decay term is large enough to be seen: without it the check would fail
            no_decay = p0[k] - LR * u
            assert np.abs(p1[k][sure] - no_decay[sure]).max() > 10 * LR * 1e-3, k
    assert clipped_any and unclipped_any
    np.testing.assert_allclose(d["metrics"][0]["grad_norm"], math.sqrt(sq), rtol=1e-4)


# ---------------------------------------------------------------------------
# Last layer frozen, then released; the loss goes down on a fixed batch
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thirty_steps():
    # a fixed teacher (momentum 1) and a fixed centre: the student distils fixed targets
    c = tiny_config(SHORT_MSD,
                    msd=dict(momentum_teacher=1.0, center_momentum=1.0, teacher_temp=0.04,
                             warmup_teacher_temp=0.04),
                    optim=dict(lr=3e-5 * 256 / B, freeze_last_layer_epochs=1.0))
    cfg, sc, params, fn, state, mesh = build(c, B, total_steps=200, steps_per_epoch=2, seed=0)
    assert sc.freeze_last_layer_steps == 2
    tokens, ids = batch_of(B, seed=1)
    key = jax.random.key(0)
    states, metrics = [host(state)], []
    toks, ids_d = step_lib.shard_batch(mesh, tokens, ids)
    for i in range(30):
        state, m = fn(state, toks, ids_d, key)
        if i < 3:
            states.append(host(state))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return states, metrics


def test_last_layer_frozen_then_released(thirty_steps):
    states, _ = thirty_steps
    p = [flat(s.params) for s in states]
    last = [k for k in p[0] if k.endswith("['last_layer']")]
    assert last
    for k in p[0]:
        if k in last:
            np.testing.assert_array_equal(p[1][k], p[0][k], err_msg=k)
            np.testing.assert_array_equal(p[2][k], p[0][k], err_msg=k)
            assert np.abs(p[3][k] - p[2][k]).max() > 1e-6, k
        else:
            assert np.abs(p[1][k] - p[0][k]).max() > 1e-6, k
            assert np.abs(p[2][k] - p[1][k]).max() > 1e-6, k


def test_loss_decreases_on_fixed_batch(thirty_steps):
    _, metrics = thirty_steps
    loss = np.array([m["loss"] for m in metrics])
    ent = np.array([m["teacher_entropy"] for m in metrics])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < 0.9 * loss[0]
    # the part the student controls, KL(teacher || student) = CE - H(teacher), falls a lot
    assert (loss - ent)[-5:].mean() < 0.6 * (loss - ent)[0]


# ---------------------------------------------------------------------------
# Data parallel on 8 (fake CPU) devices == one device
# ---------------------------------------------------------------------------

DP_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    import test_step as T

    assert jax.device_count() == 8, jax.devices()
    d = T.run_steps()
    assert d["batch_devices"] == 8          # the batch really is split over the 8 devices
    last = d["states"][-1]
    leaves = jax.tree_util.tree_leaves((last.params, last.ema_params, last.center))
    np.savez(sys.argv[2], losses=np.array([m["loss"] for m in d["metrics"]]),
             **{f"l{i}": np.asarray(x) for i, x in enumerate(leaves)})
""")


def test_data_parallel_matches_single_device(three_steps, tmp_path):
    """The same 3 steps on 8 fake CPU devices (a subprocess: the flag must precede jax's import)
    give the single-device result of the `three_steps` fixture (8 examples: one per device)."""
    assert three_steps["batch_devices"] == 1
    run_script(tmp_path, DP_SCRIPT, 8, tmp_path / "dp8.npz", timeout=300)
    a = np.load(tmp_path / "dp8.npz")
    last = three_steps["states"][-1]
    ref = jax.tree_util.tree_leaves((last.params, last.ema_params, last.center))
    assert len(a.files) == len(ref) + 1
    np.testing.assert_allclose(a["losses"], [m["loss"] for m in three_steps["metrics"]], rtol=1e-5)
    for i, x in enumerate(ref):
        np.testing.assert_allclose(a[f"l{i}"], np.asarray(x), atol=1e-5, err_msg=str(i))


# ---------------------------------------------------------------------------
# One-shot merge: fixed site teachers, one student head each
# ---------------------------------------------------------------------------

def test_merge_mode_uses_site_teachers():
    c = tiny_config(SHORT_MSD, msd=dict(center_momentum=CM, teacher_temp=0.05, warmup_teacher_temp=0.05),
                    optim=dict(lr=1e-4 * 256 / B))
    cfg, sc, params, fn, state, mesh = build(c, B, num_heads_out=2, merge=True, seed=0)
    init1 = jax.jit(lambda k: vit.init_student(cfg, k, 1))
    sites = [jax.device_get(init1(jax.random.key(s))) for s in (11, 12)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *sites)
    tokens, ids = batch_of(B, seed=3)
    key = jax.random.key(9)
    s0 = host(state)
    state, m = fn(state, *step_lib.shard_batch(mesh, tokens, ids), key, step_lib.replicate(mesh, stacked))
    loss = float(m["loss"])
    assert np.isfinite(loss)
    assert np.asarray(state.center).shape == (2, OUT)

    g_views, l_views = views_for(sc, key, 0, tokens, ids)
    t = np.concatenate([logits(cfg, p, g_views, sc.num_global) for p in sites], axis=0)   # [2, G, B, K]
    s = np.concatenate([logits(cfg, s0.params, g_views, sc.num_global, 2),
                        logits(cfg, s0.params, l_views, sc.num_local, 2)], axis=1)      # [2, V, B, K]
    np.testing.assert_allclose(np.asarray(state.center), (1 - CM) * t.mean(axis=(1, 2)), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(loss, np_dino_loss(s, t, np.zeros((2, OUT)), sc.student_temp, 0.05), rtol=1e-4)
    # the EMA of the student would give another centre: the sites really are the teachers
    t_ema = logits(cfg, s0.ema_params, g_views, sc.num_global, 2)
    assert np.abs((1 - CM) * t_ema.mean(axis=(1, 2)) - np.asarray(state.center)).max() > 1e-4
    # the site teachers are not trained; the student and its EMA are
    assert any(np.abs(v - flat(s0.params)[k]).max() > 0 for k, v in flat(state.params).items())


# ---------------------------------------------------------------------------
# effective_prototypes: exp(entropy) of the batch-mean teacher distribution (first head)
# ---------------------------------------------------------------------------

def np_effective_prototypes(teacher_logits, center, temp):
    """float64: softmax((t - c) / T) of head 0, mean over views and batch, exp(entropy)."""
    q = np_softmax((np.asarray(teacher_logits, np.float64)[0] - np.asarray(center, np.float64)[0]) / temp)
    p = q.reshape(-1, q.shape[-1]).mean(0)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def test_effective_prototypes_hand_built_cases():
    from msd_jax.msd import loss as loss_lib
    k, big = 8, 50.0
    # [H=2, G=2, B=3, K]: head 0 sends every row to prototype 5 (sharply) -> 1 prototype
    t = np.zeros((2, 2, 3, k), np.float32)
    t[0, :, :, 5] = big
    t[1] = np.random.default_rng(0).normal(size=(2, 3, k))    # head 1 is ignored
    c = np.zeros((2, k), np.float32)
    got = float(step_lib.effective_prototypes(loss_lib.teacher_probs(jnp.asarray(t), c, 1.0)))
    assert got == pytest.approx(1.0, abs=1e-6)
    # rows split evenly between prototypes 1 and 2 -> exactly 2
    t2 = np.zeros((1, 2, 2, k), np.float32)
    t2[0, :, 0, 1] = big
    t2[0, :, 1, 2] = big
    got = float(step_lib.effective_prototypes(loss_lib.teacher_probs(jnp.asarray(t2), c[:1], 1.0)))
    assert got == pytest.approx(2.0, abs=1e-6)
    # uniform rows -> K; each row one-hot but on a different prototype -> also K (no collapse)
    assert float(step_lib.effective_prototypes(jnp.full((1, 1, 4, k), 1.0 / k))) == pytest.approx(k, rel=1e-6)
    assert float(step_lib.effective_prototypes(jnp.eye(k)[None, None])) == pytest.approx(k, rel=1e-6)
    # random logits, a centre and a temperature against the float64 reference
    rng = np.random.default_rng(1)
    t3 = rng.normal(size=(2, 2, 5, k)).astype(np.float32)
    c3 = rng.normal(size=(2, k)).astype(np.float32) * 0.3
    ref = np_effective_prototypes(t3, c3, 0.3)
    assert 1.5 < ref < k - 0.5
    got = float(step_lib.effective_prototypes(loss_lib.teacher_probs(jnp.asarray(t3), jnp.asarray(c3), 0.3)))
    assert got == pytest.approx(ref, rel=1e-5)


def test_effective_prototypes_in_step_metrics(three_steps):
    """The step's metric equals the float64 value from the teacher logits of that step's views."""
    d = three_steps
    cfg, sc = d["cfg"], d["sc"]
    for step in range(2):
        state = d["states"][step]
        g_views, _ = views_for(sc, d["key"], step, d["tokens"], d["ids"])
        t = logits(cfg, state.ema_params, g_views, sc.num_global)
        ref = np_effective_prototypes(t, np.asarray(state.center), 0.05)
        assert d["metrics"][step]["effective_prototypes"] == pytest.approx(ref, rel=1e-3)


def test_after_keeps_values_and_passes_non_finite_gradients_on():
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    tree = {"a": jnp.ones((4, 5)), "b": {"c": jnp.full((3,), -2.0)}}
    np.testing.assert_array_equal(np.asarray(step_lib.after(x, tree)), np.arange(6).reshape(2, 3))
    assert step_lib.after(x.astype(jnp.bfloat16), tree).dtype == jnp.bfloat16
    bad = {"a": jnp.ones((4, 5)), "b": {"c": jnp.array([np.inf, 0.0, 0.0])}}
    assert np.isnan(np.asarray(step_lib.after(x, bad))).all()
