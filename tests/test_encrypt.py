"""Tests for msd_jax.encryption.encrypt: the fixed head, the per-image secret permutations, the head file.

Plain head tokens are recomputed in numpy (patchify + linear + position embedding) and encrypted
rows are matched back to them, so a permutation is checked without trusting the code under test.
"""
import json
import os

import flax.serialization
import jax
import numpy as np
import pytest

from msd_jax.trust import InputError
from msd_jax.encryption import encrypt, shards
from msd_jax.data.sites import FederatedData
from msd_jax.data.sources import ImageSet
from msd_jax.layout import Workdir
from msd_jax.models import vit
from conftest import TINY_MODEL, mode_of, model_of, tiny_config, tiny_demo_config, tiny_model

CFG = tiny_model(**TINY_MODEL)
NUM_PATCHES = (16 // 4) ** 2
MEAN, STD = 0.5, 0.25


def _images(n=6, seed=0, size=16, channels=1):
    return np.random.default_rng(seed).uniform(size=(n, size, size, channels)).astype(np.float32)


@pytest.fixture(scope="module")
def head():
    return jax.device_get(vit.init_head(CFG, jax.random.key(7)))


def numpy_plain_tokens(head_params, images, cfg=CFG, mean=MEAN, std=STD):
    """Independent head: normalise, cut p x p patches in raster order, linear, + position."""
    x = (np.asarray(images, np.float64) - mean) / std
    n, h, w, c = x.shape
    p, g = cfg.patch_size, h // cfg.patch_size
    patches = x.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * c)
    k = np.asarray(head_params["patch_embed"]["kernel"], np.float64)
    b = np.asarray(head_params["patch_embed"]["bias"], np.float64)
    pos = np.asarray(head_params["pos_embed"], np.float64)
    return patches @ k + b + pos


def match_rows(enc, plain, tol=1e-4):
    """For each row of enc [k, D], the index of the equal row of plain [n, D] (asserting it is
    unambiguous)."""
    d = np.linalg.norm(enc[:, None, :].astype(np.float64) - plain[None, :, :], axis=-1)
    idx = d.argmin(axis=1)
    assert np.all(d[np.arange(len(enc)), idx] < tol), d.min(axis=1)
    second = np.sort(d, axis=1)[:, 1]
    assert np.all(second > 100 * tol)  # the plain rows are far apart, so the match is certain
    return idx


def permutations_of(enc, plain):
    return [match_rows(e, p) for e, p in zip(np.asarray(enc), plain)]


# ---------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------
def test_plain_tokens_match_numpy_head(head):
    imgs = _images()
    got = np.asarray(encrypt.plain_tokens(head, CFG, imgs, MEAN, STD))
    np.testing.assert_allclose(got, numpy_plain_tokens(head, imgs), atol=1e-4, rtol=1e-5)


def test_keep_all_is_a_permutation_per_image(head):
    imgs = _images(8)
    enc = encrypt.encrypt_images(head, CFG, imgs, jax.random.key(1), keep_ratio=1.0, mean=MEAN, std=STD)
    assert enc.shape == (8, NUM_PATCHES, CFG.embed_dim)
    assert enc.dtype == np.float32
    perms = permutations_of(enc, numpy_plain_tokens(head, imgs))
    for perm in perms:
        np.testing.assert_array_equal(np.sort(perm), np.arange(NUM_PATCHES))
        assert not np.array_equal(perm, np.arange(NUM_PATCHES))  # not left in raster order
    # A fresh permutation per image.
    assert len({tuple(p) for p in perms}) == len(perms)


def test_identical_images_get_different_permutations(head):
    one = _images(1, seed=3)
    imgs = np.concatenate([one, one, one])
    enc = encrypt.encrypt_images(head, CFG, imgs, jax.random.key(2), mean=MEAN, std=STD)
    perms = permutations_of(enc, numpy_plain_tokens(head, imgs))
    assert len({tuple(p) for p in perms}) == 3
    # Same multiset of tokens, different order.
    rows = [sorted(map(tuple, np.round(e, 4))) for e in enc]
    assert rows[0] == rows[1] == rows[2]
    assert not np.array_equal(enc[0], enc[1])


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0 / NUM_PATCHES])
def test_keep_ratio_is_a_subset_without_repeats(head, ratio):
    imgs = _images(6, seed=1)
    keep = max(1, int(np.floor(ratio * NUM_PATCHES + 0.5)))
    enc = encrypt.encrypt_images(head, CFG, imgs, jax.random.key(3), keep_ratio=ratio, mean=MEAN, std=STD)
    assert enc.shape == (6, keep, CFG.embed_dim)
    subsets = permutations_of(enc, numpy_plain_tokens(head, imgs))
    for s in subsets:
        assert len(set(s.tolist())) == keep
        assert s.min() >= 0 and s.max() < NUM_PATCHES
    if keep > 1:
        assert len({tuple(s) for s in subsets}) == len(subsets)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01])
def test_bad_keep_ratio(head, ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        encrypt.encrypt_images(head, CFG, _images(2), jax.random.key(0), keep_ratio=ratio)


def test_batching_does_not_change_the_output(head):
    imgs = _images(7, seed=4)
    key = jax.random.key(11)
    a = encrypt.encrypt_images(head, CFG, imgs, key, batch_size=256, mean=MEAN, std=STD)
    b = encrypt.encrypt_images(head, CFG, imgs, key, batch_size=3, mean=MEAN, std=STD)
    np.testing.assert_array_equal(a, b)


def test_site_keys(head):
    imgs = _images(5, seed=2)
    plain = numpy_plain_tokens(head, imgs)

    def run(key):
        return encrypt.encrypt_images(head, CFG, imgs, key, mean=MEAN, std=STD)

    a1 = run(encrypt.site_key("seed", 0, "hospital_a"))
    a2 = run(encrypt.site_key("seed", 0, "hospital_a"))
    np.testing.assert_array_equal(a1, a2)
    b = run(encrypt.site_key("seed", 0, "hospital_b"))
    other_seed = run(encrypt.site_key("seed", 1, "hospital_a"))
    pa, pb, ps = (permutations_of(x, plain) for x in (a1, b, other_seed))
    for i in range(len(imgs)):
        assert not np.array_equal(pa[i], pb[i])
        assert not np.array_equal(pa[i], ps[i])
    u1 = run(encrypt.site_key("urandom", 0, "hospital_a"))
    u2 = run(encrypt.site_key("urandom", 0, "hospital_a"))
    pu1, pu2 = permutations_of(u1, plain), permutations_of(u2, plain)
    assert all(not np.array_equal(x, y) for x, y in zip(pu1, pu2))
    assert all(not np.array_equal(x, y) for x, y in zip(pu1, pa))
    with pytest.raises(ValueError, match="key_source"):
        encrypt.site_key("zeros", 0, "a")


# Tokens stored in float32, so that they equal encrypt_images' output; shards of three images, so that
# a site of seven fills three.
SHARDS = dict(encrypt=dict(dtype="float32", shard_size=3))


def _imageset(images):
    n = len(images)
    return ImageSet(images, np.zeros(n, np.int32), ("a", "b"), tuple(f"x{i}.png" for i in range(n)))


def test_site_key_never_written(tmp_path, monkeypatch):
    """The site key (urandom) neither as key bytes nor as its integer seed in any written file."""
    from msd_jax import parties

    fixed = bytes([0x9D, 0x31, 0xC4, 0x7A, 0x55, 0xE2, 0x08, 0xB6])
    seed_int = int.from_bytes(fixed, "little") >> 1
    real_urandom = os.urandom
    calls = []

    def fake_urandom(n):
        if n == 8:
            calls.append(n)
            return fixed
        return real_urandom(n)

    monkeypatch.setattr(encrypt.os, "urandom", fake_urandom)
    cfg = tiny_config(SHARDS, start=tiny_demo_config(), encrypt=dict(key_source="urandom", mode="paper"))
    imgs = _images(7, seed=9)
    data = FederatedData(sites=[("alpha", _imageset(imgs))], test=_imageset(imgs[:2]), proxy=None)
    wd = Workdir(str(tmp_path / "wd"))
    parties.run_encrypt(cfg, model_of(cfg), mode_of(cfg), wd, data, log=lambda *_: None)
    monkeypatch.setattr(encrypt.os, "urandom", real_urandom)
    assert calls, "the urandom key source did not draw from os.urandom"

    key = jax.random.key(seed_int)
    head_params, _ = encrypt.load_head(wd.head, CFG)
    # The shards really are encrypted with this key (so scanning for it is meaningful) ...
    tokens, manifest = shards.load_shards(wd.shards("alpha"))
    expected = encrypt.encrypt_images(head_params, CFG, imgs, key, mean=cfg.data.mean, std=cfg.data.std)
    np.testing.assert_array_equal(tokens, expected)
    # ... and are not in raster order.
    perms = permutations_of(tokens, numpy_plain_tokens(head_params, imgs))
    assert all(not np.array_equal(p, np.arange(NUM_PATCHES)) for p in perms)

    secrets_bin, secrets_txt = [], [str(seed_int), hex(seed_int)[2:]]
    for k in [key] + [jax.random.fold_in(key, i) for i in range(len(imgs))]:
        words = np.asarray(jax.random.key_data(k), np.uint32).reshape(-1)
        secrets_bin += [words.astype("<u4").tobytes(), words.astype(">u4").tobytes(),
                        words.astype("<u8").tobytes()]
        secrets_txt += [str(int(w)) for w in words if int(w) > 10 ** 6]
    secrets_txt += [str(p.tolist()) for p in perms] + [",".join(map(str, p)) for p in perms]
    scanned = []
    for root, _, files in os.walk(wd.root):
        for name in files:
            path = os.path.join(root, name)
            data_bytes = open(path, "rb").read()
            scanned.append(os.path.relpath(path, wd.root))
            for s in secrets_bin:
                assert s not in data_bytes, f"key bytes found in {path}"
            text = data_bytes.decode("latin-1")
            for s in secrets_txt:
                assert s not in text, f"secret {s!r} found in {path}"
    assert "shards/alpha/manifest.json" in scanned and "head/head.json" in scanned
    assert len([s for s in scanned if s.startswith("shards/alpha/tokens-")]) == 3
    assert set(manifest) >= {"site", "num_images", "head_fingerprint"}


# ---------------------------------------------------------------------------------------------
# Head: fingerprint and file
# ---------------------------------------------------------------------------------------------
def test_fingerprint_changes_with_any_head_parameter(head):
    base = encrypt.head_fingerprint(CFG, head)
    assert len(base) == 64 and int(base, 16) >= 0
    same = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), head)
    assert encrypt.head_fingerprint(CFG, same) == base
    prints = {base}
    leaves, treedef = jax.tree_util.tree_flatten(head)
    for i, leaf in enumerate(leaves):
        changed = [np.array(x, copy=True) for x in leaves]
        flat = changed[i].reshape(-1)
        flat[len(flat) // 2] += np.float32(1e-3)
        fp = encrypt.head_fingerprint(CFG, jax.tree_util.tree_unflatten(treedef, changed))
        assert fp not in prints
        prints.add(fp)
    # A change of the head's shape fields (same parameters) changes it too.
    import dataclasses
    assert encrypt.head_fingerprint(dataclasses.replace(CFG, pos_embed="random"), head) != base


def test_save_load_head_round_trip(tmp_path, head):
    d = str(tmp_path / "head")
    fp = encrypt.save_head(d, CFG, head)
    assert fp == encrypt.head_fingerprint(CFG, head)
    assert sorted(os.listdir(d)) == sorted([encrypt.HEAD_FILE, encrypt.HEAD_META])
    meta = json.load(open(os.path.join(d, encrypt.HEAD_META)))
    assert meta["fingerprint"] == fp
    assert meta["embed_dim"] == 16 and meta["patch_size"] == 4 and meta["image_size"] == 16
    loaded, fp2 = encrypt.load_head(d, CFG)
    assert fp2 == fp
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(head)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(head)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # get_or_create_head reuses the file instead of drawing a new head from the key.
    again, fp3 = encrypt.get_or_create_head(d, CFG, jax.random.key(999))
    assert fp3 == fp
    np.testing.assert_array_equal(again["patch_embed"]["kernel"], head["patch_embed"]["kernel"])


def test_get_or_create_head_creates(tmp_path):
    d = str(tmp_path / "h")
    p1, fp1 = encrypt.get_or_create_head(d, CFG, jax.random.key(1))
    assert os.path.isfile(os.path.join(d, encrypt.HEAD_META))
    p2, fp2 = encrypt.get_or_create_head(str(tmp_path / "h2"), CFG, jax.random.key(2))
    assert fp1 != fp2


def test_load_head_of_another_model(tmp_path, head):
    import dataclasses

    d = str(tmp_path / "head")
    encrypt.save_head(d, CFG, head)
    other = dataclasses.replace(CFG, embed_dim=24)
    with pytest.raises(ValueError, match="embed_dim") as e:
        encrypt.load_head(d, other)
    assert os.path.join(d, encrypt.HEAD_META) in str(e.value)
    with pytest.raises(ValueError, match="patch_size"):
        encrypt.load_head(d, dataclasses.replace(CFG, patch_size=8))


def test_load_head_replaced_parameters(tmp_path, head):
    d = str(tmp_path / "head")
    encrypt.save_head(d, CFG, head)
    other = jax.device_get(vit.init_head(CFG, jax.random.key(8)))
    with open(os.path.join(d, encrypt.HEAD_FILE), "wb") as f:
        f.write(flax.serialization.to_bytes(other))
    with pytest.raises(ValueError, match="fingerprint") as e:
        encrypt.load_head(d, CFG)
    assert os.path.join(d, encrypt.HEAD_FILE) in str(e.value)


def test_load_head_flipped_byte(tmp_path, head):
    d = str(tmp_path / "head")
    encrypt.save_head(d, CFG, head)
    path = os.path.join(d, encrypt.HEAD_FILE)
    data = bytearray(open(path, "rb").read())
    data[-2] ^= 0x40  # inside the last array's raw float bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError) as e:
        encrypt.load_head(d, CFG)
    assert path in str(e.value)


def test_load_head_missing(tmp_path):
    with pytest.raises(InputError) as e:
        encrypt.load_head(str(tmp_path / "nohead"), CFG)
    assert str(tmp_path / "nohead") in str(e.value)


# ---------------------------------------------------------------------------------------------
# Positions and encryption modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_token_positions_are_the_emitted_order(head, ratio):
    """token_positions (the audit's ground truth) names the raster position of every emitted token,
    checked by matching the tokens to the numpy head's rows; also from an offset start."""
    imgs = _images(6, seed=5)
    key = jax.random.key(21)
    enc = encrypt.encrypt_images(head, CFG, imgs, key, keep_ratio=ratio, mean=MEAN, std=STD)
    found = np.stack(permutations_of(enc, numpy_plain_tokens(head, imgs)))
    np.testing.assert_array_equal(encrypt.token_positions(key, 6, NUM_PATCHES, ratio), found)
    np.testing.assert_array_equal(encrypt.token_positions(key, 2, NUM_PATCHES, ratio, start=4), found[4:])


def test_secret_mode_eval_head_checks_the_fingerprint(tmp_path):
    cfg = tiny_config(SHARDS, start=tiny_demo_config(), encrypt=dict(key_source="seed", mode="secret_head"))
    root = str(tmp_path / "wd")
    mode = mode_of(cfg)
    h1, fp1 = encrypt.site_head(cfg, model_of(cfg), mode, root)
    assert not os.path.exists(os.path.join(root, "head", encrypt.HEAD_FILE))  # nothing public
    encrypt.write_transform(os.path.join(root, "head"), CFG, mode, fp1)
    placeholder = encrypt.server_head(mode, os.path.join(root, "head"), CFG)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(placeholder))
    got = encrypt.eval_head(cfg, CFG, mode, root, placeholder)
    np.testing.assert_array_equal(got["patch_embed"]["kernel"], h1["patch_embed"]["kernel"])
    other = tiny_config(SHARDS, start=tiny_demo_config(), encrypt=dict(key_source="seed", mode="secret_head"))
    other.seed = 5                                   # another shared key (seed-derived)
    with pytest.raises(ValueError, match="fingerprint"):
        encrypt.eval_head(other, CFG, mode_of(other), root, placeholder)
    # paper mode: the backbone's public head is used as it is
    cfg.encrypt.mode = "paper"
    assert encrypt.eval_head(cfg, CFG, mode_of(cfg), root, placeholder) is placeholder
