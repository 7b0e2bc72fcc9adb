"""Tests for msd_jax.experiments.privacy: image metrics against hand-computed values, each attack against a
plaintext case it must break and pure noise it must not, the encryption modes (determinism, keys,
what the server's files may hold) and a tiny end-to-end audit.

References are independent of the code under test: tokens are computed here in numpy float64
(patchify + kernel + bias + position), permutations drawn here, and metric values derived by hand.
"""
import copy
import json
import os

import jax
import numpy as np
import pytest

from msd_jax.trust import InputError
from msd_jax.encryption import encrypt, shards
from msd_jax.data.sites import FederatedData
from msd_jax.data.sources import ImageSet
from msd_jax.layout import Workdir
from msd_jax.models import vit
from msd_jax.experiments.privacy import attacks, metrics
from msd_jax.encryption import modes
from conftest import load_config, mode_of, model_of, tiny_model

CFG = tiny_model(image_size=16, patch_size=4, channels=1, embed_dim=32, depth=1, num_heads=2,
                    out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
N_POS, D_P = 16, 16
MEAN, STD = 0.5, 0.25
C1, C2 = 0.01 ** 2, 0.03 ** 2


def smooth_images(n, seed, size=16):
    """Blurry blobs in [0, 1]: a distribution with structure (what a patch prior can learn)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(3):
            cy, cx, s, a = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3), rng.uniform(0.3, 1)
            imgs[i] += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s ** 2))
        imgs[i] += 0.4 * yy  # position-dependent brightness
    imgs = imgs / imgs.max()
    return imgs[..., None].astype(np.float32)


def np_tokens(head, images, cfg=CFG):
    """Plain tokens [N, n, D] in raster order, numpy float64, independent of the project's head."""
    x = (np.asarray(images, np.float64) - MEAN) / STD
    n, h, w, c = x.shape
    p, g = cfg.patch_size, h // cfg.patch_size
    patches = x.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * c)
    k = np.asarray(head["patch_embed"]["kernel"], np.float64)
    b = np.asarray(head["patch_embed"]["bias"], np.float64)
    return patches @ k + b + np.asarray(head["pos_embed"], np.float64).reshape(g * g, -1)


def shuffle(tokens, seed, keep=None):
    """Each image's tokens in a fresh random order (numpy), optionally only `keep` of them."""
    rng = np.random.default_rng(seed)
    n, m = tokens.shape[:2]
    pos = np.stack([rng.permutation(m)[:keep or m] for _ in range(n)])
    return np.take_along_axis(tokens, pos[..., None], axis=1), pos


def psnr_ref(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def head():
    return jax.device_get(vit.init_head(CFG, jax.random.key(3)))


@pytest.fixture(scope="module")
def sets():
    return smooth_images(200, seed=1), smooth_images(60, seed=2)  # public look-alike, private


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_psnr_hand_values():
    x = np.zeros((8, 8, 1))
    assert metrics.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-9)          # MSE 0.01
    y = x.copy()
    y[:4] = 0.2                                                                 # MSE 0.02
    assert metrics.psnr(x, y) == pytest.approx(10 * np.log10(50.0), abs=1e-9)
    assert metrics.psnr(x, x) == 100.0


def test_ssim_hand_values():
    # Constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), either window.
    a, b = np.full((11, 11), 0.2), np.full((11, 11), 0.6)
    want = (2 * 0.2 * 0.6 + C1) / (0.2 ** 2 + 0.6 ** 2 + C1)
    assert metrics.ssim(a, b) == pytest.approx(want, rel=1e-9)
    assert metrics.ssim(a, b, window="uniform", win=7) == pytest.approx(want, rel=1e-9)
    # One 7x7 uniform window: x has 25 ones and 24 zeros, y = 1 - x. mu_x = 25/49, mu_y = 24/49,
    # var_x = var_y = 25*24/49^2, cov = -25*24/49^2 (population moments).
    x = np.zeros(49)
    x[:25] = 1
    x = x.reshape(7, 7)
    mx, my, v = 25 / 49, 24 / 49, 25 * 24 / 49 ** 2
    want = (2 * mx * my + C1) * (-2 * v + C2) / ((mx ** 2 + my ** 2 + C1) * (2 * v + C2))
    assert metrics.ssim(x, 1 - x, window="uniform", win=7) == pytest.approx(want, rel=1e-9)
    assert want < 0
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(16, 16, 1))
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(img, rng.uniform(size=(16, 16, 1))) < 0.2
    with pytest.raises(ValueError, match="shapes"):
        metrics.ssim(img, img[:8])


# ---------------------------------------------------------------------------------------------
# attacks: plaintext cases they must break, noise they must not
# ---------------------------------------------------------------------------------------------
def test_known_head_attack_recovers_plaintext(head, sets):
    public, private = sets
    plain = np_tokens(head, private)
    for tokens, pos in [(plain, np.tile(np.arange(N_POS), (len(private), 1))),  # identity order
                        shuffle(plain, seed=5)]:
        r = attacks.known_head_attack(tokens.astype(np.float32), head, public, patch_size=4, mean=MEAN, std=STD)
        assert np.mean(r.positions == pos) > 0.99
        p = np.mean([psnr_ref(o, x) for o, x in zip(private, r.images)])
        assert p > 35.0, p
        assert metrics.mean_psnr_ssim(private, r.images)[1] > 0.95


def test_known_head_attack_with_masking_fills_the_mean(head, sets):
    public, private = sets
    tokens, pos = shuffle(np_tokens(head, private), seed=6, keep=8)
    r = attacks.known_head_attack(tokens, head, public, patch_size=4, mean=MEAN, std=STD)
    assert r.positions.shape == (len(private), 8)
    assert np.mean(r.positions == pos) > 0.97
    # the 8 uploaded patches are exact; the other 8 are the public mean patch
    rec = attacks.patchify(r.images, 4)
    orig = attacks.patchify(private, 4)
    rows = np.arange(len(private))[:, None]
    np.testing.assert_allclose(rec[rows, pos], orig[rows, pos], atol=0.02)
    mean_patches = attacks.patchify(public.astype(np.float64).mean(0, keepdims=True), 4)[0]
    missing = np.ones((len(private), N_POS), bool)
    missing[rows, pos] = False
    np.testing.assert_allclose(rec[missing], np.broadcast_to(mean_patches, rec.shape)[missing], atol=1e-6)


def test_attacks_fail_on_noise(head, sets):
    public, private = sets
    rng = np.random.default_rng(9)
    plain = np_tokens(head, private)
    noise = rng.normal(plain.mean(), plain.std(), size=plain.shape)
    pos = np.tile(np.arange(N_POS), (len(private), 1))
    chance = 1 / N_POS
    baseline = attacks.mean_image_baseline(private, public)["psnr_db"]
    r = attacks.known_head_attack(noise, head, public, patch_size=4, mean=MEAN, std=STD)
    assert np.mean(r.positions == pos) < 2 * chance
    assert metrics.mean_psnr_ssim(private, r.images)[0] < baseline
    r = attacks.learned_attack(noise, np_tokens(head, public), public, patch_size=4, mean=MEAN, std=STD)
    assert np.mean(r.positions == pos) < 2 * chance
    assert metrics.mean_psnr_ssim(private, r.images)[0] < baseline
    big = rng.normal(size=(400, N_POS, CFG.embed_dim))
    r = attacks.cluster_attack(big, np.tile(np.arange(N_POS), (400, 1)), num_patches=N_POS, patch_dim=D_P,
                               key=jax.random.key(0), iters=10)
    assert np.mean(r.positions == np.arange(N_POS)) < 2 * chance
    assert r.info["null_accuracy"] < 2 * chance


def test_learned_attack_recovers_plaintext(head, sets):
    public, private = sets
    tokens, pos = shuffle(np_tokens(head, private), seed=7)
    r = attacks.learned_attack(tokens, np_tokens(head, public), public, patch_size=4, mean=MEAN, std=STD)
    assert np.mean(r.positions == pos) > 0.99
    assert np.mean([psnr_ref(o, x) for o, x in zip(private, r.images)]) > 30.0
    # trained on another head's tokens (a secret head), it learns nothing that transfers
    other = jax.device_get(vit.init_head(CFG, jax.random.key(99)))
    r = attacks.learned_attack(tokens, np_tokens(other, public), public, patch_size=4, mean=MEAN, std=STD)
    assert np.mean(r.positions == pos) < 0.5


def test_cluster_attack_groups_plaintext_positions(head):
    imgs = smooth_images(300, seed=4)
    tokens, pos = shuffle(np_tokens(head, imgs), seed=8)
    r = attacks.cluster_attack(tokens, pos, num_patches=N_POS, patch_dim=D_P, key=jax.random.key(1))
    assert np.mean(r.positions == pos) > 0.95


def test_known_head_attack_undoes_a_channel_permutation(head, sets):
    """feature_perm alone: the channels' distributions give the permutation away (measured)."""
    public, private = sets
    perm = np.random.default_rng(11).permutation(CFG.embed_dim)
    tokens, pos = shuffle(np_tokens(head, smooth_images(300, seed=12))[..., perm], seed=10)
    r = attacks.known_head_attack(tokens, head, public, patch_size=4, mean=MEAN, std=STD, reconstruct=False)
    assert r.info["channel_alignment"] == "matched"
    assert np.mean(r.positions == pos) > 0.9


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "Paper", "paper+masked", "masked+masked", "secret", 3])
def test_parse_mode_errors(bad):
    with pytest.raises(ValueError, match="config.encrypt.mode"):
        modes.EncryptionMode.parse(bad)


def test_mode_names():
    parse = modes.EncryptionMode.parse
    assert parse("paper").parts == frozenset()
    assert parse("masked+secret_head+feature_perm").name == "secret_head+feature_perm+masked"
    assert [parse(m).secret_transform for m in ("paper", "masked", "feature_perm", "secret_head+masked")] \
        == [False, False, True, True]


def test_config_validates_mode():
    from msd_jax import config as config_lib
    c = config_lib.base_config()
    c.encrypt.mode = "secret_head+typo"
    with pytest.raises(ValueError, match="config.encrypt.mode"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.encrypt.masked_keep_ratio = 1.0
    with pytest.raises(ValueError, match="masked_keep_ratio"):
        config_lib.validate(c)


def test_transforms_deterministic_and_keyed(head):
    imgs = smooth_images(4, seed=3)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    for mode in ("secret_head", "feature_perm", "secret_head+feature_perm"):
        mode = modes.EncryptionMode.parse(mode)
        a = encrypt.transform_head(mode, CFG, head, k1)
        b = encrypt.transform_head(mode, CFG, head, k1)
        c = encrypt.transform_head(mode, CFG, head, k2)
        ta, tb, tc = (np_tokens(h, imgs) for h in (a, b, c))
        np.testing.assert_array_equal(ta, tb)
        assert np.abs(ta - tc).max() > 0.1
        assert np.abs(ta - np_tokens(head, imgs)).max() > 0.1
    # feature_perm is the public head's output with its channels permuted
    fp = np_tokens(encrypt.transform_head(modes.EncryptionMode.parse("feature_perm"), CFG, head, k1), imgs)
    plain = np_tokens(head, imgs)
    cols_p, cols_f = plain.reshape(-1, 32).T, fp.reshape(-1, 32).T
    order = [int(np.argmin(np.abs(cols_p - cols_f[i]).sum(-1))) for i in range(32)]
    np.testing.assert_allclose(fp, plain[..., order], atol=1e-5)
    assert sorted(order) == list(range(32)) and order != list(range(32))
    # secret_head keeps the sincos positions' geometry (a rotation) but not their coordinates
    secret_head = modes.EncryptionMode.parse("secret_head")
    pos = np.asarray(encrypt.transform_head(secret_head, CFG, head, k1)["pos_embed"], np.float64)[0]
    ref = vit.sincos_pos_embed(32, 4).astype(np.float64)
    np.testing.assert_allclose(pos @ pos.T, ref @ ref.T, atol=1e-4)
    assert np.abs(pos - ref).max() > 0.1
    with pytest.raises(ValueError, match="shared key"):
        encrypt.transform_head(secret_head, CFG, head, None)


def test_shared_key_sources(tmp_path):
    path = str(tmp_path / "site_secret" / "shared_key")
    k1 = encrypt.shared_key("urandom", 0, path)
    assert os.path.getsize(path) == encrypt.SHARED_KEY_BYTES
    assert (os.stat(path).st_mode & 0o777) == 0o600
    k2 = encrypt.shared_key("urandom", 0, path)                      # read back, same key
    np.testing.assert_array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    other = encrypt.shared_key("urandom", 0, str(tmp_path / "other"))
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(other))
    s0, s1 = encrypt.shared_key("seed", 0), encrypt.shared_key("seed", 1)
    assert not np.array_equal(jax.random.key_data(s0), jax.random.key_data(s1))
    open(path, "wb").write(b"short")
    with pytest.raises(ValueError, match="shared_key"):
        encrypt.shared_key("urandom", 0, path)
    with pytest.raises(ValueError, match="shared_key_source"):
        encrypt.shared_key("zeros", 0, path)


# ---------------------------------------------------------------------------------------------
# the secret never reaches the server's files; every protocol runs in a secret mode
# ---------------------------------------------------------------------------------------------
def _imageset(images, seed=0):
    n = len(images)
    labels = np.random.default_rng(seed).integers(0, 2, n).astype(np.int32)
    return ImageSet(images, labels, ("no", "yes"), tuple(f"x{seed}_{i}.png" for i in range(n)))


def _fed(size=16, per_site=10, sites=2, test=12, proxy=30):
    return FederatedData(
        sites=[(f"site{i}", _imageset(smooth_images(per_site, seed=20 + i, size=size), seed=i))
               for i in range(sites)],
        test=_imageset(smooth_images(test, seed=40, size=size), seed=9),
        proxy=_imageset(smooth_images(proxy, seed=41, size=size), seed=10))


@pytest.mark.parametrize("protocol", ["model_upload"])
def test_secret_mode_keys_never_written(tmp_path, monkeypatch, protocol):
    from msd_jax import parties

    secret = bytes(range(101, 101 + encrypt.SHARED_KEY_BYTES))
    real = os.urandom
    monkeypatch.setattr(encrypt.os, "urandom", lambda n: secret if n == encrypt.SHARED_KEY_BYTES else real(n))
    c = load_config("demo", "quick")
    c.model.update(image_size=16, patch_size=4, embed_dim=32, num_heads=2, out_dim=32,
                   head_hidden_dim=16, head_bottleneck_dim=8)
    c.train.update(batch_size=8)
    c.eval.update(linear_steps=5, random_init_baseline=False)
    c.encrypt.update(mode="secret_head+feature_perm+masked", shared_key_source="urandom", dtype="float32")
    c.protocol = protocol
    data = _fed()
    wd = Workdir(str(tmp_path / "wd"))
    log = lambda *_: None  # noqa: E731
    model, mode = model_of(c), mode_of(c)
    parties.run_encrypt(c, model, mode, wd, data, log=log)
    parties.run_sites(c, model, mode, wd, wd.uploaded_sites(), log=log)
    parties.run_server(c, model, mode, wd, log=log)
    report = parties.run_eval(c, model, mode, wd, data, log=log)
    assert 0.0 <= report["eval"]["linear"]["accuracy"] <= 1.0
    monkeypatch.setattr(encrypt.os, "urandom", real)

    key_file = os.path.join(wd.root, encrypt.SECRET_DIR, "shared_key")
    assert open(key_file, "rb").read() == secret                     # the key really came from here
    assert sorted(os.listdir(wd.head)) == [encrypt.TRANSFORM_META]   # no head parameters for the server
    key = encrypt.shared_key("urandom", 0, key_file)
    site_head = encrypt.transform_head(mode, CFG, None, key)
    # the shards hold tokens of this very head (so scanning for it is meaningful), half of them
    tokens, manifest = shards.load_shards(wd.shards("site0"))
    assert manifest["tokens_per_image"] == 8 and manifest["encrypt_mode"] == "secret_head+feature_perm+masked"
    plain = np_tokens(site_head, data.sites[0][1].images)
    for t, p in zip(tokens, plain):
        d = np.linalg.norm(t[:, None].astype(np.float64) - p[None], axis=-1).min(1)
        assert d.max() < 1e-3
    perm = encrypt.channel_permutation(CFG, key)
    needles = [secret, secret[:8], secret[8:16]]
    for k in (key, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)):
        words = np.asarray(jax.random.key_data(k), np.uint32).reshape(-1)
        needles += [words.astype("<u4").tobytes(), words.astype(">u4").tobytes()]
    kernel = np.asarray(site_head["patch_embed"]["kernel"], np.float32)
    pos = np.asarray(site_head["pos_embed"], np.float32).reshape(16, 32)
    needles += [kernel[0].tobytes(), kernel[:, 0].copy().tobytes(), pos[1].tobytes(),
                kernel[0].astype(np.float16).tobytes()]
    texts = [",".join(map(str, perm.tolist())), str(perm.tolist()), f"{float(kernel[0, 0]):.6f}",
             f"{float(kernel[0, 0])!r}"]
    scanned = []
    for root, _, files in os.walk(wd.root):
        for name in files:
            path = os.path.join(root, name)
            if path == key_file:
                continue
            raw = open(path, "rb").read()
            scanned.append(os.path.relpath(path, wd.root))
            for s in needles:
                assert s not in raw, f"secret bytes found in {path}"
            text = raw.decode("latin-1")
            for s in texts:
                assert s not in text, f"secret {s!r} found in {path}"
    assert {"head/transform.json", "shards/site0/manifest.json", "report.json"} <= set(scanned)
    assert any(s.startswith("backbone/") for s in scanned) and any(s.startswith("uploads/") for s in scanned)
    assert any(s.startswith("shards/_proxy/") for s in scanned)


def test_server_rejects_a_mode_mismatch(tmp_path):
    cfg = CFG
    head_dir = str(tmp_path / "head")
    encrypt.write_transform(head_dir, cfg, modes.EncryptionMode.parse("secret_head"), "ab" * 32)
    c = load_config("demo", "quick")
    c.encrypt.mode = "paper"
    with pytest.raises(ValueError, match="transform.json"):
        encrypt.expected_fingerprint(mode_of(c), head_dir, cfg)
    c.encrypt.mode = "secret_head+masked"
    with pytest.raises(ValueError, match="'mode'"):
        encrypt.expected_fingerprint(mode_of(c), head_dir, cfg)
    c.encrypt.mode = "secret_head"
    assert encrypt.expected_fingerprint(mode_of(c), head_dir, cfg) == "ab" * 32
    with pytest.raises(InputError, match="transform.json"):
        encrypt.expected_fingerprint(mode_of(c), str(tmp_path / "none"), cfg)


# ---------------------------------------------------------------------------------------------
# end to end: the audit command's three files, the JSON's shape
# ---------------------------------------------------------------------------------------------
def test_tiny_audit_end_to_end(tmp_path, monkeypatch):
    from msd_jax.experiments.privacy import audit

    c = load_config("audit", "tiny")
    c.train.batch_size = 8
    data = _fed(size=32, per_site=8, sites=2, test=10, proxy=24)
    monkeypatch.setattr(audit.sites_lib, "load", lambda config: copy.deepcopy(data))
    out_dir = str(tmp_path / "audit")
    audit.run_audit(c, out_dir, log=lambda *_: None)
    for name in ("audit.json", "audit.md", "audit.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0
    with open(os.path.join(out_dir, "audit.json")) as f:
        rep = json.load(f)
    assert set(rep) >= {"modes", "recommended"}
    assert list(rep["modes"]) == list(modes.ALL_MODES)
    for mode, r in rep["modes"].items():
        assert isinstance(r["linear_accuracy"], float) and 0 <= r["linear_accuracy"] <= 1
        assert set(r["attacks"]) == {"known_head", "learned", "clustering", "moments"}
        # the tiny model's embed_dim (32) is below its patch_dim (64): no content subspace to find
        assert r["attacks"]["moments"]["applicable"] is False
        assert r["attacks"]["moments"]["position_accuracy"] is None
        for name, a in r["attacks"].items():
            assert {"position_accuracy", "chance", "psnr_db", "ssim"} <= set(a)
            assert a["chance"] == pytest.approx(1 / 16)
            if name == "moments":
                continue
            assert 0 <= a["position_accuracy"] <= 1
            if name != "clustering":
                assert isinstance(a["psnr_db"], float) and isinstance(a["ssim"], float)
        assert os.path.isfile(os.path.join(out_dir, "modes", mode, "report.json"))
    assert rep["recommended"] is None or rep["recommended"] in rep["modes"]
    assert rep["recommendation_note"]
    assert isinstance(rep["mean_image_psnr_db"], float)
    # the paper mode's known-head attack places tokens far above chance even in this tiny run
    assert rep["modes"]["paper"]["attacks"]["known_head"]["position_accuracy"] > 0.5
    md = open(os.path.join(out_dir, "audit.md")).read()
    assert all(f"| {m} |" in md for m in modes.ALL_MODES)


def test_a_rerun_audit_reuses_each_finished_row(tmp_path, monkeypatch):
    from msd_jax.experiments.privacy import audit

    c = load_config("audit", "tiny")
    c.train.batch_size = 8
    c.audit.update(modes="paper", reuse=True)
    data = _fed(size=32, per_site=8, sites=2, test=10, proxy=24)
    monkeypatch.setattr(audit.sites_lib, "load", lambda config: copy.deepcopy(data))
    out_dir = str(tmp_path / "audit")
    first = audit.run_audit(c, out_dir, log=lambda *_: None)
    figure_first = np.load(os.path.join(out_dir, "modes", "paper", "audit_attacks.npz"))["reconstructions"]

    def no_attack(*_, **__):
        raise AssertionError("attacked again")
    calls = []
    monkeypatch.setattr(audit, "attack_mode", no_attack)
    monkeypatch.setattr(audit.parties, "run_server", lambda *a, **k: calls.append("server"))
    again = audit.run_audit(c, out_dir, log=lambda *_: None)
    assert calls == []
    assert json.dumps(again["modes"]["paper"]["attacks"]) == json.dumps(first["modes"]["paper"]["attacks"])
    assert again["mean_image_psnr_db"] == first["mean_image_psnr_db"]
    np.testing.assert_array_equal(
        np.load(os.path.join(out_dir, "modes", "paper", "audit_attacks.npz"))["reconstructions"], figure_first)
    # a setting that changes the attacks' results runs them again
    c.audit.kmeans_iters += 1
    with pytest.raises(AssertionError, match="attacked again"):
        audit.run_audit(c, out_dir, log=lambda *_: None)


def _row(acc, clustering, null, psnr=10.0):
    attack = lambda pos, **kw: {"position_accuracy": pos, "chance": 1 / 64, "psnr_db": psnr, "ssim": 0.1, **kw}
    return {"linear_accuracy": acc,
            "attacks": {"known_head": attack(0.015, chance_level=1 / 64),
                        "clustering": {**attack(clustering, chance_level=max(1 / 64, null)),
                                       "psnr_db": None, "ssim": None}}}


def test_rule_measures_an_oracle_scored_attack_against_its_null():
    """Hand-made audit rows (64 positions, mean image 16.46 dB): clustering at 0.043 is 2.75 x 1/64
    but 1.13 x its null 0.038, so the row meets the rule; at 0.080 (2.1 x the null) it does not."""
    import ml_collections
    from msd_jax.experiments.privacy import audit

    rule = ml_collections.ConfigDict(dict(chance_factor=2.0, psnr_margin_db=0.0, max_accuracy_drop=0.02))
    results = {"paper": _row(0.758, 1.0, 0.038, psnr=69.9), "defended": _row(0.753, 0.043, 0.038)}
    rec, note, failures = audit.recommend(results, 16.46, rule)
    assert rec == "defended" and failures["defended"] == [] and "defended" in note
    assert any("clustering" in w for w in failures["paper"])
    # of two rows that pass, the stronger one (1.13 x its null against 1.89 x), not the more accurate
    results["weaker"] = _row(0.785, 0.072, 0.038)
    rec, _, failures = audit.recommend(results, 16.46, rule)
    assert rec == "defended" and failures["weaker"] == []
    del results["weaker"]
    results["defended"] = _row(0.753, 0.080, 0.038)
    rec, _, failures = audit.recommend(results, 16.46, rule)
    assert rec is None and any("0.080 > 2 x chance level 0.0380" in w for w in failures["defended"])
    rows = {r["row"]: r for r in audit.tradeoff({"defended": _row(0.753, 0.043, 0.038)}, 16.46)}
    assert rows["defended"]["max_position_over_chance"] == pytest.approx(0.043 / 0.038)
    # a cost above max_accuracy_drop fails even a row that every attack misses
    rec, _, failures = audit.recommend({"paper": _row(0.758, 1.0, 0.038), "d": _row(0.73, 0.02, 0.038)},
                                       16.46, rule)
    assert rec is None and any("linear accuracy" in w for w in failures["d"])
    # no row passes, each fails once: the note names the row within the cost limit whose clustering
    # does least (4.2 x its null, not 5.0 x), as best_reachable does, whatever the rows' order
    results = {"paper": _row(0.888, 1.0, 0.0276, psnr=67.8), "masked": _row(0.868, 0.153, 0.0305),
               "noise2": _row(0.870, 0.117, 0.0276), "noise4": _row(0.860, 0.045, 0.0284)}
    rec, note, _ = audit.recommend(results, 16.46, rule)
    reachable = audit.best_reachable(audit.tradeoff(results, 16.46), rule)
    assert rec is None and reachable["row"] == "noise2" and "closest: noise2," in note


def test_score_reports_the_oracle_null_as_chance_level():
    r = attacks.Reconstruction(np.zeros((2, 4), np.int64), None, {"null_accuracy": 0.4})
    s = attacks.score(r, np.zeros((2, 4), np.int64), np.zeros((2, 4, 4, 1)), 4)
    assert s["chance"] == 0.25 and s["chance_level"] == 0.4 and s["position_accuracy"] == 1.0
    r = attacks.Reconstruction(np.zeros((2, 4), np.int64), None, {})
    assert attacks.score(r, np.zeros((2, 4), np.int64), np.zeros((2, 4, 4, 1)), 4)["chance_level"] == 0.25
