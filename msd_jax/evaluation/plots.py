"""Figures for a run: training curves from the metrics JSONL files, and the CLS attention of the
trained body over test images. PNG files, drawn with matplotlib's Agg backend (no display)."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from msd_jax.encryption import encrypt  # noqa: E402
from msd_jax.models import vit  # noqa: E402
from msd_jax.training.metrics import read_metrics  # noqa: E402


def _save(fig, out_png: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)


def training_curves(metrics_paths: dict[str, str], out_png: str) -> str:
    """Loss and teacher entropy against step, one line per party ({party: metrics JSONL path})."""
    fig, (ax_loss, ax_ent) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for party, path in sorted(metrics_paths.items()):
            rows = read_metrics(path)
            steps = [r["step"] for r in rows]
            for ax, key in ((ax_loss, "loss"), (ax_ent, "teacher_entropy")):
                pts = [(s, r[key]) for s, r in zip(steps, rows) if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=party)
        for ax, title in ((ax_loss, "loss"), (ax_ent, "teacher entropy (nats)")):
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        _save(fig, out_png)
    finally:
        plt.close(fig)
    return out_png


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cls_attention(head_params, body_params, images, cfg: vit.ViTConfig):
    """[B, num_patches]: last block's CLS -> patch attention, mean over heads, plain raster order."""
    tokens = vit.PatchHead(cfg).apply({"params": head_params}, images)
    _, weights = vit.Body(cfg).apply({"params": body_params}, tokens, return_attention=True)
    return weights[:, :, 0, 1:].astype(jnp.float32).mean(axis=1)  # [B, h, q, k] -> [B, n]


def cls_attention(head_params, body_params, cfg: vit.ViTConfig, images: np.ndarray, *,
                  mean: float, std: float) -> np.ndarray:
    """[B, grid, grid] CLS-to-patch attention of the last block (mean over heads) on the plain
    (un-permuted) tokens of `images` [B, H, W, C] (pixels before normalisation)."""
    x = encrypt.normalize(np.asarray(images, np.float32), mean, std)
    att = np.asarray(_cls_attention(head_params, body_params, x, cfg))
    return att.reshape(len(x), cfg.grid, cfg.grid)


def attention_maps(head_params, body_params, cfg: vit.ViTConfig, images: np.ndarray, out_png: str,
                   mean: float, std: float, num: int = 8) -> np.ndarray:
    """Draws the first `num` images (top row) and their CLS attention upsampled to the image over
    them (bottom row); writes `out_png` and returns the attention [num, grid, grid]."""
    images = np.asarray(images[:num], np.float32)
    num = len(images)
    if num == 0:
        raise ValueError("attention_maps: no images")
    att = cls_attention(head_params, body_params, cfg, images, mean=mean, std=std)
    p = cfg.patch_size
    fig, axes = plt.subplots(2, num, figsize=(1.8 * num, 3.8), squeeze=False)
    try:
        for i in range(num):
            img = images[i]
            img = img[..., 0] if img.shape[-1] == 1 else img
            lo, hi = float(img.min()), float(img.max())
            shown = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            cmap = "gray" if shown.ndim == 2 else None
            up = np.kron(att[i], np.ones((p, p), np.float32))  # nearest upsampling to the image
            for ax in axes[:, i]:
                ax.imshow(shown, cmap=cmap)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[1, i].imshow(up, cmap="jet", alpha=0.5)
        axes[0, 0].set_ylabel("image")
        axes[1, 0].set_ylabel("CLS attention")
        fig.suptitle("last block, CLS -> patch attention (mean over heads)", fontsize=9)
        _save(fig, out_png)
    finally:
        plt.close(fig)
    return att


def _site_group(name: str, r: dict) -> str:
    skipped = "" if r.get("knn") is not None else ", skipped"
    return f"{name}\n(n={r['num_images']}{skipped})"


def site_accuracy(by_site: dict, pooled: dict, random_init: dict | None, out_png: str,
                  feature: str = "") -> str:
    """Grouped bars of kNN and linear-probe accuracy: one group per site (probes fitted on that
    site's labelled images alone), then the pooled probes and the random-init backbone for
    reference. `by_site` is report['eval_by_site'], where a site without probes (knn None: too few
    images or one class) keeps its place with no bars; `pooled`, `random_init` are {'knn', 'linear'}."""
    groups = [(_site_group(name, r), r) for name, r in by_site.items()]
    groups.append(("pooled", pooled))
    if random_init is not None:
        groups.append(("random init\n(pooled)", random_init))
    probed = [i for i, (_, r) in enumerate(groups) if r.get("knn") is not None]
    x = np.arange(len(groups))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 1.5), 4))
    try:
        for j, (probe, label) in enumerate((("knn", "kNN"), ("linear", "linear probe"))):
            vals = [groups[i][1][probe]["accuracy"] for i in probed]
            bars = ax.bar(x[probed] + (j - 0.5) * width, vals, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        for i in sorted(set(range(len(groups))) - set(probed)):
            ax.text(x[i], 0.05, "no probes", ha="center", va="bottom", fontsize=7, rotation=90, color="gray")
        ax.set_xticks(x, [g for g, _ in groups], fontsize=8)
        ax.axvline(len(by_site) - 0.5, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 1.2)  # room above the bars for the legend
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("test accuracy (pooled test split)")
        ax.set_title("probes fitted on each site's own labels" + (f" ({feature} features)" if feature else ""),
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
        _save(fig, out_png)
    finally:
        plt.close(fig)
    return out_png


def label_efficiency(block: dict, out_png: str) -> str:
    """Test accuracy and AUC against the labelled fraction (log x), one line per backbone and probe
    with its 95% interval as a band; `block` is report['label_efficiency']."""
    rows = block["rows"]
    lines = list(dict.fromkeys((r["backbone"], r["method"]) for r in rows))
    backbones = list(dict.fromkeys(b for b, _ in lines))
    methods = list(dict.fromkeys(m for _, m in lines))
    # colour: the method; line style: the backbone (the pipeline's solid, the random init dashed)
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for ax, metric, title in ((axes[0], "accuracy", "test accuracy"), (axes[1], "auc", "test ROC-AUC")):
            for backbone, method in lines:
                pts = sorted((r["fraction"], r[metric], r.get(f"{metric}_ci95")) for r in rows
                             if (r["backbone"], r["method"]) == (backbone, method))
                xs = [p[0] for p in pts]
                line, = ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{backbone}, {method}",
                                color=f"C{methods.index(method)}",
                                ls=styles[backbones.index(backbone) % len(styles)])
                bands = [p[2] for p in pts]
                if all(b is not None for b in bands):
                    ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands],
                                    color=line.get_color(), alpha=0.15, lw=0)
            ax.set_xscale("log")
            fractions = sorted({r["fraction"] for r in rows})
            ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("labelled train images (fraction)")
            ax.set_title(title + " (mean over draws, 95% interval)", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        _save(fig, out_png)
    finally:
        plt.close(fig)
    return out_png
