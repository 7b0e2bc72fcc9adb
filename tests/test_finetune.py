"""Tests for msd_jax.evaluation.finetune: layer-wise lr decay, features, and full fine-tuning on a separable
set (beats chance, the loss falls, the head is trained only when asked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.protocols import centralized
from msd_jax.data.sources import ImageSet
from msd_jax.evaluation import features as features_lib
from msd_jax.evaluation import finetune as ft
from msd_jax.training import classifier as classifier_lib
from msd_jax.evaluation.linear import linear_probe
from msd_jax.models import vit
from conftest import SMALL_MODEL, tiny_config

IMG, DIM = SMALL_MODEL["image_size"], SMALL_MODEL["embed_dim"]

# Two blocks, so that the layer-wise lr decay has layers to tell apart; a run shorter than 100 steps
# logs its last step only, unless a test asks for more.
FINETUNE = dict(model=dict(depth=2), train=dict(log_every=100))


def backbone(c):
    cfg = vit.ViTConfig.from_config(c.model)
    init, pos = centralized.initial_params(c, cfg)
    return cfg, {"patch_embed": init["patch_embed"], "pos_embed": pos}, init["student"]["body"]


def stripes(n, seed):
    """Class 1: horizontal stripes, class 0: vertical stripes, random phase, contrast and noise
    (same mean brightness, so only the structure separates them)."""
    r = np.random.default_rng(seed)
    labels = r.integers(0, 2, n)
    labels[:2] = [0, 1]
    ramp = np.arange(IMG)
    imgs = np.empty((n, IMG, IMG, 1), np.float32)
    for i, y in enumerate(labels):
        wave = 0.5 + r.uniform(0.2, 0.4) * np.sign(np.sin(2 * np.pi * (ramp + r.integers(0, 4)) / 4 + 0.1))
        img = np.repeat(wave[:, None], IMG, 1) if y == 1 else np.repeat(wave[None, :], IMG, 0)
        imgs[i, ..., 0] = np.clip(img + 0.05 * r.normal(size=img.shape), 0, 1)
    return ImageSet(imgs, labels.astype(np.int32), ("vertical", "horizontal"), tuple(map(str, range(n))))


def test_layer_ids_and_scales():
    c = tiny_config(FINETUNE)
    _, head, body = backbone(c)
    params = {"patch_embed": head["patch_embed"], "body": body,
              "classifier": {"kernel": np.zeros((DIM, 2)), "bias": np.zeros(2)}}
    scales = {jax.tree_util.keystr(p): v
              for p, v in jax.tree_util.tree_flatten_with_path(classifier_lib.layer_scales(params, 2, 0.5))[0]}
    # depth 2: head / CLS at 0.5**3, block0 at 0.5**2, block1 at 0.5, final norm and classifier at 1
    assert scales["['patch_embed']['kernel']"] == 0.125
    assert scales["['body']['cls_token']"] == 0.125 and scales["['body']['cls_pos_embed']"] == 0.125
    assert scales["['body']['block0']['attn']['qkv']['kernel']"] == 0.25
    assert scales["['body']['block1']['mlp']['fc2']['bias']"] == 0.5
    assert scales["['body']['norm']['scale']"] == 1.0
    assert scales["['classifier']['kernel']"] == 1.0
    assert set(jax.tree_util.tree_leaves(classifier_lib.layer_scales(params, 2, 1.0))) == {1.0}


@pytest.mark.parametrize("kind", ["cls", "avgpool", "cls_avgpool"])
def test_pool_features_match_eval_features(kind):
    c = tiny_config(FINETUNE)
    cfg, head, body = backbone(c)
    imgs = np.random.default_rng(0).random((3, IMG, IMG, 1)).astype(np.float32)
    ref = features_lib.extract_features(head, body, cfg, imgs, mean=0.5, std=0.25)[kind]
    tokens = vit.embed_images(cfg, head["patch_embed"], jnp.asarray(head["pos_embed"]), jnp.asarray(imgs),
                               0.5, 0.25)
    out = vit.pool_features(vit.Body(cfg).apply({"params": body}, tokens), kind)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert out.shape[1] == vit.feature_dim(cfg, kind)


def test_finetune_beats_chance_and_the_loss_falls():
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=32, finetune_lr=0.02, finetune_warmup_frac=0.1,
                                        finetune_layer_decay=0.75, finetune_features="cls",
                                        finetune_val_fraction=0.0, finetune_init="random"))
    model, head, body = backbone(c)
    train, test = stripes(96, 0), stripes(64, 1)
    r = ft.finetune(c, model, head, body, train, test, steps=80, seed=0, log=lambda _: None, log_every=10)
    losses = [h["loss"] for h in r["history"]]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.2
    assert r["accuracy"] >= 0.85 and r["auc"] >= 0.9           # chance: 0.5
    # accuracy / auc recomputed by hand from the returned probabilities
    probs = r["probs"]
    assert r["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == test.labels))
    pos, neg = probs[test.labels == 1, 1], probs[test.labels == 0, 1]
    auc = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert r["auc"] == pytest.approx(auc)
    # train_head=False: the patch embedding is not part of the trained parameters
    assert "patch_embed" not in r["params"]
    assert np.abs(np.asarray(r["params"]["body"]["block1"]["mlp"]["fc1"]["kernel"])
                  - body["block1"]["mlp"]["fc1"]["kernel"]).max() > 1e-4


def test_finetune_eval_trains_the_head_when_asked_and_is_deterministic():
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=16, finetune_lr=0.01, finetune_val_fraction=0.0))
    model, head, body = backbone(c)
    train, test = stripes(32, 2), stripes(16, 3)
    out = []
    for _ in range(2):
        r = ft.finetune(c, model, head, body, train, test, steps=3, train_head=True, seed=1, log=lambda _: None)
        out.append(r)
    assert np.abs(np.asarray(out[0]["params"]["patch_embed"]["kernel"]) - head["patch_embed"]["kernel"]).max() > 0
    np.testing.assert_array_equal(out[0]["probs"], out[1]["probs"])
    e = ft.finetune_eval(c, model, head, body, train, test, steps=1, seed=1, log=lambda _: None)
    assert set(e) == {"accuracy", "auc"} and all(isinstance(v, float) for v in e.values())


def test_linear_probe_classifier_on_raw_features_equals_linear_probe():
    r = np.random.default_rng(0)
    x = r.normal(size=(60, 5)) * np.array([1.0, 3.0, 0.2, 1.0, 5.0]) + np.array([0.5, -2.0, 1.0, 0.0, 3.0])
    y = (x[:, 0] + 0.3 * x[:, 1] + 0.5 * r.normal(size=60) > 0).astype(np.int32)
    xt = r.normal(size=(20, 5)) * 2
    c = ft.fit_linear_classifier(x, y, 2, steps=200, weight_decay=1e-3, seed=4)
    logits = xt @ c["kernel"].astype(np.float64) + c["bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ref = linear_probe(x, y, xt, 2, steps=200, weight_decay=1e-3, seed=4)
    np.testing.assert_allclose(probs, ref, atol=1e-4)


def test_finetune_from_linear_probe_init():
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=16, finetune_init="linear_probe",
                                        finetune_features="cls", linear_steps=100, finetune_val_fraction=0.0))
    model, head, body = backbone(c)
    train, test = stripes(32, 2), stripes(16, 3)
    r = ft.finetune(c, model, head, body, train, test, steps=2, log=lambda _: None)
    feats = features_lib.extract_features(head, body, model, train.images,
                                          mean=0.5, std=0.25)["cls"]
    start = ft.fit_linear_classifier(feats, train.labels, 2, steps=100, weight_decay=1e-4, seed=0)
    # two small steps from the probe, far closer to it than to a random N(0, 0.01^2) start
    moved = np.abs(np.asarray(r["params"]["classifier"]["kernel"]) - start["kernel"]).max()
    assert moved < 0.1 * np.abs(start["kernel"]).max()


def test_finetune_errors():
    c = tiny_config(FINETUNE)
    model, head, body = backbone(c)
    train = stripes(8, 0)
    other = ImageSet(train.images, train.labels, ("a", "b"), train.ids)
    with pytest.raises(ValueError, match="class_names"):
        ft.finetune_eval(c, model, head, body, train, other, steps=1, log=lambda _: None)
    with pytest.raises(ValueError, match=r"config\.eval\.finetune_layer_decay"):
        ft.finetune_eval(tiny_config(FINETUNE, eval=dict(finetune_layer_decay=0.0)), model, head, body,
                         train, train, steps=1, log=lambda _: None)
    with pytest.raises(ValueError, match=r"config\.eval\.finetune_init"):
        ft.finetune_eval(tiny_config(FINETUNE, eval=dict(finetune_init="zeros")), model, head, body,
                         train, train, steps=1, log=lambda _: None)
    with pytest.raises(ValueError, match=r"config\.eval\.features"):
        ft.finetune_eval(tiny_config(FINETUNE, eval=dict(finetune_features="pixels")), model, head, body,
                         train, train, steps=1, log=lambda _: None)


# -- model selection on a validation split of the train data ---------------------------------------

def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.random.default_rng(5).permutation(np.array([0] * 50 + [1] * 20 + [2] * 1 + [3] * 3))
    fit, val = ft.validation_split(labels, 0.1, seed=3)
    # per class round(0.1 n), at least one, never all: 50 -> 5, 20 -> 2, 3 -> 1; a lone image fits
    assert {k: int((labels[val] == k).sum()) for k in range(4)} == {0: 5, 1: 2, 2: 0, 3: 1}
    assert len(np.intersect1d(fit, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    np.testing.assert_array_equal(ft.validation_split(labels, 0.1, seed=3)[1], val)
    assert not np.array_equal(ft.validation_split(labels, 0.1, seed=4)[1], val)
    fit0, val0 = ft.validation_split(labels, 0.0, seed=3)
    assert len(val0) == 0 and len(fit0) == len(labels)
    with pytest.raises(ValueError, match=r"config\.eval\.finetune_val_fraction"):
        ft.validation_split(labels, 1.0, seed=3)


def test_selection_is_on_the_train_split_never_the_test_split():
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=16, finetune_val_fraction=0.25,
                                        finetune_select_every=2, finetune_features="cls", finetune_lr=0.02))
    model, head, body = backbone(c)
    train, test = stripes(32, 2), stripes(16, 3)
    flipped = ImageSet(test.images, 1 - test.labels, test.class_names, test.ids)
    r = ft.finetune(c, model, head, body, train, test, steps=4, log=lambda _: None)
    r_flipped = ft.finetune(c, model, head, body, train, flipped, steps=4, log=lambda _: None)
    # the test labels change nothing but the score
    np.testing.assert_array_equal(r["probs"], r_flipped["probs"])
    assert r["accuracy"] == pytest.approx(1 - r_flipped["accuracy"])
    np.testing.assert_array_equal(r["val_indices"], ft.validation_split(train.labels, 0.25, 0)[1])
    scores = r["selection"]
    assert [h["step"] for h in scores] == [0, 2, 4] and sum(h["selected"] for h in scores) == 1


def test_selection_falls_back_on_the_linear_probe_when_fine_tuning_hurts():
    """An lr far too high wrecks the backbone; the selection keeps the start, which is the linear
    probe fitted on the fit part (evaluation/linear.py), so fine-tuning is never below it on the
    validation split."""
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=16, finetune_val_fraction=0.25, finetune_lr=300.0,
                                        finetune_warmup_frac=0.0, finetune_init="linear_probe",
                                        finetune_features="cls", linear_steps=100, finetune_select_every=3))
    model, head, body = backbone(c)
    train, test = stripes(48, 4), stripes(32, 5)
    r = ft.finetune(c, model, head, body, train, test, steps=6, log=lambda _: None)
    scores = r["selection"]
    assert [h["step"] for h in scores if h["selected"]] == [0]
    for a, b in zip(jax.tree_util.tree_leaves(r["params"]["body"]), jax.tree_util.tree_leaves(body)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fit = np.setdiff1d(np.arange(len(train.labels)), r["val_indices"])
    kw = dict(mean=0.5, std=0.25)
    f_fit = features_lib.extract_features(head, body, model, train.images[fit], **kw)["cls"]
    f_test = features_lib.extract_features(head, body, model, test.images, **kw)["cls"]
    ref = linear_probe(f_fit, train.labels[fit], f_test, 2, steps=100, weight_decay=1e-4, seed=0)
    np.testing.assert_allclose(r["probs"], ref, atol=1e-3)


def brightness(n, seed):
    """Class 1 bright, class 0 dark, with pixel noise: every backbone's features separate them."""
    r = np.random.default_rng(seed)
    labels = r.integers(0, 2, n)
    labels[:2] = [0, 1]
    base = np.where(labels == 1, 0.7, 0.3)[:, None, None, None]
    imgs = np.clip(base + 0.1 * r.normal(size=(n, IMG, IMG, 1)), 0, 1).astype(np.float32)
    return ImageSet(imgs, labels.astype(np.int32), ("dark", "bright"), tuple(map(str, range(n))))


def test_lp_ft_reaches_the_linear_probe_on_separable_features():
    c = tiny_config(FINETUNE, eval=dict(finetune_batch_size=16, finetune_init="linear_probe",
                                        finetune_val_fraction=0.25, finetune_features="cls", linear_steps=100))
    model, head, body = backbone(c)
    train, test = brightness(48, 6), brightness(40, 7)
    kw = dict(mean=0.5, std=0.25)
    f_train = features_lib.extract_features(head, body, model, train.images, **kw)["cls"]
    f_test = features_lib.extract_features(head, body, model, test.images, **kw)["cls"]
    probe = linear_probe(f_train, train.labels, f_test, 2, steps=100, weight_decay=1e-4, seed=0)
    probe_acc = np.mean(probe.argmax(1) == test.labels)
    assert probe_acc >= 0.9  # the case is easy
    r = ft.finetune(c, model, head, body, train, test, steps=6, log=lambda _: None)
    assert r["accuracy"] >= probe_acc - 1.0 / len(test.labels), (r["accuracy"], probe_acc)
