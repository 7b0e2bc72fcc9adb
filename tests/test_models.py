"""Tests for msd_jax.models.vit: shapes, config validation, patchify, position embeddings, the
client-side head, permutation invariance of the body, the DINO head and the weight-decay mask.

Numbers are checked against independent float64 numpy references written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.config import base_config
from msd_jax.models import vit
from conftest import tiny_model, tiny_model_config

# ---------------------------------------------------------------------------
# Independent references (float64 numpy)
# ---------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def np_gelu(x):
    """Exact GELU: x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_patchify(images, p):
    """Loop over the patch grid in raster order; inside a patch, (row, col, channel) order."""
    b, h, w, c = images.shape
    out = []
    for bi in range(b):
        rows = []
        for gy in range(h // p):
            for gx in range(w // p):
                vec = []
                for dy in range(p):
                    for dx in range(p):
                        for ch in range(c):
                            vec.append(images[bi, gy * p + dy, gx * p + dx, ch])
                rows.append(vec)
        out.append(rows)
    return np.asarray(out, np.float64)


def np_sincos(embed_dim, grid):
    """MAE 2-D sin-cos embedding, position by position: [sin(x w), cos(x w), sin(y w), cos(y w)]
    with w_i = 10000^(-i / (D/4)), x the column and y the row of the patch, raster order."""
    q = embed_dim // 4
    out = np.zeros((grid * grid, embed_dim))
    for y in range(grid):
        for x in range(grid):
            n = y * grid + x
            for i in range(q):
                w = 10000.0 ** (-i / q)
                out[n, i] = math.sin(x * w)
                out[n, q + i] = math.cos(x * w)
                out[n, 2 * q + i] = math.sin(y * w)
                out[n, 3 * q + i] = math.cos(y * w)
    return out


def np_dino_head(x, params, num_layers):
    x = np.asarray(x, np.float64)
    for i in range(num_layers):
        layer = params[f"mlp{i}"]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < num_layers - 1:
            x = np_gelu(x)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    v = np.asarray(params["last_layer"], np.float64)
    w = v / np.linalg.norm(v, axis=0, keepdims=True)
    return x @ w


def small_cfg(**kw):
    base = dict(image_size=16, patch_size=4, channels=1, embed_dim=32, depth=2, num_heads=2,
                out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    base.update(kw)
    return tiny_model(**base)


def init_student(cfg, key, num_heads_out=1):
    """vit.init_student under jit (eager flax init dispatches op by op and is slow on CPU)."""
    return jax.jit(lambda k: vit.init_student(cfg, k, num_heads_out))(key)


def init_head(cfg, key):
    return jax.jit(lambda k: vit.init_head(cfg, k))(key)


def shapes_of(tree):
    return {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# Shapes per variant
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant,dim,heads", [("Ti", 192, 3), ("S", 384, 6), ("B", 768, 12)])
def test_variant_parameter_shapes(variant, dim, heads):
    mc = tiny_model_config(variant=variant, image_size=32, patch_size=8, out_dim=256, head_hidden_dim=64,
                      head_bottleneck_dim=32)
    cfg = vit.ViTConfig.from_config(mc)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (dim, 12, heads)

    params = jax.eval_shape(lambda k: vit.init_student(cfg, k), jax.random.key(0))
    shapes = shapes_of(params)
    hidden = int(dim * 4.0)
    expected = {"['body']['cls_token']": (1, 1, dim), "['body']['cls_pos_embed']": (1, 1, dim),
                "['body']['norm']['scale']": (dim,), "['body']['norm']['bias']": (dim,)}
    for i in range(12):
        blk = f"['body']['block{i}']"
        expected.update({
            f"{blk}['norm1']['scale']": (dim,), f"{blk}['norm1']['bias']": (dim,),
            f"{blk}['norm2']['scale']": (dim,), f"{blk}['norm2']['bias']": (dim,),
            f"{blk}['attn']['qkv']['kernel']": (dim, 3 * dim), f"{blk}['attn']['qkv']['bias']": (3 * dim,),
            f"{blk}['attn']['proj']['kernel']": (dim, dim), f"{blk}['attn']['proj']['bias']": (dim,),
            f"{blk}['mlp']['fc1']['kernel']": (dim, hidden), f"{blk}['mlp']['fc1']['bias']": (hidden,),
            f"{blk}['mlp']['fc2']['kernel']": (hidden, dim), f"{blk}['mlp']['fc2']['bias']": (dim,),
        })
    expected.update({
        "['heads_0']['mlp0']['kernel']": (dim, 64), "['heads_0']['mlp0']['bias']": (64,),
        "['heads_0']['mlp1']['kernel']": (64, 64), "['heads_0']['mlp1']['bias']": (64,),
        "['heads_0']['mlp2']['kernel']": (64, 32), "['heads_0']['mlp2']['bias']": (32,),
        "['heads_0']['last_layer']": (32, 256),
    })
    assert shapes == expected
    assert vit.count_params(params) == sum(int(np.prod(s)) for s in expected.values())

    # the number of attention heads shows in the attention weights of the last block
    tokens = jax.ShapeDtypeStruct((2, 5, dim), jnp.float32)
    out, weights = jax.eval_shape(
        lambda p, t: vit.Body(cfg).apply({"params": p}, t, return_attention=True), params["body"], tokens)
    assert out.shape == (2, 6, dim)
    assert weights.shape == (2, heads, 6, 6)


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_patch_head_shapes(patch, channels):
    cfg = vit.ViTConfig.from_config(tiny_model_config(variant="Ti", image_size=32, patch_size=patch,
                                                 channels=channels))
    params = jax.eval_shape(lambda k: vit.init_head(cfg, k), jax.random.key(0))
    n = (32 // patch) ** 2
    assert shapes_of(params) == {"['patch_embed']['kernel']": (patch * patch * channels, 192),
                                 "['patch_embed']['bias']": (192,),
                                 "['pos_embed']": (1, n, 192)}
    images = jax.ShapeDtypeStruct((3, 32, 32, channels), jnp.float32)
    out = jax.eval_shape(lambda p, x: vit.PatchHead(cfg).apply({"params": p}, x), params, images)
    assert out.shape == (3, n, 192)
    assert (cfg.num_patches, cfg.patch_dim) == (n, patch * patch * channels)


def test_patch_head_rejects_wrong_image_shape():
    cfg = small_cfg()
    params = init_head(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="PatchHead expects images"):
        vit.PatchHead(cfg).apply({"params": params}, jnp.zeros((1, 16, 16, 3)))


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="config.model.variant"):
        vit.ViTConfig.from_config(tiny_model_config(variant="L"))


# ---------------------------------------------------------------------------
# Validation messages name the field
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(image_size=30, patch_size=8), "config.model.image_size"),
    (dict(image_size=30, patch_size=8), "config.model.patch_size"),
    (dict(channels=2), "config.model.channels"),
    (dict(embed_dim=64, num_heads=3), "config.model.embed_dim"),
    (dict(embed_dim=66, num_heads=3), "config.model.embed_dim"),   # divisible by heads, not by 4
    (dict(pos_embed="learned"), "config.model.pos_embed"),
    (dict(image_size=4, patch_size=8), "config.model.patch_size"),
])
def test_validate_errors_name_field(kw, field):
    with pytest.raises(ValueError) as exc:
        vit.ViTConfig.from_config(tiny_model_config(**kw))
    assert field in str(exc.value)


def test_validate_accepts_good_configs():
    for kw in (dict(image_size=32, patch_size=16, channels=3), dict(embed_dim=64, num_heads=4)):
        vit.ViTConfig.from_config(tiny_model_config(**kw))


# ---------------------------------------------------------------------------
# patchify, sin-cos position embedding, PatchHead numbers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("p,c", [(4, 1), (4, 3), (8, 3)])
def test_patchify_matches_loop(p, c):
    rng = np.random.default_rng(p * 10 + c)
    images = rng.normal(size=(2, 16, 16, c)).astype(np.float32)
    got = np.asarray(vit.patchify(jnp.asarray(images), p))
    np.testing.assert_array_equal(got, np_patchify(images, p).astype(np.float32))


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 3)])
def test_sincos_pos_embed_matches_formula(dim, grid):
    got = vit.sincos_pos_embed(dim, grid)
    assert got.shape == (grid * grid, dim)
    np.testing.assert_allclose(got, np_sincos(dim, grid), atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_patch_head_numbers(c):
    cfg = small_cfg(channels=c)
    params = init_head(cfg, jax.random.key(1))
    # the fixed sin-cos embedding is what the head is initialised with
    np.testing.assert_allclose(np.asarray(params["pos_embed"])[0], np_sincos(32, 4), atol=1e-6)
    # make the bias non-zero so it is part of the check
    params = jax.tree_util.tree_map(np.asarray, params)
    params["patch_embed"]["bias"] = np.linspace(-1, 1, 32).astype(np.float32)
    images = np.random.default_rng(0).normal(size=(3, 16, 16, c)).astype(np.float32)
    got = np.asarray(vit.PatchHead(cfg).apply({"params": params}, jnp.asarray(images)))
    ref = (np_patchify(images, 4) @ np.asarray(params["patch_embed"]["kernel"], np.float64)
           + np.asarray(params["patch_embed"]["bias"], np.float64)
           + np.asarray(params["pos_embed"], np.float64))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_random_pos_embed_is_not_sincos():
    params = init_head(small_cfg(pos_embed="random"), jax.random.key(0))
    pe = np.asarray(params["pos_embed"])
    assert pe.shape == (1, 16, 32)
    assert 0.005 < pe.std() < 0.03 and np.abs(pe).max() < 0.05  # trunc-normal(0.02) at 2 sigma


# ---------------------------------------------------------------------------
# Body: permutation invariance / equivariance
# ---------------------------------------------------------------------------

def test_body_permutation_invariance_and_equivariance():
    cfg = small_cfg()
    rng = np.random.default_rng(0)
    # random weights of order one: at init (std 0.02) the CLS barely looks at the tokens, which would
    # make invariance hold trivially
    params = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.5,
                                    init_student(cfg, jax.random.key(3))["body"])
    b, n = 3, 9
    tokens = rng.normal(size=(b, n, 32)).astype(np.float32)
    perms = np.stack([rng.permutation(n) for _ in range(b)])
    assert all((p != np.arange(n)).any() for p in perms)
    permuted = np.stack([tokens[i, perms[i]] for i in range(b)])

    apply = jax.jit(vit.Body(cfg).apply, static_argnames="return_attention")
    out, w = apply({"params": params}, jnp.asarray(tokens), return_attention=True)
    out_p, w_p = apply({"params": params}, jnp.asarray(permuted), return_attention=True)
    out, out_p, w, w_p = map(np.asarray, (out, out_p, w, w_p))

    np.testing.assert_allclose(out_p[:, 0], out[:, 0], atol=1e-5)            # CLS invariant
    for i in range(b):                                                       # tokens equivariant
        np.testing.assert_allclose(out_p[i, 1:], out[i, 1 + perms[i]], atol=1e-5)
        full = np.concatenate([[0], 1 + perms[i]])
        np.testing.assert_allclose(w_p[i], w[i][:, full][:, :, full], atol=1e-6)
    # encode_cls is the same CLS feature
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p, t: vit.encode_cls(cfg, p, t))(params, permuted)),
                               out[:, 0], atol=1e-5)
    # ...and the CLS output does depend on the token content (the check above is not vacuous)
    changed = tokens.copy()
    changed[:, 0] += rng.normal(size=(b, 32)).astype(np.float32)  # (a constant shift is normed away)
    out_c = np.asarray(apply({"params": params}, jnp.asarray(changed)))
    assert np.abs(out_c[:, 0] - out[:, 0]).max() > 1e-2


def test_body_accepts_any_number_of_tokens():
    cfg = small_cfg()
    params = init_student(cfg, jax.random.key(3))["body"]
    apply = jax.jit(vit.Body(cfg).apply)
    for n in (1, 23):
        out = apply({"params": params}, jnp.ones((2, n, 32)))
        assert out.shape == (2, n + 1, 32)


# ---------------------------------------------------------------------------
# DINO head
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2, 3])
def test_dino_head_matches_numpy(layers):
    head = vit.DINOHead(out_dim=64, hidden_dim=24, bottleneck_dim=16, num_layers=layers)
    rng = np.random.default_rng(layers)
    x = rng.normal(size=(5, 32)).astype(np.float32)
    params = head.init(jax.random.key(0), jnp.asarray(x))["params"]
    # random scale on every weight, non-zero biases: the reference must get all of it right
    params = jax.tree_util.tree_map(
        lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.7, params)
    got = np.asarray(head.apply({"params": params}, jnp.asarray(x)))
    ref = np_dino_head(x, params, layers)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # the output is a cosine between unit vectors: |out| <= 1
    assert np.abs(got).max() <= 1.0 + 1e-5


def test_dino_head_last_layer_columns_have_unit_norm():
    head = vit.DINOHead(out_dim=64, hidden_dim=24, bottleneck_dim=16, num_layers=3)
    x = jnp.ones((1, 32))
    params = head.init(jax.random.key(0), x)["params"]
    # scale the raw weight: the effective weight (read out with one-hot bottleneck vectors by
    # bypassing the MLP) must still have unit-norm columns, i.e. the output is scale-invariant
    scaled = dict(params, last_layer=params["last_layer"] * 37.0)
    out1 = np.asarray(head.apply({"params": params}, jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)))))
    out2 = np.asarray(head.apply({"params": scaled}, jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)))))
    np.testing.assert_allclose(out1, out2, atol=1e-6)

    # effective weight: feed the L2-normalised bottleneck e_i directly by a 1-layer head whose
    # mlp0 is the identity -> out = e_i @ W, row i of W
    ident = vit.DINOHead(out_dim=64, bottleneck_dim=16, num_layers=1)
    p = {"mlp0": {"kernel": jnp.eye(16), "bias": jnp.zeros(16)}, "last_layer": scaled["last_layer"]}
    w_eff = np.asarray(ident.apply({"params": p}, jnp.eye(16)))       # [16, 64] = effective W
    np.testing.assert_allclose(np.linalg.norm(w_eff, axis=0), np.ones(64), atol=1e-5)


def test_student_multi_head_output_shape():
    cfg = small_cfg()
    params = init_student(cfg, jax.random.key(0), num_heads_out=3)
    assert set(params) == {"body", "heads_0", "heads_1", "heads_2"}
    out = jax.jit(vit.Student(cfg, 3).apply)({"params": params}, jnp.ones((4, 7, 32)))
    assert out.shape == (3, 4, 64)


# ---------------------------------------------------------------------------
# Weight-decay mask
# ---------------------------------------------------------------------------

NO_DECAY = {"bias", "scale", "cls_token", "cls_pos_embed", "pos_embed"}


def test_is_decay_param():
    cfg = small_cfg()
    tree = {"student": init_student(cfg, jax.random.key(0), 2), "head": init_head(cfg, jax.random.key(1))}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    seen = {}
    for path, leaf in flat:
        name = path[-1].key
        decay = vit.is_decay_param(path, leaf)
        seen.setdefault(name, set()).add(decay)
        assert decay == (name not in NO_DECAY), jax.tree_util.keystr(path)
        if leaf.ndim == 1:  # DINO never decays 1-D parameters (biases, norm scales)
            assert not decay
    # every kind of leaf was actually encountered
    assert seen == {"kernel": {True}, "last_layer": {True}, "bias": {False}, "scale": {False},
                    "cls_token": {False}, "cls_pos_embed": {False}, "pos_embed": {False}}
