"""Tests for the head-free second-order attack (msd_jax/experiments/privacy/moments.py): the secret
head is a known public head rotated by a known orthogonal matrix, the tokens are computed here in
numpy float64; the attack must recover the rotation's effect on structured images and fail on
i.i.d. noise."""
import jax
import numpy as np
import pytest

from msd_jax.experiments.privacy import attacks, metrics, moments

SIZE, P, D = 16, 4, 32
N_POS, D_P = (SIZE // P) ** 2, P * P
MEAN, STD = 0.5, 0.25


def bump_images(n, seed, size=SIZE, bumps=40):
    """Smooth, non-stationary, skewed images: a fixed set of Gaussian bumps (the data set's
    structure: different at every position) with gamma-distributed weights per image, plus a little
    pixel noise."""
    fixed = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    c = fixed.uniform(-2, size + 1, (bumps, 2))
    s = fixed.uniform(1.5, 4.0, bumps)
    basis = np.exp(-((yy[None] - c[:, :1, None]) ** 2 + (xx[None] - c[:, 1:, None]) ** 2) / (2 * s[:, None, None] ** 2))
    rng = np.random.default_rng(seed)
    img = np.einsum("nk,kij->nij", rng.gamma(4.0, 0.1, (n, bumps)), basis)
    img = img / 4.0 + 0.02 * rng.standard_normal((n, size, size))
    return np.clip(img, 0, 1)[..., None]


def noise_images(n, seed):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 1))


def np_patches(images):
    x = (np.asarray(images, np.float64) - MEAN) / STD
    g = SIZE // P
    return x.reshape(len(x), g, P, g, P, 1).transpose(0, 1, 3, 2, 4, 5).reshape(len(x), g * g, D_P)


def secret_tokens(images, seed=5):
    """A known head (kernel, bias, positions) rotated by a known orthogonal R: t = (z K0 + b + pos) R,
    shuffled per image. Returns (tokens, true positions, the secret kernel K0 R)."""
    rng = np.random.default_rng(seed)
    k0 = rng.standard_normal((D_P, D)) / 4
    offset = 0.1 * rng.standard_normal(D) + 0.5 * rng.standard_normal((N_POS, D))
    q, r = np.linalg.qr(rng.standard_normal((D, D)))
    rot = q * np.sign(np.diag(r))
    tokens = (np_patches(images) @ k0 + offset) @ rot
    pos = np.stack([rng.permutation(N_POS) for _ in range(len(images))])
    return np.take_along_axis(tokens, pos[..., None], axis=1), pos, k0 @ rot


def test_rotation_from_pairs_hand_case():
    """M_p = Q' B_p Q for random SPD B_p and a random orthogonal Q: Q back up to its sign."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 5, 5))
    b = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(5)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    m = np.einsum("ia,pij,jb->pab", q, b, q)
    got = moments.rotation_from_pairs(b, m)
    assert min(np.abs(got - q).max(), np.abs(got + q).max()) < 1e-8


def test_moment_attack_recovers_a_rotated_known_head():
    public, private = bump_images(800, 1), bump_images(800, 2)
    tokens, pos, kernel = secret_tokens(private)
    r = moments.moment_attack(tokens, public, patch_size=P, mean=MEAN, std=STD, key=jax.random.key(0))
    assert np.mean(r.positions == pos) > 0.95
    psnr = metrics.mean_psnr_ssim(private, r.images)[0]
    baseline = attacks.mean_image_baseline(private, public)["psnr_db"]
    assert psnr > 30.0 and psnr > baseline + 8.0
    # the head itself, sign included (third moments), on the content the data spans
    labels, _, _ = attacks.cluster_labels(tokens, num_patches=N_POS, patch_dim=D_P, key=jax.random.key(0))
    est = moments.estimate_head(tokens, labels.reshape(pos.shape), np_patches(public), ridge=1e-3,
                                 rng=np.random.default_rng(0))
    z = np_patches(private).reshape(-1, D_P)
    z = z - z.mean(0)
    err = np.linalg.norm(z @ (est.kernel - kernel)) / np.linalg.norm(z @ kernel)
    assert err < 0.2
    flipped = np.linalg.norm(z @ (-est.kernel - kernel)) / np.linalg.norm(z @ kernel)
    assert flipped > 1.5


def test_moment_attack_fails_on_noise():
    public, private = noise_images(300, 1), noise_images(300, 2)
    tokens, pos, kernel = secret_tokens(private)
    r = moments.moment_attack(tokens, public, patch_size=P, mean=MEAN, std=STD, key=jax.random.key(0))
    psnr = metrics.mean_psnr_ssim(private, r.images)[0]
    assert psnr < attacks.mean_image_baseline(private, public)["psnr_db"] + 0.5
    assert np.mean(r.positions == pos) < 2 / N_POS


def test_moment_attack_not_applicable_when_embed_dim_is_small():
    public = bump_images(20, 1)
    tokens = np.zeros((4, N_POS, D_P))
    r = moments.moment_attack(tokens, public, patch_size=P, mean=MEAN, std=STD, key=jax.random.key(0))
    assert r.positions is None and r.images is None and r.info["applicable"] is False
    with pytest.raises(ValueError, match="embed_dim > patch_dim"):
        moments.estimate_head(tokens, np.zeros((4, N_POS), np.int64), np_patches(public), ridge=1e-3,
                              rng=np.random.default_rng(0))


def test_score_any_orientation_turns_a_reconstruction_back():
    """An attack that returns every image turned by a quarter (np.rot90) and every token at the
    turned position scores 1.0 / 100 dB in some orientation, and poorly as it stands."""
    rng = np.random.default_rng(0)
    imgs = rng.random((3, 8, 8, 1))
    true = np.stack([rng.permutation(16) for _ in range(3)])
    # hand-derived: np.rot90 (counter-clockwise) moves grid cell (r, c) of a 4 x 4 grid to (3 - c, r)
    r, c = np.divmod(true, 4)
    turned = attacks.Reconstruction((3 - c) * 4 + r, np.rot90(imgs, 1, axes=(1, 2)), {})
    got = attacks.score_any_orientation(turned, true, imgs, 4)
    assert got["position_accuracy_any_orientation"] == 1.0 and got["psnr_db_any_orientation"] == 100.0
    assert got["orientation"] == "90 degrees"
    assert attacks.score(turned, true, imgs, 16)["position_accuracy"] < 0.5
