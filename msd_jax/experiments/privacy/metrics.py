"""Image similarity of a reconstruction to its original, in numpy float64, pixels in [0, data_range].

PSNR = 10 log10(data_range^2 / MSE) per image. SSIM (Wang et al., IEEE TIP 2004) with a Gaussian
window (sigma 1.5, 11 x 11, 'valid' positions only), C1 = (0.01 L)^2, C2 = (0.03 L)^2, population
(biased) local variances, averaged over the window positions and channels; `window='uniform'` uses
a flat win x win window instead.
"""
from __future__ import annotations

import numpy as np

K1, K2 = 0.01, 0.03


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, max_db: float = 100.0) -> float:
    """PSNR in dB of one image pair (any shape); capped at `max_db` for identical images."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    if mse <= data_range ** 2 * 10 ** (-max_db / 10):
        return max_db
    return float(10 * np.log10(data_range ** 2 / mse))


def _window(kind: str, win: int, sigma: float) -> np.ndarray:
    if kind == "uniform":
        w = np.ones((win, win))
    elif kind == "gaussian":
        r = np.arange(win) - (win - 1) / 2
        g = np.exp(-r ** 2 / (2 * sigma ** 2))
        w = np.outer(g, g)
    else:
        raise ValueError(f"ssim: window expected 'gaussian' or 'uniform', got {kind!r}")
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted sums of every valid win x win window of img [H, W]."""
    win = w.shape[0]
    patches = np.lib.stride_tricks.sliding_window_view(img, (win, win))  # [H-win+1, W-win+1, win, win]
    return np.einsum("ijkl,kl->ij", patches, w)


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, window: str = "gaussian",
         win: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of one image pair [H, W] or [H, W, C]. The window shrinks to the image when the
    image is smaller than `win` (odd sizes kept)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    win = min(win, x.shape[0], x.shape[1])
    w = _window(window, win, sigma)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    vals = []
    for c in range(x.shape[-1]):
        a, b = x[..., c], y[..., c]
        mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
        var_a = _filter_valid(a * a, w) - mu_a ** 2
        var_b = _filter_valid(b * b, w) - mu_b ** 2
        cov = _filter_valid(a * b, w) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def mean_psnr_ssim(originals: np.ndarray, recons: np.ndarray) -> tuple[float, float]:
    """Per-image PSNR (dB) and SSIM, averaged over images [N, H, W, C]."""
    p = [psnr(o, r) for o, r in zip(originals, recons)]
    s = [ssim(o, r) for o, r in zip(originals, recons)]
    return float(np.mean(p)), float(np.mean(s))
