"""The 'pos_noise' encryption mode: its tokens against a numpy reference, and the head-free
clustering attack falling toward chance as its strength rises."""
import jax
import numpy as np
import pytest

from msd_jax.encryption import encrypt, modes
from msd_jax.experiments.privacy import attacks
from msd_jax.models import vit
from conftest import load_config, tiny_model

CFG = tiny_model(image_size=16, patch_size=4, channels=1, embed_dim=32, depth=1, num_heads=2,
                 out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
N_POS, D_P = 16, 16
MEAN, STD = 0.5, 0.25


def images(n, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 16
    out = 0.3 + 0.4 * yy[None] * rng.uniform(0.5, 1.0, (n, 1, 1)) + 0.1 * rng.random((n, 16, 16))
    return out[..., None].astype(np.float32)


@pytest.fixture(scope="module")
def head():
    return jax.device_get(vit.init_head(CFG, jax.random.key(3)))


def reference_tokens(head, imgs, key, rel_std):
    """numpy float64: patches @ kernel + bias + pos, plus rel_std x std(pos) x the image's unit
    gaussian draw (jax.random.normal of fold_in(fold_in(key, i), 0x9051), raster order), then the
    image's permutation (jax.random.permutation of fold_in(key, i))."""
    x = (np.asarray(imgs, np.float64) - MEAN) / STD
    n = len(x)
    patches = x.reshape(n, 4, 4, 4, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(n, N_POS, D_P)
    pos = np.asarray(head["pos_embed"], np.float64).reshape(N_POS, -1)
    t = patches @ np.asarray(head["patch_embed"]["kernel"], np.float64) + np.asarray(head["patch_embed"]["bias"]) + pos
    out = []
    for i in range(n):
        k = jax.random.fold_in(key, i)
        noise = np.asarray(jax.random.normal(jax.random.fold_in(k, 0x9051), t.shape[1:]), np.float64)
        order = np.asarray(jax.random.permutation(k, N_POS))
        out.append((t[i] + rel_std * pos.std() * noise)[order])
    return np.stack(out)


def test_mode_parses_and_reads_its_strength():
    e = load_config("audit", "tiny").encrypt
    e.pos_noise_std = 2.5
    m = modes.EncryptionMode.parse("pos_noise+secret_head")
    assert m.name == "secret_head+pos_noise" and m.pos_noise and not modes.EncryptionMode.parse("paper").pos_noise
    assert m.position_noise_std(e) == 2.5 and modes.EncryptionMode.parse("masked").position_noise_std(e) == 0.0


def test_pos_noise_tokens_match_numpy(head):
    imgs = images(5, 0)
    key = jax.random.key(7)
    got = encrypt.encrypt_images(head, CFG, imgs, key, mean=MEAN, std=STD, pos_noise_std=0.7, batch_size=2)
    np.testing.assert_allclose(got, reference_tokens(head, imgs, key, 0.7), rtol=1e-5, atol=1e-5)
    plain = encrypt.encrypt_images(head, CFG, imgs, key, mean=MEAN, std=STD)
    np.testing.assert_allclose(plain, reference_tokens(head, imgs, key, 0.0), rtol=1e-5, atol=1e-5)
    # deterministic from the key; another key, other noise
    again = encrypt.encrypt_images(head, CFG, imgs, key, mean=MEAN, std=STD, pos_noise_std=0.7, batch_size=2)
    assert np.array_equal(got, again)
    other = encrypt.encrypt_images(head, CFG, imgs, jax.random.key(8), mean=MEAN, std=STD, pos_noise_std=0.7)
    assert not np.allclose(np.sort(got, axis=1), np.sort(other, axis=1))


def test_clustering_falls_toward_chance_as_noise_rises(head):
    imgs = images(150, 1)
    key = jax.random.key(11)
    pos = encrypt.token_positions(key, len(imgs), N_POS)
    acc = []
    for rel in (0.0, 0.5, 2.0, 8.0):
        tokens = encrypt.encrypt_images(head, CFG, imgs, key, mean=MEAN, std=STD, pos_noise_std=rel)
        r = attacks.cluster_attack(tokens, pos, num_patches=N_POS, patch_dim=D_P, key=jax.random.key(0), iters=10)
        acc.append(float(np.mean(r.positions == pos)))
    assert acc[0] > 0.95
    assert acc[0] >= acc[1] >= acc[2] >= acc[3] - 0.02
    assert acc[3] < 3.0 / N_POS


def test_audit_sweeps_pos_noise(tmp_path, monkeypatch):
    """A tiny audit of 'paper' and the swept mode at one strength: its rows, the trade-off in
    audit.json and tradeoff.png, and the strength in the shards' manifests."""
    import json
    import os
    from msd_jax.encryption import shards
    from msd_jax.experiments.privacy import audit
    from msd_jax.layout import Workdir
    from test_privacy import _fed

    c = load_config("audit", "tiny")
    c.train.batch_size = 8
    c.audit.update(modes="paper", sweep="3")
    data = _fed(size=32, per_site=8, sites=2, test=10, proxy=24)
    monkeypatch.setattr(audit.sites_lib, "load", lambda config: data)
    out = str(tmp_path / "audit")
    audit.run_audit(c, out, log=lambda *_: None)
    rep = json.load(open(os.path.join(out, "audit.json")))
    labels = ["paper", "secret_head+pos_noise@3"]
    assert list(rep["modes"]) == labels
    assert [r["row"] for r in rep["tradeoff"]] == labels
    assert [r["pos_noise_std"] for r in rep["tradeoff"]] == [None, 3.0]
    for r in rep["tradeoff"]:
        attacks_ = rep["modes"][r["row"]]["attacks"]
        # clustering is measured against its oracle matching's null where that exceeds 1/positions
        want = max(v[k] / max(v["chance"], v.get("null_accuracy", 0.0)) for v in attacks_.values()
                   for k in ("position_accuracy", "position_accuracy_any_orientation") if v.get(k) is not None)
        assert r["max_position_over_chance"] == pytest.approx(want)
        assert r["linear_accuracy"] == rep["modes"][r["row"]]["linear_accuracy"]
        row_report = json.load(open(os.path.join(out, "modes", r["row"], "report.json")))
        assert r["linear_accuracy_ci95"] == row_report["eval"]["linear"]["accuracy_ci95"]
        assert r["linear_accuracy_ci95"][0] <= r["linear_accuracy"] <= r["linear_accuracy_ci95"][1]
    assert rep["best_reachable"]["row"] in labels
    assert os.path.getsize(os.path.join(out, "tradeoff.png")) > 0
    manifest = shards.read_manifest(Workdir(os.path.join(out, "modes", labels[1])).shards("site0"))
    assert manifest["encrypt_mode"] == "secret_head+pos_noise" and manifest["pos_noise_std"] == 3.0


def test_sweep_config_errors():
    from msd_jax import config as config_lib
    c = load_config("audit", "tiny")
    c.audit.sweep = "1,x"
    with pytest.raises(ValueError, match="config.audit.sweep"):
        config_lib.validate(c)
    c.audit.update(sweep="1", sweep_mode="secret_head")
    with pytest.raises(ValueError, match="config.audit.sweep_mode"):
        config_lib.validate(c)
