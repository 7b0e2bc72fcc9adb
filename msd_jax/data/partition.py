"""Split example indices among federated sites (IID, Dirichlet label skew, quantity skew)."""

from __future__ import annotations

import math

import numpy as np

SCHEMES = ("iid", "dirichlet", "quantity")
MAX_TRIES = 1000


def _cuts(props: np.ndarray, n: int) -> np.ndarray:
    """Cut points for splitting ``n`` items by proportions ``props`` (sum 1)."""
    return (np.cumsum(props)[:-1] * n).astype(np.int64)


def partition(
    labels: np.ndarray,
    num_sites: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_site: int = 1,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` among ``num_sites`` sites.

    * ``iid``: seeded random permutation cut into near-equal parts (sizes differ by <= 1).
    * ``dirichlet``: label skew (Hsu et al. 2019 style): for each class, the site proportions are
      drawn from ``Dirichlet(alpha * ones(num_sites))`` and that class's (shuffled) examples are
      cut accordingly. Small ``alpha`` -> strongly skewed, large ``alpha`` -> near IID.
    * ``quantity``: site sizes from ``Dirichlet(alpha * ones(num_sites))`` over a shuffled IID
      order (labels distributed IID, sizes skewed).

    For ``dirichlet``/``quantity`` the draw is repeated (from the same seeded generator, so the
    result is deterministic) until every site has ``>= min_per_site`` examples; after
    ``MAX_TRIES`` draws a ``ValueError`` is raised. Returns sorted int64 index arrays, disjoint and
    covering every index exactly once (``iid`` ignores ``alpha``; all schemes check
    ``min_per_site``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"partition: labels has shape {labels.shape}; expected a 1-D array")
    n = int(labels.shape[0])
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ValueError(f"partition: num_sites={num_sites!r}; expected an integer >= 1")
    if scheme not in SCHEMES:
        raise ValueError(
            f"data.partition={scheme!r}: unknown partition scheme; expected one of {list(SCHEMES)}"
        )
    if isinstance(min_per_site, bool) or not isinstance(min_per_site, (int, np.integer)) or min_per_site < 0:
        raise ValueError(f"partition: min_per_site={min_per_site!r}; expected an integer >= 0")
    if scheme != "iid":
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            a = float("nan")
        if not (math.isfinite(a) and a > 0):
            raise ValueError(
                f"data.alpha={alpha!r} (partition {scheme!r}): expected a finite number > 0"
            )
    num_sites = int(num_sites)
    if n < num_sites * min_per_site:
        raise ValueError(
            f"partition: {n} examples cannot give {num_sites} sites >= min_per_site="
            f"{min_per_site} examples each; expected at least {num_sites * min_per_site} examples"
        )
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    else:
        ones = np.full(num_sites, float(alpha))
        if scheme == "dirichlet":
            classes = np.unique(labels)
            by_class = [np.flatnonzero(labels == c) for c in classes]
        else:
            order = rng.permutation(n)
        for _ in range(MAX_TRIES):
            if scheme == "dirichlet":
                chunks: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
                for idx in by_class:
                    idx = rng.permutation(idx)
                    for s, piece in enumerate(np.split(idx, _cuts(rng.dirichlet(ones), len(idx)))):
                        chunks[s].append(piece)
                parts = [np.concatenate(c) if c else np.zeros((0,), np.int64) for c in chunks]
            else:
                parts = np.split(order, _cuts(rng.dirichlet(ones), n))
            if min(len(p) for p in parts) >= min_per_site:
                break
        else:
            raise ValueError(
                f"data.partition={scheme!r}: no draw in {MAX_TRIES} tries gave every one of "
                f"{num_sites} sites >= min_per_site={min_per_site} examples (n={n}, "
                f"alpha={alpha}); expected a larger alpha, fewer sites or a smaller min_per_site"
            )
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if min(len(p) for p in out) < min_per_site:
        raise ValueError(
            f"data.partition={scheme!r}: a site got fewer than min_per_site={min_per_site} "
            f"examples ({[len(p) for p in out]}); expected more examples or fewer sites"
        )
    return out
