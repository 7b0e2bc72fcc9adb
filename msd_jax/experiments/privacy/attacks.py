"""Attacks an honest-but-curious server can run on the tokens it receives. Each returns numbers
(and, where it reconstructs images, the reconstructions). numpy float64 + scipy; randomness only
from an explicit jax.random key.

Notation: an image's normalised patches z_p (p = raster position, d_p = patch_size^2 x channels
values), the head's kernel K [d_p, D], bias b, position embedding pos_p. A token is
t = z_p K + b + pos_p, channels possibly permuted, tokens shuffled and possibly subsampled.

  known_head_attack     (a)+(b): the head is known. Gaussian model of a token at position p:
                        t ~ N(m_p, C), m_p = b + pos_p + mu_p K, C = K' S K + noise I, with the patch
                        mean mu_p and covariance S from a public look-alike set. Each image's tokens
                        are assigned to positions by the Hungarian algorithm on the Mahalanobis
                        distances; each patch is its posterior mean mu_p + (t - m_p) C^-1 K' S.
  learned_attack        (c): no head. The attacker encrypts a public look-alike set with the mode's
                        transform under its own key (it then knows every token's position and patch)
                        and fits the same Gaussian model from data (class means m_p, pooled
                        covariance C, cross-covariance to the patches): LDA + linear decoder.
  cluster_attack        (d): no head, no public data. Groups all tokens into num_patches clusters
                        (k-means++ on the directions the patch content cannot reach when
                        D > d_p: the complement of the span of the per-image mean tokens, which
                        only the content moves) and scores the grouping
                        by the best one-to-one matching of clusters to true positions (an upper
                        bound on what a labelling of the clusters can reach).
Channel alignment (feature_perm): (a) and (c) also try matching the received tokens' channels to
the attacker's reference tokens by their quantiles (Hungarian) and keep whichever alignment the
Gaussian model finds more likely.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.optimize import linear_sum_assignment

from msd_jax.experiments.privacy import metrics


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
def patchify(images: np.ndarray, p: int) -> np.ndarray:
    """[N, H, W, C] -> [N, (H/p)(W/p), p*p*C], raster order (as msd_jax.models.vit.patchify)."""
    n, h, w, c = images.shape
    x = np.asarray(images).reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, p: int, h: int, w: int, c: int) -> np.ndarray:
    n = patches.shape[0]
    x = patches.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


@dataclasses.dataclass
class Reconstruction:
    positions: np.ndarray | None     # [N, k] estimated raster position of each received token, or
                                     # None (the attack does not apply)
    images: np.ndarray | None        # [N, H, W, C] in [0, 1], or None (no reconstruction)
    info: dict


def score(result: Reconstruction, true_positions: np.ndarray, originals: np.ndarray,
          num_patches: int) -> dict:
    """{'position_accuracy', 'chance', 'chance_level', 'psnr_db', 'ssim'} (psnr/ssim None without
    images, position_accuracy None without positions). 'chance' is 1/num_patches; 'chance_level' is
    what the attack's own scoring gives a grouping that knows nothing: 'chance', or the oracle
    matching's null where the attack reports one (clustering)."""
    acc = None if result.positions is None else float(np.mean(result.positions == true_positions))
    chance = 1.0 / num_patches
    # an attack scored with an oracle matching is measured against what that matching gives a
    # grouping that knows nothing (its null), which exceeds 1/num_patches when clusters are small
    level = max(chance, result.info.get("null_accuracy", 0.0))
    out = {"position_accuracy": acc, "chance": chance, "chance_level": level,
           "psnr_db": None, "ssim": None}
    if result.images is not None:
        out["psnr_db"], out["ssim"] = metrics.mean_psnr_ssim(originals, result.images)
    return {**out, **result.info}


def _dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 symmetries of a square array (axes 0, 1): optional left-right flip, then k
    quarter turns."""
    return np.rot90(a[:, ::-1] if flip else a, k, axes=(0, 1))


def score_any_orientation(result: Reconstruction, true_positions: np.ndarray, originals: np.ndarray,
                          grid: int) -> dict:
    """The best score over the 8 rotations and mirror images of the position grid: an attack whose
    statistics cannot tell an image from its mirror image or rotation (brain MRI is nearly
    symmetric) still shows the image, turned. Reconstructions are turned back before scoring.
    {'orientation', 'position_accuracy_any_orientation', 'psnr_db_any_orientation',
    'ssim_any_orientation'}."""
    if result.positions is None:
        return {}
    n, h = len(originals), originals.shape[1]
    best = None
    for k in range(4):
        for flip in (False, True):
            src = _dihedral(np.arange(grid * grid).reshape(grid, grid), k, flip).reshape(-1)
            dest_of = np.argsort(src)          # a token from position p lands at dest_of[p]
            acc = float(np.mean(result.positions == dest_of[true_positions]))
            if best is None or acc > best[0]:
                best = (acc, k, flip)
    acc, k, flip = best
    out = {"orientation": f"{'mirrored, ' if flip else ''}{90 * k} degrees",
           "position_accuracy_any_orientation": acc, "psnr_db_any_orientation": None,
           "ssim_any_orientation": None}
    if result.images is not None:
        pix = _dihedral(np.arange(h * h).reshape(h, h), k, flip).reshape(-1)
        flat = np.asarray(result.images).reshape(n, h * h, -1)
        back = np.empty_like(flat)
        back[:, pix] = flat                    # recon pixel q shows original pixel pix[q]
        out["psnr_db_any_orientation"], out["ssim_any_orientation"] = metrics.mean_psnr_ssim(
            originals, back.reshape(originals.shape))
    return out


# ---------------------------------------------------------------------------------------------
# the Gaussian token model shared by (a) and (c)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenModel:
    means: np.ndarray        # [n, D] mean token at each position
    cov: np.ndarray          # [D, D] pooled token covariance given the position
    patch_means: np.ndarray  # [n, d_p] mean normalised patch at each position
    gain: np.ndarray         # [D, d_p]: patch = patch_mean + (t - mean) @ gain

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances [N, k, n] of every token to every position."""
        chol = np.linalg.cholesky(self.cov)
        t = np.asarray(tokens, np.float64)
        tw = solve_triangular(chol, t.reshape(-1, t.shape[-1]).T, lower=True).T
        mw = solve_triangular(chol, self.means.T, lower=True).T
        d = (tw ** 2).sum(1)[:, None] - 2 * tw @ mw.T + (mw ** 2).sum(1)[None]
        return d.reshape(t.shape[0], t.shape[1], -1)

    def assign(self, tokens: np.ndarray) -> tuple[np.ndarray, float]:
        """Hungarian assignment of each image's tokens to distinct positions; also the mean
        distance of the assignment (lower = the model explains the tokens better)."""
        s = self.scores(tokens)
        pos = np.empty(s.shape[:2], np.int64)
        total = 0.0
        for i in range(len(s)):
            rows, cols = linear_sum_assignment(s[i])
            pos[i, rows] = cols
            total += s[i][rows, cols].sum()
        return pos, total / pos.size

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = np.asarray(tokens, np.float64)
        return self.patch_means[positions] + np.einsum("nkd,de->nke", t - self.means[positions], self.gain)


def _regularise(cov: np.ndarray, ridge: float) -> np.ndarray:
    return cov + ridge * max(float(np.mean(np.diag(cov))), 1e-12) * np.eye(len(cov))


def patch_prior(public_patches: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-position patch mean [n, d_p] and pooled covariance [d_p, d_p] of a public set."""
    z = np.asarray(public_patches, np.float64)
    mu = z.mean(0)
    r = (z - mu).reshape(-1, z.shape[-1])
    return mu, _regularise(r.T @ r / len(r), ridge)


def model_from_head(head: dict, public_patches: np.ndarray, *, ridge: float, noise_var: float) -> TokenModel:
    k = np.asarray(head["patch_embed"]["kernel"], np.float64)      # [d_p, D]
    b = np.asarray(head["patch_embed"]["bias"], np.float64)
    pos = np.asarray(head["pos_embed"], np.float64).reshape(-1, k.shape[1])
    mu, s = patch_prior(public_patches, ridge)
    signal = k.T @ s @ k
    cov = signal + (noise_var * max(float(np.mean(np.diag(signal))), 1e-12) + 1e-12) * np.eye(len(signal))
    gain = cho_solve(cho_factor(cov), k.T @ s)                       # C^-1 K' S  [D, d_p]
    return TokenModel(means=b + pos + mu @ k, cov=cov, patch_means=mu, gain=gain)


def model_from_data(tokens: np.ndarray, patches: np.ndarray, *, ridge: float) -> TokenModel:
    """Fitted on an attacker's own encryption of a public set: tokens [M, n, D] and patches
    [M, n, d_p], both in raster order (the attacker knows the positions of its own tokens)."""
    t = np.asarray(tokens, np.float64)
    z = np.asarray(patches, np.float64)
    m, mu = t.mean(0), z.mean(0)
    rt = (t - m).reshape(-1, t.shape[-1])
    rz = (z - mu).reshape(-1, z.shape[-1])
    cov = _regularise(rt.T @ rt / len(rt), ridge)
    gain = cho_solve(cho_factor(cov), rt.T @ rz / len(rt))
    return TokenModel(means=m, cov=cov, patch_means=mu, gain=gain)


QUANTILES = np.linspace(0.02, 0.98, 25)


def match_channels(tokens: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Order of the received channels that best matches the reference channels by their quantiles:
    tokens[..., order] is aligned with reference."""
    q_t = np.quantile(np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1]), QUANTILES, axis=0).T
    q_r = np.quantile(np.asarray(reference, np.float64).reshape(-1, reference.shape[-1]), QUANTILES, axis=0).T
    cost = ((q_r[:, None, :] - q_t[None, :, :]) ** 2).sum(-1)          # [ref channel, token channel]
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(rows), np.int64)
    order[rows] = cols
    return order


def _model_attack(model: TokenModel, tokens: np.ndarray, reference: np.ndarray, p: int,
                  image_shape: tuple, mean: float, std: float, reconstruct: bool) -> Reconstruction:
    candidates = {"identity": np.arange(tokens.shape[-1])}
    if reference is not None:
        candidates["matched"] = match_channels(tokens, reference)
    best = None
    for name, order in candidates.items():
        aligned = np.asarray(tokens)[..., order]
        pos, fit = model.assign(aligned)
        if best is None or fit < best[2]:
            best = (name, aligned, fit, pos)
    name, aligned, fit, pos = best
    images = None
    if reconstruct:
        n_img = len(tokens)
        patches = np.broadcast_to(model.patch_means, (n_img,) + model.patch_means.shape).copy()
        rows = np.arange(n_img)[:, None]
        patches[rows, pos] = model.decode(aligned, pos)
        h, w, c = image_shape
        images = np.clip(unpatchify(patches, p, h, w, c) * std + mean, 0.0, 1.0)
    return Reconstruction(pos, images, {"channel_alignment": name, "mean_mahalanobis": float(fit)})


def known_head_attack(tokens: np.ndarray, head: dict, public_images: np.ndarray, *, patch_size: int,
                      mean: float, std: float, ridge: float = 1e-3, noise_var: float = 1e-4,
                      reconstruct: bool = True) -> Reconstruction:
    """(a) position recovery and (b) patch inversion with a known head (see the module doc)."""
    z_pub = patchify((np.asarray(public_images, np.float64) - mean) / std, patch_size)
    model = model_from_head(head, z_pub, ridge=ridge, noise_var=noise_var)
    k = np.asarray(head["patch_embed"]["kernel"], np.float64)
    reference = z_pub @ k + np.asarray(head["patch_embed"]["bias"]) + np.asarray(head["pos_embed"]).reshape(-1, k.shape[1])
    return _model_attack(model, tokens, reference, patch_size, public_images.shape[1:], mean, std, reconstruct)


def learned_attack(tokens: np.ndarray, public_tokens: np.ndarray, public_images: np.ndarray, *,
                   patch_size: int, mean: float, std: float, ridge: float = 1e-3,
                   reconstruct: bool = True) -> Reconstruction:
    """(c) without the head: `public_tokens` [M, n, D] are the attacker's own encryption (raster
    order, every token) of `public_images` [M, H, W, C]."""
    z_pub = patchify((np.asarray(public_images, np.float64) - mean) / std, patch_size)
    model = model_from_data(public_tokens, z_pub, ridge=ridge)
    return _model_attack(model, tokens, public_tokens, patch_size, public_images.shape[1:], mean, std,
                         reconstruct)


def _kmeans(x: np.ndarray, k: int, key: jax.Array, iters: int) -> np.ndarray:
    """k-means++ initialisation (sampling from jax.random) + Lloyd iterations; returns labels."""
    first = int(jax.random.randint(jax.random.fold_in(key, 0), (), 0, len(x)))
    centers = [x[first]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        idx = int(jax.random.choice(jax.random.fold_in(key, j), len(x), p=probs))
        centers.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centers)
    x2 = (x ** 2).sum(1)[:, None]
    labels = None
    for _ in range(iters):
        d = x2 - 2 * x @ c.T + (c ** 2).sum(1)[None]
        new = d.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels


def cluster_labels(tokens: np.ndarray, *, num_patches: int, patch_dim: int, key: jax.Array,
                   iters: int = 30) -> tuple[np.ndarray, np.ndarray, str]:
    """The head-free grouping of tokens [N, k, D] into num_patches clusters: (labels [N*k], the
    clustering coordinates of every token [N*k, e], a description of that space)."""
    t = np.asarray(tokens, np.float64)
    x = t.reshape(-1, t.shape[-1])
    x = x - x.mean(0)
    dim = x.shape[1]
    if dim > patch_dim:
        # The content z K of every token lies in one d_p-dim subspace S; the position embeddings of
        # an image's tokens sum to (nearly, when masked) the same vector in every image, so the
        # per-image mean token varies (nearly) only inside S: S = its top d_p principal directions.
        # Projected onto the complement of S, tokens collapse onto one point per position.
        m = t.mean(1) - t.mean((0, 1))
        _, evecs = np.linalg.eigh(m.T @ m / len(m))                 # ascending
        y = x @ evecs[:, :dim - patch_dim]
        space = f"complement of the per-image-mean token's top {patch_dim} principal directions"
    else:
        evals, evecs = np.linalg.eigh(x.T @ x / len(x))
        y = (x @ evecs) / np.sqrt(np.maximum(evals, 1e-12))         # whitened
        space = "all components, whitened"
    return _kmeans(y, num_patches, key, iters), y, space


def cluster_attack(tokens: np.ndarray, true_positions: np.ndarray, *, num_patches: int, patch_dim: int,
                   key: jax.Array, iters: int = 30) -> Reconstruction:
    """(d) position clustering without the head (see the module doc). Needs the true positions only
    to score the grouping: clusters are matched one-to-one to positions (Hungarian on counts)."""
    t = np.asarray(tokens, np.float64)
    labels, _, space = cluster_labels(t, num_patches=num_patches, patch_dim=patch_dim, key=key, iters=iters)
    truth = np.asarray(true_positions).reshape(-1)
    counts = np.zeros((num_patches, num_patches))
    np.add.at(counts, (labels, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    to_pos = np.zeros(num_patches, np.int64)
    to_pos[rows] = cols
    # the same oracle matching of a grouping that knows nothing (the labels shuffled over tokens):
    # with few tokens per cluster the matching alone lifts the accuracy above 1/num_patches
    shuffled = np.asarray(jax.random.permutation(jax.random.fold_in(key, 10 ** 6), labels))
    null = np.zeros((num_patches, num_patches))
    np.add.at(null, (shuffled, truth), 1)
    r0, c0 = linear_sum_assignment(-null)
    return Reconstruction(to_pos[labels].reshape(t.shape[:2]), None,
                          {"cluster_space": space, "matching": "oracle (best one-to-one)",
                           "null_accuracy": float(null[r0, c0].sum() / len(truth))})


def mean_image_baseline(originals: np.ndarray, public_images: np.ndarray) -> dict:
    """The attacker's best guess without tokens: the public set's mean image, for every image."""
    guess = np.broadcast_to(np.asarray(public_images, np.float64).mean(0), originals.shape)
    p, s = metrics.mean_psnr_ssim(originals, guess)
    return {"psnr_db": p, "ssim": s}
