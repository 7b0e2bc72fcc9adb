"""The privacy audit: every attack (msd_jax/experiments/privacy/attacks.py) against every encryption mode
(config.audit.modes), plus each mode's downstream cost, in one command:

  python -m msd_jax.main --config configs/audit.py --workdir DIR

For each mode the project's pipeline runs into DIR/modes/<mode>/ (parties.run_encrypt, run_server,
run_eval: linear-probe accuracy of a backbone trained in that mode), then the attacks run on the
shards the server received. Writes DIR/audit.json, DIR/audit.md (the table) and DIR/audit.png
(originals, and per mode the best reconstruction). See docs/privacy.md for the threat model.

Attacker knowledge, per attack:
  known_head      the public head (head/head.msgpack) and a public look-alike image set (the
                  server's proxy split of Br35H, disjoint from the sites' and the test images);
                  in a secret_head mode the sites' head is withheld, so the attacker uses its best
                  guess: the head the server would have published (same seed, 'head' party key).
  learned         no head; the look-alike set encrypted with the mode's transform under the
                  attacker's own key (the public head where the mode has one), positions known.
  clustering      nothing but the received tokens (the scoring uses the true positions).
  moments         no head; the received tokens and the look-alike set: the clustering's groups,
                  their covariances against the look-alike set's per-position patch covariances
                  give the head up to a rotation that the positions pin down (moments.py).
"""
from __future__ import annotations

import copy
import json
import os
import time

import jax
import numpy as np

from msd_jax.encryption import encrypt, shards
from msd_jax import parties
from msd_jax.training import train
from msd_jax.data import sites as sites_lib
from msd_jax.layout import Workdir
from msd_jax.models import vit
from msd_jax.experiments.privacy import attacks, moments, sweep
from msd_jax.encryption import modes as modes_lib

ATTACKS = ("known_head", "learned", "clustering", "moments")
ATTACKER_KEY_TAG = 0xA77AC3


def _mode_config(config, mode: modes_lib.EncryptionMode, pos_noise_std: float | None = None):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.job = "pipeline"
        c.encrypt.mode = mode.name
        if pos_noise_std is not None:
            c.encrypt.pos_noise_std = float(pos_noise_std)
    return c


def audit_runs(config) -> list[tuple[str, modes_lib.EncryptionMode, float | None]]:
    """(row label, mode, encrypt.pos_noise_std or None) of every pipeline the audit runs: each of
    audit.modes, then audit.sweep_mode at each audit.sweep strength ('MODE@STD')."""
    a = config.audit
    runs = [(m.name, m, None) for m in (modes_lib.EncryptionMode.parse(x.strip(), "config.audit.modes")
                                        for x in a.modes.split(",") if x.strip())]
    values = sweep.sweep_values(a.sweep)
    if values:
        mode = modes_lib.EncryptionMode.parse(a.sweep_mode, "config.audit.sweep_mode")
        if not mode.pos_noise:
            raise ValueError(f"config.audit.sweep_mode: expected a mode with 'pos_noise', got {a.sweep_mode!r}")
        runs += [(f"{mode.name}@{v:g}", mode, v) for v in values]
    return runs


def chance_level(attack: dict) -> float:
    """The position accuracy an attack's own scoring gives a grouping that knows nothing (results
    written before 'chance_level' existed: 1/num_patches)."""
    return attack.get("chance_level", attack["chance"])


def tradeoff(results: dict, baseline_psnr: float) -> list[dict]:
    """Per audited row: downstream linear accuracy against the strongest attack's success: its
    position accuracy over its chance level and its PSNR over the mean-image guess."""
    rows = []
    for label, r in results.items():
        ratios = [v[k] / chance_level(v) for v in r["attacks"].values()
                  for k in ("position_accuracy", "position_accuracy_any_orientation") if v.get(k) is not None]
        gains = [v[k] - baseline_psnr for v in r["attacks"].values()
                 for k in ("psnr_db", "psnr_db_any_orientation") if v.get(k) is not None]
        rows.append({"row": label, "pos_noise_std": r.get("pos_noise_std"),
                     "linear_accuracy": r["linear_accuracy"],
                     "linear_accuracy_ci95": r.get("linear_accuracy_ci95"),
                     "max_position_over_chance": max(ratios) if ratios else None,
                     "max_psnr_over_mean_db": max(gains) if gains else None})
    return rows


def best_reachable(rows: list[dict], a) -> dict | None:
    """The row whose strongest attack does least (position accuracy over chance, then PSNR over the
    mean image) among those within audit.max_accuracy_drop of paper's linear accuracy."""
    paper = next((r["linear_accuracy"] for r in rows if r["row"] == modes_lib.PAPER), None)
    ok = [r for r in rows if paper is None or r["linear_accuracy"] >= paper - a.max_accuracy_drop]
    return min(ok, key=_attack_success) if ok else None


def _attack_success(row: dict) -> tuple:
    """Sort key of a trade-off row, strongest first: its strongest attack's position accuracy over
    chance level, then its PSNR over the mean image (a measure missing counts as worst), then the
    better accuracy."""
    inf = float("inf")
    pos, psnr = row["max_position_over_chance"], row["max_psnr_over_mean_db"]
    return (inf if pos is None else pos, inf if psnr is None else psnr, -row["linear_accuracy"])


def tradeoff_figure(path: str, rows: list[dict], a, marked: str | None = None,
                    marked_label: str = "") -> str:
    """Accuracy (95 % interval bars) against both attack measures; the row `marked` (the
    recommended or best reachable one) ringed and named `marked_label`."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, limit, xlabel in (
            (axes[0], "max_position_over_chance", a.chance_factor, "strongest attack: position accuracy / its chance level"),
            (axes[1], "max_psnr_over_mean_db", a.psnr_margin_db, "strongest attack: PSNR - mean-image PSNR (dB)")):
        for r in rows:
            if r[key] is None:
                continue
            swept = r["pos_noise_std"] is not None
            color = "C0" if swept else "C1"
            ci = r.get("linear_accuracy_ci95")
            if ci is not None:
                ax.errorbar(r[key], r["linear_accuracy"], fmt="none", ecolor=color, elinewidth=0.8, alpha=0.6,
                            yerr=[[r["linear_accuracy"] - ci[0]], [ci[1] - r["linear_accuracy"]]])
            ax.scatter(r[key], r["linear_accuracy"], marker="o" if swept else "s", color=color)
            name = r["row"]
            if r["row"] == marked:
                ax.scatter(r[key], r["linear_accuracy"], s=220, facecolors="none", edgecolors="C3", lw=1.5)
                name += f" ({marked_label})" if marked_label else ""
            ax.annotate(name, (r[key], r["linear_accuracy"]), fontsize=6)
        ax.axvline(limit, color="gray", ls="--", lw=0.8)
        paper = next((r["linear_accuracy"] for r in rows if r["row"] == modes_lib.PAPER), None)
        if paper is not None:
            ax.axhline(paper - a.max_accuracy_drop, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("linear-probe accuracy")
        if key == "max_position_over_chance":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle("privacy / accuracy trade-off (dashed: the audit's rule)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attack_set(cfg, model: vit.ViTConfig, mode: modes_lib.EncryptionMode, wd: Workdir, data, limit: int):
    """What the server received from the first `limit` site images, with the ground truth to score
    against: (tokens [N, k, D] float32, true positions [N, k], original images [N, H, W, C])."""
    e = cfg.encrypt
    keep = mode.upload_keep_ratio(e)
    head, _ = encrypt.site_head(cfg, model, mode, wd.root)
    toks, poss, imgs = [], [], []
    left = limit
    for name, site in data.sites:
        if left <= 0:
            break
        m = min(left, len(site))
        stored, manifest = shards.load_shards(wd.shards(name))
        got = np.asarray(stored[:m], np.float32)
        pos = encrypt.token_positions(encrypt.site_key(e.key_source, cfg.seed, name), m,
                                      model.num_patches, keep)
        # the ground truth must describe these very tokens: recompute two images' tokens from the
        # site's head and the positions, in the shard dtype, and compare
        plain = np.asarray(encrypt.plain_tokens(head, model, site.images[:2], cfg.data.mean, cfg.data.std))
        key = encrypt.site_key(e.key_source, cfg.seed, name)
        scale = encrypt.position_noise_scale(head, mode.position_noise_std(e))
        plain = plain + scale * np.stack([np.asarray(encrypt.image_noise(jax.random.fold_in(key, i), plain.shape[1:]))
                                          for i in range(len(plain))])
        want = np.take_along_axis(plain, pos[:2, :, None], axis=1)
        want = np.asarray(want.astype(shards.DTYPES[manifest["dtype"]]), np.float32)
        # with noise the sum's float32 rounding may differ by one bfloat16 step; a wrong position
        # differs by far more
        same = np.array_equal(want, got[:2]) if scale == 0 else np.allclose(want, got[:2], rtol=2 ** -6, atol=1e-3 * scale)
        if not same:
            raise RuntimeError(f"{wd.shards(name)}: the shards do not match a re-encryption of their "
                               "first images (the audit needs config.encrypt.key_source='seed')")
        toks.append(got)
        poss.append(pos)
        imgs.append(site.images[:m])
        left -= m
    return np.concatenate(toks), np.concatenate(poss), np.concatenate(imgs)


def _attacker_heads(cfg, model: vit.ViTConfig, mode: modes_lib.EncryptionMode, wd: Workdir):
    """(the head the known-head attacker uses, its description, the attacker's transform for the
    learned attack)."""
    public_key = train.party_key(cfg.seed, "head")
    if os.path.isfile(os.path.join(wd.head, encrypt.HEAD_FILE)):
        public, _ = encrypt.load_head(wd.head, model)
        what = "the public head (head/head.msgpack)"
    else:
        public = jax.device_get(vit.init_head(model, public_key))
        what = "a guess: the head the server would publish (the sites' head is secret)"
    attacker_key = jax.random.fold_in(jax.random.key(cfg.seed), ATTACKER_KEY_TAG)
    own = encrypt.transform_head(mode, model, public, attacker_key)
    return public, what, own


def _canon(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _reusable_report(cfg, wd: Workdir):
    """A finished pipeline run of this very config in wd (report.json, backbone and shards), or None."""
    if not os.path.isfile(wd.report) or not os.path.isdir(wd.backbone):
        return None
    with open(wd.report) as f:
        report = json.load(f)
    mine = {k: v for k, v in cfg.to_dict().items() if k not in ("audit", "job")}
    theirs = {k: v for k, v in report.get("config", {}).items() if k not in ("audit", "job")}
    return report if _canon(json.loads(_canon(mine))) == _canon(theirs) else None


# the audit settings that change a mode's attack results (the others choose rows or judge them)
_ATTACK_SETTINGS = ("attack_images", "public_images", "kmeans_iters", "ridge", "noise_var", "num_figure_images")


def _attacks_path(wd: Workdir, ext: str = "json") -> str:
    return os.path.join(wd.root, f"audit_attacks.{ext}")


def _attacks_key(cfg) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("audit", "job")}
    d["audit"] = {k: cfg.audit[k] for k in _ATTACK_SETTINGS}
    return _canon(json.loads(_canon(d)))


def _save_attacks(cfg, wd: Workdir, row: dict) -> dict:
    """Keeps a mode's attack results beside its pipeline run, so that an interrupted audit run
    again with audit.reuse repeats neither. Returns the numbers as written (plain JSON types)."""
    np.savez(_attacks_path(wd, "tmp.npz"), originals=row["originals"], reconstructions=row["reconstructions"])
    os.replace(_attacks_path(wd, "tmp.npz"), _attacks_path(wd, "npz"))
    numbers = json.loads(json.dumps({k: row[k] for k in ("attacks", "figure_attack", "mean_image_baseline")},
                                    default=float))
    with open(_attacks_path(wd, "tmp.json"), "w") as f:
        json.dump({"key": _attacks_key(cfg), **numbers}, f, indent=1)
    os.replace(_attacks_path(wd, "tmp.json"), _attacks_path(wd))
    return numbers


def _reusable_attacks(cfg, wd: Workdir):
    """The attack results _save_attacks kept for this very config in wd, or None."""
    if not (os.path.isfile(_attacks_path(wd)) and os.path.isfile(_attacks_path(wd, "npz"))):
        return None
    with open(_attacks_path(wd)) as f:
        row = json.load(f)
    if row.get("key") != _attacks_key(cfg):
        return None
    with np.load(_attacks_path(wd, "npz")) as z:
        return {**row, "originals": z["originals"], "reconstructions": z["reconstructions"]}


def attack_mode(cfg, model: vit.ViTConfig, mode: modes_lib.EncryptionMode, wd: Workdir, data,
                public_images: np.ndarray, log=print) -> tuple[dict, dict]:
    """Runs every attack on `mode`'s shards. Returns ({attack: numbers}, {attack: images})."""
    a = cfg.audit
    tokens, positions, originals = _attack_set(cfg, model, mode, wd, data, a.attack_images)
    p, mean, std = model.patch_size, cfg.data.mean, cfg.data.std
    public, what, own = _attacker_heads(cfg, model, mode, wd)
    out, recon = {}, {}
    t0 = time.perf_counter()
    r = attacks.known_head_attack(tokens, public, public_images, patch_size=p, mean=mean, std=std,
                                  ridge=a.ridge, noise_var=a.noise_var)
    out["known_head"] = {**attacks.score(r, positions, originals, model.num_patches),
                         "attacker_head": what}
    recon["known_head"] = r.images
    own_tokens = np.asarray(encrypt.plain_tokens(own, model, public_images, mean, std))
    r = attacks.learned_attack(tokens, own_tokens, public_images, patch_size=p, mean=mean, std=std,
                               ridge=a.ridge)
    out["learned"] = {**attacks.score(r, positions, originals, model.num_patches),
                      "attacker_data": f"{len(public_images)} look-alike images encrypted with the "
                                       "mode's transform under the attacker's key"}
    recon["learned"] = r.images
    r = attacks.cluster_attack(tokens, positions, num_patches=model.num_patches,
                               patch_dim=model.patch_dim,
                               key=jax.random.fold_in(jax.random.key(cfg.seed), 0xC1057), iters=a.kmeans_iters)
    out["clustering"] = attacks.score(r, positions, originals, model.num_patches)
    r = moments.moment_attack(tokens, public_images, patch_size=p, mean=mean, std=std,
                              key=jax.random.fold_in(jax.random.key(cfg.seed), 0xC1057), ridge=a.ridge,
                              kmeans_iters=a.kmeans_iters)
    out["moments"] = {**attacks.score(r, positions, originals, model.num_patches),
                      **attacks.score_any_orientation(r, positions, originals, model.grid)}
    recon["moments"] = r.images
    log(f"[audit] {mode.name}: attacks on {len(tokens)} images x {tokens.shape[1]} tokens in "
        f"{time.perf_counter() - t0:.1f}s: " + ", ".join(
            f"{k} pos {_fmt(v['position_accuracy'])}" + (f" psnr {v['psnr_db']:.1f}" if v['psnr_db'] is not None else "")
            for k, v in out.items()))
    return out, {"originals": originals, **recon}


def recommend(results: dict, baseline_psnr: float, a) -> tuple:
    """(recommended mode or None, note, {mode: [reasons it fails the rule]}). Of the modes that meet
    the rule, the strongest: least position accuracy over chance level, then least PSNR."""
    paper = results.get("paper", {}).get("linear_accuracy")
    failures = {}
    for mode, r in results.items():
        why = []
        for name, v in r["attacks"].items():
            for suffix in ("", "_any_orientation"):
                acc, psnr = v.get("position_accuracy" + suffix), v.get("psnr_db" + suffix)
                if acc is not None and acc > a.chance_factor * chance_level(v):
                    why.append(f"{name}: position accuracy{suffix} {acc:.3f} > "
                               f"{a.chance_factor:g} x chance level {chance_level(v):.4f}")
                if psnr is not None and psnr > baseline_psnr + a.psnr_margin_db:
                    why.append(f"{name}: PSNR{suffix} {psnr:.2f} dB > mean-image guess {baseline_psnr:.2f} dB"
                               + (f" + {a.psnr_margin_db:g}" if a.psnr_margin_db else ""))
        if paper is not None and r["linear_accuracy"] < paper - a.max_accuracy_drop:
            why.append(f"linear accuracy {r['linear_accuracy']:.3f} < paper {paper:.3f} - "
                       f"{a.max_accuracy_drop:g}")
        failures[mode] = why
    ok = [m for m in results if not failures[m]]
    if ok:
        best = min(tradeoff({m: results[m] for m in ok}, baseline_psnr), key=_attack_success)["row"]
        return best, (f"{best}: every attack near chance (position accuracy <= {a.chance_factor:g} x "
                      f"its chance level, PSNR <= mean-image guess) at a linear-probe cost <= "
                      f"{a.max_accuracy_drop:g} against paper"), failures
    # The row the trade-off names best reachable; with none within the cost limit, the row that
    # fails fewest parts of the rule, ties going to the weaker attack.
    rows = {r["row"]: r for r in tradeoff(results, baseline_psnr)}
    reachable = best_reachable(list(rows.values()), a)
    closest = reachable["row"] if reachable else min(
        results, key=lambda m: (len(failures[m]), _attack_success(rows[m])))
    return None, ("no mode meets the rule (every attack near chance at a linear-probe cost <= "
                  f"{a.max_accuracy_drop:g} against paper); closest: {closest}, which fails on: "
                  + "; ".join(failures[closest])), failures


def _interval(ci) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table_md(report: dict) -> str:
    lines = ["| mode | linear acc [95 %] | vs paper | kNN acc | attack | position acc | chance level | PSNR (dB) | SSIM |",
             "|---|---|---|---|---|---|---|---|---|"]
    paper = report["modes"].get("paper", {}).get("linear_accuracy")
    for mode, r in report["modes"].items():
        first = True
        for name, v in r["attacks"].items():
            delta = None if paper is None else r["linear_accuracy"] - paper
            ci = r.get("linear_accuracy_ci95")
            acc = _fmt(r["linear_accuracy"]) + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")
            cells = [mode, acc, _fmt(delta, "+.3f"), _fmt(r.get("knn_accuracy"))] \
                if first else ["", "", "", ""]
            lines.append("| " + " | ".join(cells + [name, _fmt(v["position_accuracy"]), _fmt(chance_level(v), ".4f"),
                                                    _fmt(v["psnr_db"], ".2f"), _fmt(v["ssim"])]) + " |")
            first = False
    b = report["mean_image_baseline"]
    lines += ["", f"No tokens (the public mean image for every image): PSNR {b['psnr_db']:.2f} dB, "
                  f"SSIM {b['ssim']:.3f}.",
              f"Recommended: **{report['recommended']}**. {report['recommendation_note']}",
              f"Attacked: {report['attacked_images']} site images per mode; look-alike set: "
              f"{report['public_images']} images; wall time {report['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def figure(path: str, images: dict, labels: dict, num: int) -> str:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = ["original"] + list(labels)
    num = min(num, len(images["original"]))
    fig, axes = plt.subplots(len(rows), num, figsize=(1.3 * num + 1.6, 1.3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(num):
            ax = axes[i, j]
            img = images[row][j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(labels.get(row, row), fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_audit(config, workdir: str, log=print) -> dict:
    t_start = time.perf_counter()
    if "audit" not in config:
        raise ValueError("config.audit: missing (start the config from msd_jax.config.base_config())")
    a = config.audit
    runs = audit_runs(config)
    names = [label for label, _, _ in runs]
    if modes_lib.PAPER not in names:
        raise ValueError(f"config.audit.modes: expected 'paper' among {names} (the reference for "
                         "the downstream cost)")
    if config.encrypt.key_source != "seed":
        raise ValueError("config.encrypt.key_source: the audit needs 'seed' (it recomputes every "
                         "token's true position to score the attacks)")
    os.makedirs(workdir, exist_ok=True)
    data = sites_lib.load(config)
    if data.proxy is None or len(data.proxy) == 0:
        raise ValueError("config.data.proxy_fraction: the audit's attacker needs a look-alike set "
                         "(the server's proxy split); expected > 0")
    public = data.proxy.images[:a.public_images] if a.public_images else data.proxy.images
    model = vit.ViTConfig.from_config(config.model)  # the same model in every mode
    results, figures = {}, {}
    baseline = None
    for label, mode, noise in runs:
        cfg = _mode_config(config, mode, noise)
        wd = Workdir(os.path.join(workdir, "modes", label))
        log(f"[audit] === {label} ===")
        t0 = time.perf_counter()
        report = _reusable_report(cfg, wd) if a.reuse else None
        reused = report is not None
        if not reused:
            for ext in ("json", "npz"):  # the attacks of an earlier run of this folder
                if os.path.isfile(_attacks_path(wd, ext)):
                    os.remove(_attacks_path(wd, ext))
            parties.run_encrypt(cfg, model, mode, wd, data, log=log)
            if cfg.protocol == "model_upload":
                parties.run_sites(cfg, model, mode, wd, wd.uploaded_sites(), log=log)
            parties.run_server(cfg, model, mode, wd, log=log)
            report = parties.run_eval(cfg, model, mode, wd, data, log=log)
        else:
            log(f"[audit] {label}: reusing {wd.report} (same config; config.audit.reuse=True)")
        t_pipe = time.perf_counter() - t0
        row = _reusable_attacks(cfg, wd) if reused else None
        if row is None:
            att, imgs = attack_mode(cfg, model, mode, wd, data, public, log=log)
            with_images = [k for k in att if att[k]["psnr_db"] is not None]
            best = max(with_images, key=lambda k: att[k]["psnr_db"])
            row = {"attacks": att, "figure_attack": best,
                   "mean_image_baseline": attacks.mean_image_baseline(imgs["originals"], public),
                   "originals": imgs["originals"][:a.num_figure_images],
                   "reconstructions": imgs[best][:a.num_figure_images]}
            row.update(_save_attacks(cfg, wd, row))
        else:
            log(f"[audit] {label}: reusing the attacks in {_attacks_path(wd)} (same config)")
        att, best = row["attacks"], row["figure_attack"]
        if baseline is None:
            baseline = row["mean_image_baseline"]
            figures["original"] = row["originals"]
        figures[label] = row["reconstructions"]
        results[label] = {
            "mode": mode.name,
            "pos_noise_std": None if noise is None else float(noise),
            "linear_accuracy": float(report["eval"]["linear"]["accuracy"]),
            "linear_accuracy_ci95": _interval(report["eval"]["linear"].get("accuracy_ci95")),
            "knn_accuracy": float(report["eval"]["knn"]["accuracy"]),
            "linear_auc": float(report["eval"]["linear"]["auc"]),
            "attacks": att,
            "figure_attack": best,
            "tokens_per_image": int(shards.read_manifest(wd.shards(data.sites[0][0]))["tokens_per_image"]),
            "pipeline_seconds": round(t_pipe, 1),
            "pipeline_timing_s": report.get("timing_s", {}),
        }
    rec, note, failures = recommend(results, baseline["psnr_db"], a)
    for m in results:
        results[m]["rule_failures"] = failures[m]
    out = {
        "modes": results,
        "recommended": rec,
        "recommendation_note": note,
        "mean_image_psnr_db": baseline["psnr_db"],
        "mean_image_baseline": baseline,
        "rule": {"chance_factor": a.chance_factor,
                 "chance_level": "1/num_patches; for an attack scored by an oracle matching (clustering), "
                                 "the same matching of a random grouping (its null_accuracy) where higher",
                 "psnr_margin_db": a.psnr_margin_db,
                 "max_accuracy_drop": a.max_accuracy_drop, "reference": "paper"},
        "attacked_images": int(min(a.attack_images, sum(len(s) for _, s in data.sites))),
        "public_images": int(len(public)),
        "num_patches": model.num_patches, "patch_dim": model.patch_dim,
        "embed_dim": model.embed_dim,
        "protocol": config.protocol,
        "config": config.to_dict(),
    }
    out["tradeoff"] = tradeoff(results, baseline["psnr_db"])
    out["best_reachable"] = best_reachable(out["tradeoff"], a)
    try:
        marked, label = (rec, "recommended") if rec else (
            (out["best_reachable"] or {}).get("row"), "best reachable, fails the rule")
        out["tradeoff_figure"] = tradeoff_figure(os.path.join(workdir, "tradeoff.png"), out["tradeoff"], a,
                                                 marked, label)
    except Exception as e:  # noqa: BLE001 (the numbers must survive a plotting failure)
        log(f"[audit] trade-off figure not drawn: {type(e).__name__}: {e}")
    out["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(workdir, "audit.md"), "w") as f:
        f.write(table_md(out))
    labels = {m: f"{m}\n({results[m]['figure_attack']})" for m in results}
    try:
        out["figure"] = figure(os.path.join(workdir, "audit.png"), figures, labels, a.num_figure_images)
    except Exception as e:  # noqa: BLE001 (the numbers must survive a plotting failure)
        log(f"[audit] figure not drawn: {type(e).__name__}: {e}")
    with open(os.path.join(workdir, "audit.json.tmp"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    os.replace(os.path.join(workdir, "audit.json.tmp"), os.path.join(workdir, "audit.json"))
    log(table_md(out))
    log(os.path.join(workdir, "audit.json"))
    return out
