"""Tests for msd_jax.baselines: pixel multi-crop views, the centralized DINO / MSD baselines and the
supervised baseline.

References are independent: bilinear resampling and gaussian blur are recomputed in numpy float64
from their definitions (half-pixel centres, triangle kernel widened by the shrink factor, reflect
padding); the baselines' steps are checked against the project's MSD step (msd/step.py) and the
DINO loss recomputed by tests/np_reference.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.training import batches, metrics
from msd_jax.protocols import centralized, supervised
from msd_jax.training import loop
from msd_jax.data import pixel_views as pv
from msd_jax.config import base_config
from msd_jax.data.sources import ImageSet
from msd_jax.models import vit
from msd_jax.msd import step as step_lib
from conftest import SHORT_MSD, SMALL_MODEL, model_of, tiny_config
from fake_devices import run_script
from np_reference import np_dino_loss

IMG, PATCH, DIM, OUT = (SMALL_MODEL[k] for k in ("image_size", "patch_size", "embed_dim", "out_dim"))

# On top of SHORT_MSD: a fast teacher and a large lr, so that three steps visibly move the weights;
# small batches of the few test images, every step logged.
BASELINES = dict(msd=dict(momentum_teacher=0.5), optim=dict(lr=0.05), train=dict(batch_size=8, log_every=1))


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x), jax.device_get(tree))


# ---------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------

def np_resample(img, box, size, antialias=True):
    """Output pixel o samples y0 + (o + 0.5) h / size (pixel edges); weights of input pixel j are a
    triangle around its centre j + 0.5, of half-width max(h / size, 1) when antialiasing a
    shrink, 1 otherwise; weights renormalised over the pixels inside the image."""
    y0, x0, h, w = box
    H, W, _ = img.shape

    def weights(n_in, start, extent):
        inv = extent / size
        width = max(inv, 1.0) if antialias else 1.0
        m = np.zeros((size, n_in))
        for o in range(size):
            centre = start + (o + 0.5) * inv
            for j in range(n_in):
                m[o, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / width)
            m[o] /= m[o].sum()
        return m

    return np.einsum("oh,hwc,pw->opc", weights(H, y0, h), np.asarray(img, np.float64), weights(W, x0, w))


def np_blur(img, sigma, radius):
    """Direct 2-D gaussian sum (outer product kernel) over a reflect-padded image."""
    off = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (off / sigma) ** 2)
    k /= k.sum()
    k2 = np.outer(k, k)
    x = np.pad(np.asarray(img, np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    H, W, C = img.shape
    out = np.zeros((H, W, C))
    for i in range(H):
        for j in range(W):
            out[i, j] = np.einsum("ab,abc->c", k2, x[i:i + 2 * radius + 1, j:j + 2 * radius + 1])
    return out


# ---------------------------------------------------------------------------
# Pixel views
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_identity_crop_is_the_image(channels):
    img = np.random.default_rng(0).random((12, 12, channels)).astype(np.float32)
    out = pv.resample_box(jnp.asarray(img), jnp.asarray([0.0, 0.0, 12.0, 12.0]), 12)
    np.testing.assert_allclose(np.asarray(out), img, atol=1e-6)
    # a random resized crop whose scale and aspect ranges admit only the whole image
    out = pv.random_resized_crop(jax.random.key(3), jnp.asarray(img), 12, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(np.asarray(out), img, atol=1e-5)


@pytest.mark.parametrize("box,size,channels", [
    ((2.3, 4.1, 7.5, 9.2), 12, 1),    # enlarge a sub-pixel box
    ((0.5, 1.0, 14.0, 13.0), 6, 1),   # shrink (antialiased)
    ((3.0, 2.0, 5.0, 5.0), 16, 3),    # RGB, integer box
    ((0.0, 0.0, 16.0, 16.0), 8, 1),   # whole image halved
])
def test_known_crop_box_matches_numpy(box, size, channels):
    img = np.random.default_rng(1).random((16, 16, channels)).astype(np.float32)
    out = jax.jit(pv.resample_box, static_argnums=2)(jnp.asarray(img), jnp.asarray(box, jnp.float32), size)
    assert out.shape == (size, size, channels)
    np.testing.assert_allclose(np.asarray(out), np_resample(img, box, size), atol=2e-6)
    out = pv.resample_box(jnp.asarray(img), jnp.asarray(box, jnp.float32), size, antialias=False)
    np.testing.assert_allclose(np.asarray(out), np_resample(img, box, size, antialias=False), atol=2e-6)


def test_crop_box_respects_scale_ratio_and_bounds():
    H = W = 32
    scale, ratio = (0.05, 0.4), (3 / 4, 4 / 3)
    boxes = np.asarray(jax.vmap(lambda k: pv.crop_box(k, H, W, scale, ratio))(
        jax.random.split(jax.random.key(0), 500)), np.float64)
    y0, x0, h, w = boxes.T
    assert np.all(y0 >= 0) and np.all(x0 >= 0)
    assert np.all(y0 + h <= H + 1e-4) and np.all(x0 + w <= W + 1e-4)
    area = h * w / (H * W)
    assert np.all(area >= scale[0] - 1e-5) and np.all(area <= scale[1] + 1e-5)
    aspect = w / h
    assert np.all(aspect >= ratio[0] - 1e-5) and np.all(aspect <= ratio[1] + 1e-5)
    assert area.std() > 0.05 and np.ptp(y0) > 10            # really random


def test_crop_box_fallback_is_central_with_clamped_ratio():
    # the whole area at aspect >= 2 never fits a square: torchvision's fallback, w = W, h = W / 2
    box = np.asarray(pv.crop_box(jax.random.key(0), 20, 20, (1.0, 1.0), (2.0, 3.0)))
    np.testing.assert_allclose(box, [5.0, 0.0, 10.0, 20.0], atol=1e-5)


def test_gaussian_blur_matches_numpy():
    img = np.random.default_rng(2).random((10, 9, 2)).astype(np.float32)
    out = pv.gaussian_blur(jnp.asarray(img), jnp.float32(0.8), 3)
    np.testing.assert_allclose(np.asarray(out), np_blur(img, 0.8, 3), atol=1e-5)


def pixel_config(**fields):
    """base_config()'s multi-crop views with `fields` changed."""
    return dataclasses.replace(pv.PixelViewConfig.from_config(base_config()), **fields)


def test_intensity_jitter_on_one_channel():
    img = np.random.default_rng(3).uniform(0.2, 0.8, (8, 8, 1)).astype(np.float32)
    pc = pixel_config(brightness=0.0, contrast=0.0, gamma=0.0)
    np.testing.assert_allclose(np.asarray(pv.intensity_jitter(jax.random.key(0), img, pc)), img, atol=1e-6)
    # contrast only: an affine map around the mean, slope in [1 - c, 1 + c], mean preserved
    pc = pixel_config(brightness=0.0, contrast=0.3, gamma=0.0)
    for k in range(5):
        out = np.asarray(pv.intensity_jitter(jax.random.key(k), img, pc), np.float64)
        slope = np.polyfit(img.ravel(), out.ravel(), 1)[0]
        assert out.shape == img.shape and 0.7 - 1e-4 <= slope <= 1.3 + 1e-4
        np.testing.assert_allclose(out, img.mean() + (img - img.mean()) * slope, atol=1e-5)
    # gamma only: out = img ** g with g in [1 / (1 + gamma), 1 + gamma]
    pc = pixel_config(brightness=0.0, contrast=0.0, gamma=0.5)
    out = np.asarray(pv.intensity_jitter(jax.random.key(7), img, pc), np.float64)
    g = np.log(out) / np.log(img.astype(np.float64))
    assert np.ptp(g) < 1e-3 and 1 / 1.5 - 1e-4 <= g.mean() <= 1.5 + 1e-4


def _plain(**kw):
    base = dict(num_global=2, global_size=16, num_local=3, local_size=8, jitter_prob=0.0,
                global_blur_probs=(0.0,), local_blur_prob=0.0, grayscale_prob=0.0)
    base.update(kw)
    return pixel_config(**base)


def test_flip_of_identity_crop():
    imgs = np.random.default_rng(4).random((3, 16, 16, 1)).astype(np.float32)
    pc = _plain(global_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, num_local=0)
    g, l = pv.make_pixel_views(jax.random.key(0), imgs, jnp.arange(3), pc)
    assert l is None
    np.testing.assert_allclose(np.asarray(g).reshape(2, 3, 16, 16, 1), np.stack([imgs[:, :, ::-1]] * 2),
                               atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_shapes_range_and_determinism(channels):
    c = tiny_config(SHORT_MSD, BASELINES, model=dict(channels=channels))
    pc = pv.PixelViewConfig.from_config(c)
    assert (pc.global_size, pc.local_size, pc.num_global, pc.num_local) == (16, 8, 2, 2)
    imgs = np.random.default_rng(5).random((4, 16, 16, channels)).astype(np.float32)
    ids = jnp.asarray([7, 3, 11, 5], jnp.int32)
    fn = jax.jit(pv.make_pixel_views, static_argnums=3)
    g, l = fn(jax.random.key(0), imgs, ids, pc)
    assert g.shape == (2 * 4, 16, 16, channels) and l.shape == (2 * 4, 8, 8, channels)
    for v in (g, l):
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    g2, l2 = fn(jax.random.key(0), imgs, ids, pc)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))
    np.testing.assert_array_equal(np.asarray(l), np.asarray(l2))
    g3, _ = fn(jax.random.key(1), imgs, ids, pc)
    assert np.abs(np.asarray(g3) - np.asarray(g)).max() > 1e-2
    # an example's views depend on its id only, not on its place in the batch
    perm = np.asarray([2, 0, 3, 1])
    gp, lp = fn(jax.random.key(0), imgs[perm], ids[perm], pc)
    np.testing.assert_allclose(np.asarray(gp).reshape(2, 4, 16, 16, channels),
                               np.asarray(g).reshape(2, 4, 16, 16, channels)[:, perm], atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp).reshape(2, 4, 8, 8, channels),
                               np.asarray(l).reshape(2, 4, 8, 8, channels)[:, perm], atol=1e-6)


def test_local_size_and_config_errors():
    assert [pv.default_local_size(s, p) for s, p in ((32, 8), (64, 8), (224, 16), (16, 8), (8, 8))] == \
        [16, 32, 112, 8, 8]
    for key, bad in (("local_size", 6), ("global_scale", (0.9, 0.4)), ("flip_prob", 1.5)):
        c = tiny_config(SHORT_MSD, BASELINES, baselines={key: bad})
        with pytest.raises(ValueError, match=rf"config\.baselines\.{key}"):
            pv.PixelViewConfig.from_config(c)


def test_resized_pos_embed():
    pos = jnp.asarray(vit.sincos_pos_embed(DIM, 4))[None]
    np.testing.assert_array_equal(np.asarray(vit.resized_pos_embed(pos, 4, 4)), np.asarray(pos))
    # a table linear in the position stays linear at the coarse grid's half-pixel centres wherever
    # the 4-tap cubic kernel lies inside the grid (coarse points 1, 2 of 8 -> 4); constants stay
    ys, xs = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    lin = np.stack([ys, xs, ys + 2 * xs, np.ones_like(ys)], -1).reshape(1, 64, 4)
    out = np.asarray(vit.resized_pos_embed(jnp.asarray(lin, jnp.float32), 8, 4)).reshape(4, 4, 4)
    centre = (np.arange(4) + 0.5) * 2 - 0.5     # coarse pixel centres in fine-grid index coordinates
    inner = slice(1, 3)
    np.testing.assert_allclose(out[inner, inner, 0], np.broadcast_to(centre[inner, None], (2, 2)), atol=1e-5)
    np.testing.assert_allclose(out[inner, inner, 1], np.broadcast_to(centre[None, inner], (2, 2)), atol=1e-5)
    np.testing.assert_allclose(out[inner, inner, 2], (centre[:, None] + 2 * centre[None, :])[inner, inner],
                               atol=1e-5)
    np.testing.assert_allclose(out[..., 3], 1.0, atol=1e-6)
    assert out.shape == (4, 4, 4)


# ---------------------------------------------------------------------------
# The baselines' steps reuse the project's loss and optimizer
# ---------------------------------------------------------------------------

def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, IMG, IMG, 1)).astype(np.float32)


DP_CENTRALIZED = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import test_baselines as tb
from msd_jax.protocols import centralized
from msd_jax.data import pixel_views as pv
from msd_jax.models import vit
from msd_jax.msd import step as step_lib

out = {}
for pixel in (False, True):
    c = tb.tiny_config(tb.SHORT_MSD, tb.BASELINES, train=dict(batch_size=16))
    cfg = vit.ViTConfig.from_config(c.model)
    b = 16
    sc = step_lib.StepConfig.from_config(c, cfg.num_patches, 10, 5, b)
    params, pos = centralized.initial_params(c, cfg)
    pc = pv.PixelViewConfig.from_config(c) if pixel else None
    fn = centralized.make_ssl_step(cfg, sc, pos, mean=0.5, std=0.25, pixel=pc)
    imgs, ids, key = tb._images(b), np.arange(b, dtype=np.int32), jax.random.key(5)
    runs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = step_lib.make_mesh(devices)
        state = step_lib.replicate(mesh, step_lib.init_state(params, 1, cfg.out_dim, sc))
        args = (state,) + tuple(step_lib.shard_batch(mesh, imgs, ids)) + (key,)
        compiled = step_lib.jit_train_step(fn, mesh).lower(*args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        new, m = compiled(*args)
        leaves = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(jax.device_get(new.params))]
        runs.append(dict(flops=float(cost["flops"]), loss=float(m["loss"]), params=leaves))
    start = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(jax.device_get(params))]
    out["pixel" if pixel else "token"] = dict(runs=runs, start=start, lr=float(sc.lr))
json.dump(out, open(sys.argv[2], "w"))
"""


def test_centralized_step_is_data_parallel(tmp_path):
    """The centralized-MSD and pixel-DINO steps on 8 fake CPU devices: each device computes about
    an eighth of the step's FLOPs (views kept batch-major; a view-major layout made XLA gather the
    views and run the whole step everywhere), with the single-device step's loss and update."""
    run_script(tmp_path, DP_CENTRALIZED, 8, tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    for kind, r in out.items():
        one, eight = r["runs"]
        assert eight["flops"] < 0.3 * one["flops"], (kind, one["flops"], eight["flops"])
        np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5, err_msg=kind)
        assert len(one["params"]) == len(eight["params"]) == len(r["start"]) > 10
        a = np.concatenate([np.ravel(x) for x in one["params"]])
        b = np.concatenate([np.ravel(x) for x in eight["params"]])
        p0 = np.concatenate([np.ravel(x) for x in r["start"]])
        assert np.abs(a - p0).max() > 0.5 * r["lr"]  # the step did move the parameters
        # Adam's first step divides by |g| + 1e-8: where a gradient is near 1e-8 (the key bias, whose
        # exact gradient is 0) the summation order (one device or eight) shows, by at most a flipped
        # step (2 lr); all but a handful of elements are equal to float32 rounding
        assert np.abs(b - a).max() <= 2 * r["lr"], kind
        assert np.mean(np.abs(b - a) > 2e-5) < 1e-3, (kind, np.sum(np.abs(b - a) > 2e-5), a.size)


def test_centralized_msd_step_equals_project_step_on_the_body():
    """One centralized-MSD step updates the student exactly as msd/step.py does on the tokens of
    the same (trainable) head: same views, DINO loss, AdamW, clipping, EMA and centre."""
    c = tiny_config(SHORT_MSD, BASELINES)
    cfg = vit.ViTConfig.from_config(c.model)
    b = 8
    sc = step_lib.StepConfig.from_config(c, cfg.num_patches, 10, 5, b)
    params, pos = centralized.initial_params(c, cfg)
    imgs, ids, key = _images(b), np.arange(100, 100 + b, dtype=np.int32), jax.random.key(5)
    ours = jax.jit(centralized.make_ssl_step(cfg, sc, pos, mean=0.5, std=0.25, pixel=None))
    s1, m1 = ours(step_lib.init_state(params, 1, OUT, sc), imgs, ids, key)
    head = {"patch_embed": params["patch_embed"], "pos_embed": pos}
    tokens = vit.PatchHead(cfg).apply({"params": head}, (imgs - 0.5) / 0.25)
    ref_fn = jax.jit(step_lib.make_train_step(cfg, sc))
    s2, m2 = ref_fn(step_lib.init_state(params["student"], 1, OUT, sc), tokens, ids, key)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    a, r, p0 = flat(s1.params["student"]), flat(s2.params), flat(params["student"])
    assert a.keys() == r.keys()
    for k in a:
        # Adam's first update is lr * g / (|g| + 1e-8): where g is at float noise level (the key
        # bias, whose exact gradient is 0) its sign depends on the order of summation, which
        # differs (the project step backpropagates its views in groups): those only by bound.
        noise = np.abs(r[k] - p0[k]) < 1e-2 * sc.lr
        np.testing.assert_allclose(a[k][~noise], r[k][~noise], atol=2e-6, err_msg=k)
        assert np.all(np.abs(a[k] - r[k])[noise] <= 2e-2 * sc.lr), k
    for k, v in flat(s1.ema_params["student"]).items():
        np.testing.assert_allclose(v, flat(s2.ema_params)[k], atol=2e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(s1.center), np.asarray(s2.center), atol=1e-6)
    # and the patch embedding is trained (its gradient reaches it)
    assert np.abs(np.asarray(s1.params["patch_embed"]["kernel"]) - params["patch_embed"]["kernel"]).max() > 0


def test_pixel_dino_step_loss_is_dino_loss_of_pixel_views():
    c = tiny_config(SHORT_MSD, BASELINES)
    cfg = vit.ViTConfig.from_config(c.model)
    b = 4
    sc = step_lib.StepConfig.from_config(c, cfg.num_patches, 10, 5, b)
    pc = pv.PixelViewConfig.from_config(c)
    params, pos = centralized.initial_params(c, cfg)
    imgs, ids, key = _images(b, 1), np.arange(b, dtype=np.int32), jax.random.key(2)
    state = step_lib.init_state(params, 1, OUT, sc)
    _, m = jax.jit(centralized.make_ssl_step(cfg, sc, pos, mean=0.5, std=0.25, pixel=pc))(state, imgs, ids, key)
    # rebuild: views keyed by fold_in(key, step 0); local crops with the bicubic-resized embedding
    g, l = jax.jit(pv.make_pixel_views, static_argnums=3)(jax.random.fold_in(key, 0), imgs, ids, pc)

    def tokens(v):
        grid = v.shape[1] // PATCH
        p = vit.resized_pos_embed(jnp.asarray(pos), cfg.grid, grid)
        patches = vit.patchify((v - 0.5) / 0.25, PATCH)
        return patches @ params["patch_embed"]["kernel"] + params["patch_embed"]["bias"] + p

    student = vit.Student(cfg, 1)
    sg = np.asarray(student.apply({"params": params["student"]}, tokens(g))).reshape(1, 2, b, OUT)
    sl = np.asarray(student.apply({"params": params["student"]}, tokens(l))).reshape(1, 2, b, OUT)
    ref = np_dino_loss(np.concatenate([sg, sl], 1), sg, np.zeros((1, OUT)), c.msd.student_temp,
                       c.msd.warmup_teacher_temp)
    np.testing.assert_allclose(float(m["loss"]), ref, rtol=1e-5)


# ---------------------------------------------------------------------------
# Tiny end-to-end runs
# ---------------------------------------------------------------------------

TRAINERS = {"pixel_dino": centralized.train_pixel_dino, "central_msd": centralized.train_centralized_msd}
_RUNS = {}


def tiny_run(name, metrics_path=None):
    """3 steps of a baseline on 20 tiny images (batch 8), computed once per session."""
    if name not in _RUNS:
        lines = []
        c = tiny_config(SHORT_MSD, BASELINES)
        out = TRAINERS[name](c, model_of(c), _images(20, 3), total_steps=3, metrics_path=metrics_path,
                             log=lines.append)
        _RUNS[name] = (out, lines)
    return _RUNS[name]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_centralized_runs(name, tmp_path):
    c = tiny_config(SHORT_MSD, BASELINES)
    cfg = vit.ViTConfig.from_config(c.model)
    imgs = _images(20, 3)
    trainer = TRAINERS[name]
    _RUNS.pop(name, None)
    out, lines = tiny_run(name, metrics_path=str(tmp_path / "m.jsonl"))
    init, pos = centralized.initial_params(c, cfg)
    head0 = {"patch_embed": init["patch_embed"], "pos_embed": pos}
    assert set(out) == {"head", "body"}
    assert jax.tree_util.tree_structure(out["head"]) == jax.tree_util.tree_structure(head0)
    assert jax.tree_util.tree_structure(out["body"]) == jax.tree_util.tree_structure(init["student"]["body"])
    for tree in (out["head"], out["body"]):
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree))
    np.testing.assert_array_equal(out["head"]["pos_embed"], pos)                       # fixed
    assert np.abs(out["head"]["patch_embed"]["kernel"] - init["patch_embed"]["kernel"]).max() > 1e-5
    assert np.abs(out["body"]["block0"]["mlp"]["fc1"]["kernel"]
                  - init["student"]["body"]["block0"]["mlp"]["fc1"]["kernel"]).max() > 1e-5
    assert sum("step 3/3" in l for l in lines) == 1 and "img/s" in lines[-1]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3
    # the backbone works with the evaluation code unchanged
    tokens = vit.PatchHead(cfg).apply({"params": out["head"]}, imgs[:2])
    assert vit.encode_cls(cfg, out["body"], tokens).shape == (2, DIM)
    again = trainer(c, cfg, imgs, total_steps=3, log=lambda _: None)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)                                            # deterministic


DP_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
assert jax.device_count() == 2, jax.devices()
import test_baselines as tb
c = tb.tiny_config(tb.SHORT_MSD, tb.BASELINES)
out = tb.centralized.train_pixel_dino(c, tb.model_of(c), tb._images(20, 3), total_steps=3, log=print)
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree_util.tree_leaves(out)])
"""


def test_pixel_dino_on_a_two_device_mesh_matches_one_device(tmp_path):
    """Batch sharded on 'data' over 2 fake CPU devices (a subprocess: the flag must precede jax's
    import): views are keyed by example id, so the result is the single-device one."""
    res = run_script(tmp_path, DP_SCRIPT, 2, tmp_path / "dp2.npz")
    assert "on 2 cpu device(s)" in res.stdout
    a = np.load(tmp_path / "dp2.npz")
    ref = jax.tree_util.tree_leaves(tiny_run("pixel_dino")[0])
    assert len(a.files) == len(ref)
    for i, x in enumerate(ref):
        np.testing.assert_allclose(a[f"arr_{i}"], np.asarray(x), atol=2e-5, err_msg=str(i))


def test_loop_stops_on_non_finite_metrics():
    """A non-finite metric stops the run with an error naming the metric and the step."""
    c = tiny_config(SHORT_MSD, BASELINES, train=dict(log_every=1))
    mesh = step_lib.make_mesh()

    def step_fn(state, images, ids, key):
        bad = jnp.where(state.step >= 1, jnp.nan, 1.0)
        return state.replace(step=state.step + 1), {"loss": bad, "lr": jnp.float32(0.1)}

    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params={}, ema_params={}, opt_state=(),
                                center=jnp.zeros((1, 2)))
    order = batches.BatchOrder(jax.random.key(0), 8, 4)
    with pytest.raises(metrics.TrainingDivergedError, match=r"non-finite loss at step 2"):
        loop.run(c, party="x", state=state, step_fn=step_fn, arrays=(_images(8),), order=order, mesh=mesh,
                 key=jax.random.key(0), total_steps=5, ckpt_dir=None, metrics_path=None,
                 log=lambda _: None)


def test_centralized_checkpoint_resume(tmp_path):
    c = tiny_config(SHORT_MSD, BASELINES)
    imgs = _images(16, 4)
    out = centralized.train_centralized_msd(c, model_of(c), imgs, total_steps=2, ckpt_dir=str(tmp_path / "ck"),
                                            log=lambda _: None)
    lines = []
    again = centralized.train_centralized_msd(c, model_of(c), imgs, total_steps=2, ckpt_dir=str(tmp_path / "ck"),
                                              log=lines.append)
    assert any("resumed" in l for l in lines)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_centralized_input_errors():
    c = tiny_config(SHORT_MSD, BASELINES)
    with pytest.raises(ValueError, match=r"config\.model\.image_size"):
        centralized.train_pixel_dino(c, model_of(c), np.zeros((8, 32, 32, 1), np.float32), total_steps=1)
    with pytest.raises(ValueError, match="total_steps"):
        centralized.train_centralized_msd(c, model_of(c), _images(8), total_steps=0)


# ---------------------------------------------------------------------------
# Supervised
# ---------------------------------------------------------------------------

def bright_dark(n, seed):
    """Class 1 brighter than class 0 everywhere: separable by the mean intensity."""
    r = np.random.default_rng(seed)
    labels = r.integers(0, 2, n)
    labels[:2] = [0, 1]
    base = np.where(labels[:, None, None, None] == 1, 0.65, 0.35)
    imgs = np.clip(base + 0.1 * r.normal(size=(n, IMG, IMG, 1)), 0, 1).astype(np.float32)
    return ImageSet(imgs, labels.astype(np.int32), ("dark", "bright"), tuple(map(str, range(n))))


def test_supervised_learns_a_separable_set():
    c = tiny_config(SHORT_MSD, BASELINES, optim=dict(lr=0.01, warmup_frac=0.1),
                    train=dict(batch_size=16, log_every=10))
    train, test = bright_dark(64, 0), bright_dark(48, 1)
    cfg = model_of(c)
    out = supervised.train_supervised(c, cfg, train, total_steps=30, log=lambda _: None)
    init, pos = centralized.initial_params(c, cfg)
    assert set(out) == {"head", "body", "classifier"}
    assert out["classifier"]["kernel"].shape == (DIM, 2) and out["classifier"]["bias"].shape == (2,)
    assert jax.tree_util.tree_structure(out["body"]) == jax.tree_util.tree_structure(init["student"]["body"])
    np.testing.assert_array_equal(out["head"]["pos_embed"], pos)
    assert np.abs(out["head"]["patch_embed"]["kernel"] - init["patch_embed"]["kernel"]).max() > 1e-5
    probs = supervised.predict_supervised(c, cfg, out, test.images)
    assert probs.shape == (48, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(1) == test.labels) >= 0.9
    again = supervised.train_supervised(c, cfg, train, total_steps=30, log=lambda _: None)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_predict_supervised_errors():
    c = tiny_config(SHORT_MSD, BASELINES)
    with pytest.raises(ValueError, match="classifier"):
        supervised.predict_supervised(c, model_of(c), {"head": {}, "body": {}}, _images(2))
