"""The comparison's report: the row-seed results aggregated over seeds, written as
DIR/comparison.json, comparison.md (the tables), comparison.png (accuracy vs bytes moved) and
label_efficiency.png; for a sweep, DIR/ablation.json and ablation.md."""
from __future__ import annotations

import os

import numpy as np

from msd_jax.evaluation.intervals import paired_difference_ci
from msd_jax.experiments.compare.results import predictions_path, read_predictions, write_json

# (a, b, methods): the differences the comparison exists to show, each on the same test images
HEADLINE_PAIRS = (("msd_token_upload", "fedavg_msd", ("linear", "finetune")),
                  ("msd_token_upload", "finetune_only", ("finetune",)),
                  ("msd_token_upload", "no_pretraining", ("knn", "linear")),
                  ("msd_token_upload", "supervised_scratch", ("finetune",)))

METRICS = (("knn", "accuracy"), ("knn", "auc"), ("linear", "accuracy"), ("linear", "auc"),
           ("finetune", "accuracy"), ("finetune", "auc"), ("finetune_per_site", "accuracy"),
           ("finetune_per_site", "auc"))


def aggregate(results: dict[str, list[dict]]) -> list[dict]:
    """One row per protocol: mean and std (population, ddof=0) over seeds of every metric; bytes,
    rounds, image-views, optimizer steps and wall time as means over seeds."""
    rows = []
    for name, rs in results.items():
        if not rs:
            continue
        row = {"name": name, "seeds": [r["seed"] for r in rs]}
        for group, metric in METRICS:
            # None: no site could carry the per-site evaluation
            vals = [r[group][metric] for r in rs if group in r and r[group][metric] is not None]
            if vals:
                row[f"{group}_{metric}_mean"] = float(np.mean(vals))
                row[f"{group}_{metric}_std"] = float(np.std(vals))
            if len(rs) == 1 and rs[0].get(group, {}).get(f"{metric}_ci95") is not None:
                row[f"{group}_{metric}_ci95"] = rs[0][group][f"{metric}_ci95"]
        for k in ("bytes_up", "bytes_down", "rounds", "image_views", "optimizer_steps", "wall_s", "eval_s"):
            row[k] = float(np.mean([r[k] for r in rs]))
        row["how"] = rs[0]["budget"]["how"]
        if rs[0].get("changed_settings"):
            row["changed_settings"] = rs[0]["changed_settings"]
        if "best" in rs[0]:
            row["best_linear_accuracy_mean"] = float(np.mean([r["best"]["linear"] for r in rs]))
        row["label_efficiency"] = aggregate_label_efficiency([r.get("label_efficiency", []) for r in rs])
        rows.append(row)
    return rows


def aggregate_label_efficiency(per_seed: list[list[dict]]) -> list[dict]:
    """One entry per (method, fraction) of a row: with one seed its label-efficiency row as it is
    (mean over draws, 95% interval, std across draws); with several, the mean over seeds of the
    draws' means, 'accuracy_seed_std' / 'auc_seed_std' (ddof=0) and 'per_seed' (intervals are per seed)."""
    if len(per_seed) == 1:
        return [dict(r) for r in per_seed[0]]
    groups: dict[tuple, list[dict]] = {}
    for rows in per_seed:
        for r in rows:
            groups.setdefault((r["method"], r["fraction"]), []).append(r)
    out = []
    for (method, fraction), rs in groups.items():
        entry = {"backbone": rs[0]["backbone"], "method": method, "fraction": fraction,
                 "num_labelled": rs[0]["num_labelled"], "seeds": len(rs), "per_seed": rs}
        for metric in ("accuracy", "auc"):
            vals = [r[metric] for r in rs]
            entry[metric] = float(np.mean(vals))
            entry[f"{metric}_seed_std"] = float(np.std(vals))
        out.append(entry)
    return out


def paired_differences(config, workdir: str, rows: list[str], seeds: int) -> list[dict]:
    """HEADLINE_PAIRS present in `rows`, per seed: the paired bootstrap interval of a's metric minus
    b's on the same test images (config.eval.bootstrap_resamples resamples from the seed), from the
    rows' predictions.npz; pairs without both predictions are left out."""
    out = []
    for a, b, methods in HEADLINE_PAIRS:
        if a not in rows or b not in rows:
            continue
        for k in range(int(seeds)):
            pa, pb = (read_predictions(predictions_path(workdir, r, k)) for r in (a, b))
            if pa is None or pb is None:
                continue
            for method in methods:
                if method not in pa or method not in pb:
                    continue
                d = paired_difference_ci(pa[method], pb[method], pa["labels"],
                                         resamples=int(config.eval.bootstrap_resamples) or 1000,
                                         seed=int(config.seed) + k)
                out.append({"a": a, "b": b, "method": method, "seed": int(config.seed) + k, **d})
    return out


def paired_md(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    out = ["", "Paired differences on the same test images (a minus b; 95% paired bootstrap interval; "
               "an interval that holds 0 is within the test split's noise):", "",
           "| a | b | method | seed | accuracy difference | AUC difference |", "|---|---|---|---|---|---|"]
    for p in pairs:
        acc, auc = p["accuracy"], p["auc"]
        out.append(f"| {p['a']} | {p['b']} | {p['method']} | {p['seed']} | {acc['difference']:+.3f} "
                   f"[{acc['ci'][0]:+.3f}, {acc['ci'][1]:+.3f}] | {auc['difference']:+.3f} "
                   f"[{auc['ci'][0]:+.3f}, {auc['ci'][1]:+.3f}] |")
    return out


def _cell(r: dict, metric: str) -> str:
    text = f"{r[metric]:.3f}"
    if r.get(f"{metric}_ci95") is not None:
        lo, hi = r[f"{metric}_ci95"]
        text += f" [{lo:.3f}, {hi:.3f}]"
    if r.get(f"{metric}_seed_std") is not None:
        text += f" ± {r[f'{metric}_seed_std']:.3f} (seeds)"
    elif r.get("draws", 1) > 1:
        text += f" ± {r[f'{metric}_std']:.3f}"
    return text


def label_efficiency_md(rows: list[dict]) -> list[str]:
    """The label-efficiency table: one line per row, method and fraction."""
    entries = [(r["name"], e) for r in rows for e in r.get("label_efficiency", [])]
    if not entries:
        return []
    out = ["", "Label efficiency (stratified, nested subsets of the labelled train images, scored on the "
               "whole test split; mean over draws [95% bootstrap interval of that mean] ± std across draws):",
           "", "| row | method | fraction | labelled | draws | accuracy | AUC |", "|---|---|---|---|---|---|---|"]
    for name, e in sorted(entries, key=lambda x: (x[1]["fraction"], x[0], x[1]["method"])):
        out.append(f"| {name} | {e['method']} | {e['fraction']:g} | {e['num_labelled']} | {e.get('draws', '-')} | "
                   f"{_cell(e, 'accuracy')} | {_cell(e, 'auc')} |")
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _pm(row, key) -> str:
    """'mean ± std' over seeds; with one seed the value and its 95% interval, '0.910 [0.887, 0.932]'."""
    if f"{key}_mean" not in row:
        return "-"
    if f"{key}_ci95" in row:
        lo, hi = row[f"{key}_ci95"]
        return f"{row[key + '_mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{row[key + '_mean']:.3f} ± {row[key + '_std']:.3f}"


def _value(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _setting_changes(settings: dict, config) -> str:
    """"merge.data='uploaded' (not 'proxy')" for {'merge.data': 'uploaded'}."""
    parts = []
    for key, value in settings.items():
        section, field = key.split(".")
        parts.append(f"{key}={_value(value)} (not {_value(config[section][field])})")
    return ", ".join(parts)


def changes_md(config, changed: dict, skipped: dict) -> list[str]:
    """The lines under the table on the rows that ran with a changed setting and those not run."""
    out = []
    if changed:
        out += ["", "Rows run with a changed setting (checked before any row trained):", ""]
        out += [f"- **{row}**: {_setting_changes(c['settings'], config)}, because it needs "
                f"{'; '.join(c['why'])}." for row, c in changed.items()]
    if skipped:
        out += ["", "Rows not run (checked before any row trained):", ""]
        out += [f"- **{row}**: skipped, because it needs {'; '.join(why)}." for row, why in skipped.items()]
    return out


def table_md(rows: list[dict], config, target: int, note: str = "", changed: dict | None = None,
             skipped: dict | None = None) -> str:
    """The markdown table; `changed`, `skipped`: needs.check_rows' rows run with a changed setting
    ({row: {'settings', 'why'}}) and rows not run ({row: [why]})."""
    changed, skipped = changed or {}, skipped or {}
    head = ("| row | seeds | kNN acc | kNN AUC | linear acc | linear AUC | fine-tune acc | fine-tune AUC "
            "| fine-tune per site acc | MiB up | MiB down | rounds | image-views | opt. steps | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {len(r['seeds'])} | {_pm(r, 'knn_accuracy')} | {_pm(r, 'knn_auc')} | "
            f"{_pm(r, 'linear_accuracy')} | {_pm(r, 'linear_auc')} | {_pm(r, 'finetune_accuracy')} | "
            f"{_pm(r, 'finetune_auc')} | {_pm(r, 'finetune_per_site_accuracy')} | {_mib(r['bytes_up'])} | "
            f"{_mib(r['bytes_down'])} | {r['rounds']:.0f} | {r['image_views']:.0f} | "
            f"{r['optimizer_steps']:.0f} | {r['wall_s']:.0f} |")
    ncols = head.count("|") - 1
    lines += [f"| {row} | skipped (below) |" + " - |" * (ncols - 2) for row in skipped]
    out = ["# Comparison at one compute budget", "",
           f"Budget: {target} student image-views per protocol (mean ± std over seeds; std with "
           f"ddof=0). Features: {config.eval.features.split(',')[0]}; fine-tuning "
           f"{config.compare.finetune_steps} steps on the pooled labelled train split (per site: on "
           f"each site's labelled images, mean over sites), scored on the pooled test split.", ""]
    out += lines + ["", "How each protocol spent the budget:", ""]
    out += [f"- **{r['name']}**: {r['how']}." for r in rows]
    out += changes_md(config, changed, skipped)
    out += ["", "`no_pretraining` spends no pretraining compute (random-init body with the fixed head); "
                "`finetune_only` (the paper's fine-tuning only baseline) and `supervised_scratch` train on "
                "the labels alone with the optimizer steps and batch of every backbone's fine-tuning; "
                "their fine-tune column is their own classifier's test score and their probes read the "
                "label-trained backbone (`finetune_only`: the fine-tuning recipe from the random-init "
                "body; `supervised_scratch`: the supervised recipe, patch embedding trained). "
                "`local_only` reports the mean over the site models (each evaluated as a backbone; per "
                "site fine-tuning on its own site's labels). Bytes are the sizes of the files each "
                "protocol writes and moves (token shards with manifests, the head, msgpack models, raw "
                "uint8 images), summed over sites and rounds; the final backbone's distribution is not "
                "counted for any row."]
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> str:
    # matplotlib only when drawing: write_outputs keeps the table when it is missing or fails
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    moved = [r["bytes_up"] + r["bytes_down"] for r in rows]
    floor = min([m for m in moved if m > 0] or [1.0]) / 10
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, metric, title in ((axes[0], "linear_accuracy", "linear probe"),
                              (axes[1], "finetune_accuracy", "fine-tuning")):
        for r, m in zip(rows, moved):
            if f"{metric}_mean" not in r:
                continue
            x = m if m > 0 else floor
            ax.errorbar(x, r[f"{metric}_mean"], yerr=r[f"{metric}_std"], fmt="o", capsize=3, label=r["name"])
            ax.annotate(r["name"] + (" (0 B)" if m == 0 else ""), (x, r[f"{metric}_mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes moved (up + down, all sites and rounds; log)")
        ax.set_title(f"{title} accuracy vs bytes")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label_efficiency_plot(rows: list[dict], path: str) -> str:
    """Accuracy and AUC against the labelled fraction (log x): the linear probe (left) and the
    row's label-trained method (right), one line per row, its 95% interval as a band."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    try:
        for col, (methods, title) in enumerate(((("linear",), "linear probe"),
                                                (("finetune", "finetune_only", "supervised"),
                                                 "fine-tuning / trained on the labels alone"))):
            for i, r in enumerate(rows):
                for method in methods:
                    pts = sorted((e["fraction"], e) for e in r.get("label_efficiency", []) if e["method"] == method)
                    if not pts:
                        continue
                    xs = [f for f, _ in pts]
                    for ax, metric in ((axes[0, col], "accuracy"), (axes[1, col], "auc")):
                        line, = ax.plot(xs, [e[metric] for _, e in pts], marker="o", color=f"C{i % 10}",
                                        ls="-" if method in ("linear", "finetune") else "--",
                                        label=r["name"] if method in ("linear", "finetune") else f"{r['name']} ({method})")
                        bands = [e.get(f"{metric}_ci95") for _, e in pts]
                        if all(b is not None for b in bands):
                            ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands],
                                            color=line.get_color(), alpha=0.12, lw=0)
            axes[0, col].set_title(title + " (95% interval)", fontsize=10)
            for ax, metric in ((axes[0, col], "test accuracy"), (axes[1, col], "test ROC-AUC")):
                ax.set_xscale("log")
                ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
            axes[1, col].set_xlabel("labelled train images (fraction, log)")
            axes[0, col].legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def write_outputs(config, workdir, agg, target, note="", wall_s=None, changed: dict | None = None,
                  skipped: dict | None = None) -> None:
    """comparison.json, .md and .png, label_efficiency.png; `changed`, `skipped` as table_md's."""
    pairs = paired_differences(config, workdir, [r["name"] for r in agg], int(config.compare.seeds))
    out = {"rows": agg, "target_image_views": target, "quick": bool(config.get("quick", False)),
           "wall_s": None if wall_s is None else round(wall_s, 1), "paired_differences": pairs,
           "changed_rows": changed or {}, "skipped_rows": skipped or {}, "config": config.to_dict()}
    write_json(os.path.join(workdir, "comparison.json"), out)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table_md(agg, config, target, note, changed, skipped)
                + "\n".join(paired_md(pairs) + label_efficiency_md(agg) + [""]))
    for name, draw in (("comparison.png", plot), ("label_efficiency.png", label_efficiency_plot)):
        if name == "label_efficiency.png" and not any(r.get("label_efficiency") for r in agg):
            continue
        try:
            draw(agg, os.path.join(workdir, name))
        except Exception as e:  # noqa: BLE001 (the tables must survive a plotting failure)
            print(f"[compare] {name} not drawn: {type(e).__name__}: {e}")


def ablation_md(key: str, rows: list[dict]) -> str:
    """One table row per sweep value and protocol."""
    lines = [f"# Ablation over {key}", "",
             f"| {key} | row | linear acc | fine-tune acc | kNN acc | MiB moved | image-views |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[key]} | {r['name']} | {_pm(r, 'linear_accuracy')} | {_pm(r, 'finetune_accuracy')} | "
                     f"{_pm(r, 'knn_accuracy')} | {_mib(r['bytes_up'] + r['bytes_down'])} | "
                     f"{r['image_views']:.0f} |")
    return "\n".join(lines) + "\n"


def write_ablation(workdir: str, key: str, rows: list[dict]) -> None:
    write_json(os.path.join(workdir, "ablation.json"), {"sweep": key, "rows": rows})
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(ablation_md(key, rows))
