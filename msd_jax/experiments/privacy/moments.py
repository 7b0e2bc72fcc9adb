"""(e) moments: the secret head estimated from second-order statistics, then inverted.

Needs no head: only the received tokens and a public look-alike image set. Notation as in
attacks.py: a token is t = z_p K + c_p (normalised patch z_p at position p, unknown kernel K
[d_p, D], unknown offset c_p = bias + position embedding), channels possibly permuted, shuffled.

1. Group the tokens by position with the head-free clustering (attacks.cluster_labels).
2. The within-cluster token covariance K' S_p K has rank d_p: its top d_p eigenvectors U [D, d_p]
   span the content. In those coordinates u = (t - m_j) U = (z_p - mu_p) A with one unknown
   invertible A = K U [d_p, d_p] (a channel permutation or a rotation of the embedding only
   changes U, never the problem).
3. Pooled: A' S A = C_u (S: the public set's pooled patch covariance), so
   A = S^-1/2 Q C_u^1/2 for some orthogonal Q: second-order statistics pooled over positions leave
   exactly a rotation free. Per position they do not: with B_p = S^-1/2 S_p S^-1/2 (public set,
   position p) and M_j = C_u^-1/2 C_j C_u^-1/2 (cluster j), M_j = Q' B_p Q for the cluster j of
   position p. Q solves the linear equations Q M_j = B_p Q jointly over all positions (smallest
   eigenvector of their normal matrix, then the nearest orthogonal matrix); different S_p across
   positions pin it down up to a global sign.
4. Which cluster is which position is unknown too: first matched by the whitened covariances'
   spectra (invariant to Q); rotations solved from random triples of those pairs propose
   matchings by ||Q M_j Q' - B_p|| (Hungarian), the cheapest wins; then Q (down-weighting pairs
   that fit badly) and the matching are re-solved alternately, keeping the best fit.
5. The global sign z -> -z leaves every second-order statistic unchanged: it is chosen by the
   public set's per-pixel third moments (image intensities are skewed). Smoothness between
   neighbouring patches cannot choose it (2 mu - x is as smooth as x).
6. Each image's tokens go to distinct positions (Hungarian on the distance to each position's
   cluster centre), and each patch is its Wiener estimate mu_p + u (C_u + r)^-1 A' S as in the
   known-head attack; positions never received keep the public mean patch.

Applies when D > d_p (the content is then a proper subspace that clustering can see around, as in
every config here); otherwise it reports itself not applicable.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import scipy.linalg
from scipy.optimize import linear_sum_assignment

from msd_jax.experiments.privacy import attacks


def _sym_power(c: np.ndarray, power: float, floor: float) -> np.ndarray:
    """c^power of a symmetric PSD matrix, eigenvalues floored at floor x their mean."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    w = np.maximum(w, floor * max(float(np.mean(w)), 1e-12))
    return (v * w ** power) @ v.T


def group_moments(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group mean [k, d], covariance [k, d, d] and count [k] of rows x [T, d] with labels in 0..k-1
    (an empty group: zeros)."""
    d = x.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, x)
    means = sums / np.maximum(counts, 1)[:, None]
    r = x - means[labels]
    covs = np.zeros((k, d, d))
    np.add.at(covs, labels, r[:, :, None] * r[:, None, :])
    return means, covs / np.maximum(counts, 1)[:, None, None], counts


def rotation_from_pairs(b: np.ndarray, m: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The orthogonal Q [d, d] that best satisfies Q m_i = b_i Q for symmetric pairs b, m [k, d, d]:
    the smallest eigenvector of the normal matrix of these linear equations in Q (row-major
    vec(B Q) = (B x I) vec Q, vec(Q M) = (I x M) vec Q), made orthogonal (polar factor). Defined up
    to its sign."""
    k, d, _ = b.shape
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    eye = np.eye(d)
    bb = np.einsum("k,kij,kjl->il", w, b, b)
    mm = np.einsum("k,kij,kjl->il", w, m, m)
    cross = np.einsum("k,kij,kab->iajb", w, b, m).reshape(d * d, d * d)
    normal = np.kron(eye, mm) + np.kron(bb, eye) - 2 * cross
    _, vec = scipy.linalg.eigh((normal + normal.T) / 2, subset_by_index=[0, 0])
    x = vec[:, 0].reshape(d, d)
    u, _, vt = np.linalg.svd(x)
    return u @ vt


def robust_rotation(b: np.ndarray, m: np.ndarray, weights: np.ndarray, steps: int = 5) -> tuple[np.ndarray, float]:
    """rotation_from_pairs with pairs that fit badly down-weighted (iteratively reweighted, weight
    1 / (residual + median residual)): a few wrongly matched positions must not steer Q. Also the
    fit, the median squared residual ||Q m Q' - b||^2 relative to ||b||^2."""
    robust = np.ones(len(b))
    for _ in range(steps):
        q = rotation_from_pairs(b, m, weights * robust)
        resid = ((np.einsum("ia,kab,jb->kij", q, m, q) - b) ** 2).sum((1, 2)) / (b ** 2).sum((1, 2))
        robust = 1.0 / (resid + np.median(resid) + 1e-12)
    return q, float(np.median(resid))


def _match(cost: np.ndarray) -> np.ndarray:
    """to_pos[cluster] from a [cluster, position] cost (Hungarian)."""
    rows, cols = linear_sum_assignment(cost)
    to_pos = np.zeros(cost.shape[0], np.int64)
    to_pos[rows] = cols
    return to_pos


def spectral_cost(b: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[cluster, position] distances between the log-spectra of m_j and b_p (both invariant to Q)."""
    def logspec(a):
        w = np.linalg.eigvalsh(a)
        return np.log(np.maximum(w, 1e-3 * max(float(np.mean(w)), 1e-12)))
    lm, lb = logspec(m), logspec(b)
    return ((lm[:, None, :] - lb[None, :, :]) ** 2).sum(-1)


def rotated_cost(b: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """[cluster, position] squared Frobenius distances ||Q m_j Q' - b_p||^2."""
    r = np.einsum("ia,kab,jb->kij", q, m, q)
    return ((r ** 2).sum((1, 2))[:, None] + (b ** 2).sum((1, 2))[None]
            - 2 * np.einsum("kij,pij->kp", r, b))


def _initial_match(b: np.ndarray, m: np.ndarray, rng: np.random.Generator, trials: int) -> np.ndarray:
    """to_pos[cluster]: matched by the covariance spectra, then the best of `trials` rotations each
    solved from 3 random pairs of that matching (a few wrong pairs spoil a rotation solved from all
    of them), every rotation scored by the cost of the matching it induces."""
    spectral = _match(spectral_cost(b, m))
    best = (np.inf, spectral)
    for _ in range(trials):
        pick = rng.choice(len(m), size=min(3, len(m)), replace=False)
        q = rotation_from_pairs(b[spectral[pick]], m[pick])
        cost = rotated_cost(b, m, q)
        to_pos = _match(cost)
        total = float(cost[np.arange(len(m)), to_pos].sum())
        if total < best[0]:
            best = (total, to_pos)
    return best[1]


@dataclasses.dataclass
class HeadEstimate:
    kernel: np.ndarray       # [d_p, D] the estimated K restricted to the content (A U')
    mixing: np.ndarray       # [d_p, d_p] A: u = (z - mu_p) A
    basis: np.ndarray        # [D, d_p] U: the content subspace of the tokens
    cluster_to_pos: np.ndarray   # [num_patches] estimated position of every cluster
    cluster_means: np.ndarray    # [num_patches, D] mean received token of every cluster
    gain: np.ndarray         # [d_p, d_p] Wiener decoder: patch - mu_p = (t - m_j) U gain
    rounds: int


def estimate_head(tokens: np.ndarray, labels: np.ndarray, public_patches: np.ndarray, *,
                  ridge: float, rng: np.random.Generator, rounds: int = 10,
                  trials: int = 12) -> HeadEstimate:
    """Steps 2-5 of the module doc. tokens [N, k, D] (received), labels [N, k] (their clusters,
    0..n-1), public_patches [M, n, d_p] (normalised, raster order)."""
    z = np.asarray(public_patches, np.float64)
    n, dp = z.shape[1], z.shape[2]
    t = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
    lab = np.asarray(labels).reshape(-1)
    dim = t.shape[1]
    if dim <= dp:
        raise ValueError(f"moments attack: needs embed_dim > patch_dim, got {dim} <= {dp}")
    means, covs, counts = group_moments(t, lab, n)
    pooled = np.einsum("k,kij->ij", counts, covs) / counts.sum()
    _, vecs = np.linalg.eigh(pooled)
    basis = vecs[:, ::-1][:, :dp]                                          # [D, d_p]
    cu_j = np.einsum("ia,kij,jb->kab", basis, covs, basis)                 # [n, d_p, d_p]
    cu = np.einsum("k,kij->ij", counts, cu_j) / counts.sum()
    # public side: per-position and pooled patch covariances
    mu = z.mean(0)
    r = z - mu
    s_p = np.einsum("mpi,mpj->pij", r, r) / len(z)
    s = attacks._regularise(s_p.mean(0), ridge)
    s_ih = _sym_power(s, -0.5, ridge)
    c_ih, c_h = _sym_power(cu, -0.5, ridge), _sym_power(cu, 0.5, ridge)
    b = np.einsum("ia,pab,bj->pij", s_ih, s_p, s_ih)
    m = np.einsum("ia,pab,bj->pij", c_ih, cu_j, c_ih)
    to_pos = _initial_match(b, m, rng, trials)
    best = None
    for done in range(1, rounds + 1):
        q, fit = robust_rotation(b[to_pos], m, counts / counts.max())
        if best is None or fit < best[0]:
            best = (fit, q, to_pos, done)
        new = _match(rotated_cost(b, m, q))
        if np.array_equal(new, to_pos):
            break
        to_pos = new
    _, q, to_pos, done = best
    a = s_ih @ q @ c_h                                                     # A = S^-1/2 Q C_u^1/2
    a = a * _third_moment_sign((t - means[lab]) @ basis, lab, to_pos, a, cu, s, z, ridge)
    return HeadEstimate(kernel=a @ basis.T, mixing=a, basis=basis, cluster_to_pos=to_pos,
                        cluster_means=means, gain=wiener_gain(a, cu, s, ridge), rounds=done)


def wiener_gain(a: np.ndarray, cu: np.ndarray, s: np.ndarray, ridge: float) -> np.ndarray:
    """[d_p, d_p]: patch - mu_p = u @ gain, gain = (C_u + r)^-1 A' S."""
    return np.linalg.solve(attacks._regularise(cu, ridge), a.T @ s)


def _third_moment_sign(u: np.ndarray, lab: np.ndarray, to_pos: np.ndarray, a: np.ndarray,
                       cu: np.ndarray, s: np.ndarray, public: np.ndarray, ridge: float) -> float:
    """+1 or -1: the sign of A whose decoded patches' per-pixel third central moments agree with
    the public set's (position by position)."""
    dev = u @ wiener_gain(a, cu, s, ridge)                                  # [T, d_p]
    n = public.shape[1]
    k3 = np.zeros((n, dev.shape[1]))
    np.add.at(k3, to_pos[lab], dev ** 3)
    k3 /= np.maximum(np.bincount(to_pos[lab], minlength=n), 1)[:, None]
    pub = public - public.mean(0)
    return 1.0 if float(np.sum(k3 * (pub ** 3).mean(0))) >= 0 else -1.0


def _place(y: np.ndarray, labels: np.ndarray, to_pos: np.ndarray, n: int) -> np.ndarray:
    """Each image's tokens at distinct positions: Hungarian on the squared distance of every token
    (clustering coordinates y [N, k, e]) to the centre of the cluster matched to each position."""
    centres, _, _ = group_moments(y.reshape(-1, y.shape[-1]), labels.reshape(-1), n)
    by_pos = np.zeros_like(centres)
    by_pos[to_pos] = centres
    pos = np.empty(labels.shape, np.int64)
    for i in range(len(y)):
        cost = ((y[i][:, None, :] - by_pos[None]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        pos[i, rows] = cols
    return pos


def moment_attack(tokens: np.ndarray, public_images: np.ndarray, *, patch_size: int, mean: float,
                  std: float, key: jax.Array, ridge: float = 1e-3, kmeans_iters: int = 30,
                  rounds: int = 10, reconstruct: bool = True) -> attacks.Reconstruction:
    """(e) the head-free second-order attack (module doc). tokens [N, k, D] as received."""
    t = np.asarray(tokens, np.float64)
    pub = np.asarray(public_images, np.float64)
    z_pub = attacks.patchify((pub - mean) / std, patch_size)
    n, dp = z_pub.shape[1], z_pub.shape[2]
    if t.shape[-1] <= dp:
        return attacks.Reconstruction(None, None, {
            "applicable": False,
            "why": f"embed_dim {t.shape[-1]} <= patch_dim {dp}: no content subspace to separate"})
    labels, y, _ = attacks.cluster_labels(t, num_patches=n, patch_dim=dp, key=key, iters=kmeans_iters)
    labels = labels.reshape(t.shape[:2])
    rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(key, 1))))
    est = estimate_head(t, labels, z_pub, ridge=ridge, rng=rng, rounds=rounds)
    positions = _place(y.reshape(t.shape[:2] + (-1,)), labels, est.cluster_to_pos, n)
    images = None
    if reconstruct:
        dev = ((t - est.cluster_means[labels]) @ est.basis) @ est.gain
        mu = z_pub.mean(0)
        patches = np.broadcast_to(mu, (len(t),) + mu.shape).copy()
        patches[np.arange(len(t))[:, None], positions] = mu[positions] + dev
        h, w, c = pub.shape[1:]
        images = np.clip(attacks.unpatchify(patches, patch_size, h, w, c) * std + mean, 0.0, 1.0)
    return attacks.Reconstruction(positions, images, {
        "applicable": True, "matching": "estimated (covariance spectra, then rotated covariances)",
        "rounds": est.rounds})
