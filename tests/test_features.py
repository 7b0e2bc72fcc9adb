"""Frozen-feature extraction: kinds, batching and invariance to the token order."""
import jax
import numpy as np
import pytest

from msd_jax.encryption import encrypt
from msd_jax.evaluation.features import extract_features, parse_kinds
from msd_jax.models import vit
from conftest import tiny_model

CFG = tiny_model(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, out_dim=16,
                    head_hidden_dim=16, head_bottleneck_dim=8)


def _params():
    head = vit.init_head(CFG, jax.random.key(0))
    body = vit.init_student(CFG, jax.random.key(1))["body"]
    # order-one weights so that the features depend visibly on every token
    body = jax.tree_util.tree_map(
        lambda x: x + jax.random.normal(jax.random.key(x.size), x.shape) * 0.5, body)
    return head, body


def test_kinds_match_a_direct_body_forward_and_batching():
    head, body = _params()
    images = np.random.default_rng(0).uniform(size=(7, 16, 16, 1)).astype(np.float32)
    feats = extract_features(head, body, CFG, images, mean=0.5, std=0.25, batch_size=3)
    tokens = vit.PatchHead(CFG).apply({"params": head}, (images - 0.5) / 0.25)
    out = np.asarray(vit.Body(CFG).apply({"params": body}, tokens), np.float64)
    np.testing.assert_allclose(feats["cls"], out[:, 0], atol=1e-5)
    np.testing.assert_allclose(feats["avgpool"], out[:, 1:].sum(1) / out[:, 1:].shape[1], atol=1e-5)
    np.testing.assert_array_equal(feats["cls_avgpool"], np.concatenate([feats["cls"], feats["avgpool"]], 1))
    assert feats["cls"].shape == (7, 32) and feats["cls_avgpool"].shape == (7, 64)


def test_features_of_encrypted_tokens_equal_plain_ones():
    """What the server computes on permuted tokens equals what a site computes on plain ones."""
    head, body = _params()
    images = np.random.default_rng(1).uniform(size=(4, 16, 16, 1)).astype(np.float32)
    plain = extract_features(head, body, CFG, images, mean=0.5, std=0.25)
    enc = encrypt.encrypt_images(head, CFG, images, jax.random.key(3), mean=0.5, std=0.25)
    out = np.asarray(vit.Body(CFG).apply({"params": body}, enc))
    np.testing.assert_allclose(out[:, 0], plain["cls"], atol=1e-4)
    np.testing.assert_allclose(out[:, 1:].mean(1), plain["avgpool"], atol=1e-4)


def test_parse_kinds():
    assert parse_kinds("cls_avgpool, cls") == ["cls_avgpool", "cls"]
    for bad in ("", "cls,patch"):
        with pytest.raises(ValueError, match="config.eval.features"):
            parse_kinds(bad)
