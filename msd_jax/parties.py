"""One function per party and mode. Each reads and writes only folders of the work directory
(see layout.py), so the parties can run on different machines with those folders copied between."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from msd_jax import distributed
from msd_jax.encryption import encrypt, shards
from msd_jax.training import train
from msd_jax.data import sites as sites_lib
from msd_jax.evaluation import evaluate_with_config, label_efficiency
from msd_jax.evaluation.features import extract_features, parse_kinds
from msd_jax.evaluation.intervals import format_with_ci
from msd_jax.protocols import model_io, model_upload, pretrained, token_upload
from msd_jax.layout import PROXY, Workdir
from msd_jax.models import vit
from msd_jax.encryption.modes import EncryptionMode


RANDOM_INIT = "random init"  # the baseline backbone's name in report tables and label-efficiency rows


def _record(wd: Workdir, phase: str, **fields) -> None:
    """Timing and bytes of a phase, for the report (phases may run on different machines)."""
    if not distributed.is_writer():
        return
    os.makedirs(os.path.join(wd.root, "records"), exist_ok=True)
    with open(os.path.join(wd.root, "records", f"{phase}.json"), "w") as f:
        json.dump(fields, f, indent=1)


def _read_records(wd: Workdir) -> dict:
    root = os.path.join(wd.root, "records")
    if not os.path.isdir(root):
        return {}
    out = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".json"):
            with open(os.path.join(root, name)) as f:
                out[name[:-5]] = json.load(f)
    return out


def _initial_head(config, model: vit.ViTConfig):
    """The head to create when none exists yet: the one init_from gives (None: seeded random)."""
    return pretrained.initial_head(config, model) if config.model.get("init_from", "") else None


def run_setup(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print) -> None:
    """Server, before the round, without images: the public head (head/) and, for model upload,
    the initial student (initial/), for every site. In a secret-head mode the sites derive the head
    from their shared key, so only initial/ is written."""
    note = pretrained.describe(config, model)
    if note:
        log(f"[server] {note}")
    if not mode.secret_head:
        _, fingerprint = encrypt.get_or_create_head(wd.head, model, train.party_key(config.seed, "head"),
                                                    _initial_head(config, model))
        log(f"[server] head in {wd.head} (fingerprint {fingerprint[:16]}): send it to every site")
    if config.protocol == "model_upload":
        nbytes = model_upload.send_initial(config, model, wd)
        log(f"[server] initial student in {wd.initial} ({nbytes / 2**20:.2f} MiB): send it to every site")


def run_encrypt(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir,
                data: sites_lib.FederatedData, log=print) -> None:
    """Sites (and, for model upload with a proxy set, the server): head -> permutation -> shards.
    Creates the head from the seed the first time (the server's job before the round)."""
    t0 = time.perf_counter()
    # the encryption mode's head (public, or from the sites' shared key: see encrypt.site_head)
    head_params, fingerprint = encrypt.site_head(config, model, mode, wd.root,
                                                 train.party_key(config.seed, "head"),
                                                 _initial_head(config, model))
    if mode.secret_transform:  # the server gets only the fingerprint
        encrypt.write_transform(wd.head, model, mode, fingerprint)
    e = config.encrypt
    todo = list(data.sites)
    if config.protocol == "model_upload" and config.merge.data == "proxy" and data.proxy is not None:
        todo.append((PROXY, data.proxy))
    for name, images in todo:
        if len(images) == 0:
            raise ValueError(f"site {name!r}: no images to encrypt")
        s0 = time.perf_counter()
        tokens = encrypt.encrypt_images(head_params, model, images.images,
                                        encrypt.site_key(e.key_source, config.seed, name),
                                        keep_ratio=mode.upload_keep_ratio(e), mean=config.data.mean,
                                        std=config.data.std, batch_size=e.batch_size,
                                        pos_noise_std=mode.position_noise_std(e))
        extra = {"encrypt_mode": mode.name}
        if mode.pos_noise:
            extra["pos_noise_std"] = mode.position_noise_std(e)
        manifest = shards.write_shards(wd.shards(name), name, tokens, dtype=e.dtype,
                                       head_fingerprint=fingerprint, shard_size=e.shard_size,
                                       extra=extra)
        dt = time.perf_counter() - s0
        log(f"[{name}] encrypted {len(tokens)} images -> {manifest['tokens_per_image']} tokens x "
            f"{manifest['embed_dim']} ({e.dtype}), {shards.shard_bytes(wd.shards(name)) / 2**20:.1f} MiB, "
            f"{len(tokens) / dt:.0f} img/s")
    _record(wd, "encrypt", seconds=time.perf_counter() - t0)


def run_sites(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, site_names: list[str],
              log=print, *, site_steps: int | None = None) -> None:
    """Model upload, at each site: train from the initial student for `site_steps` steps (default
    config.train.site_steps), upload the model."""
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(wd.initial, model_io.META_FILE)):
        model_upload.send_initial(config, model, wd)  # the server's job; done here when running all parties
    for name in site_names:
        nbytes = model_upload.train_site(config, model, mode, wd, name, log=log, site_steps=site_steps)
        log(f"[{name}] uploaded model: {nbytes / 2**20:.2f} MiB")
    _record(wd, "site_training", seconds=time.perf_counter() - t0)


def run_server(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print, *,
               num_steps: int | None = None) -> None:
    """Server: train on uploaded tokens, or merge uploaded models; writes backbone/. `num_steps`:
    the server's steps (default config.train.num_steps for token upload, config.merge.num_steps for
    the merge)."""
    t0 = time.perf_counter()
    head_params = encrypt.server_head(mode, wd.head, model)  # zeros in a secret mode
    if config.protocol == "token_upload":
        teacher = token_upload.train_server(config, model, mode, wd, log=log, num_steps=num_steps)
    else:
        teacher = model_upload.merge(config, model, mode, wd, log=log, num_steps=num_steps)
    model_io.save_backbone(wd.backbone, head_params, teacher["body"], model,
                           protocol=config.protocol, seed=config.seed, encrypt_mode=mode.name,
                           data_mean=config.data.mean, data_std=config.data.std)
    log(f"[server] backbone written to {wd.backbone}")
    _record(wd, "server", seconds=time.perf_counter() - t0)


def _site_traffic(config, wd: Workdir) -> list[dict]:
    head_bytes = sum(os.path.getsize(os.path.join(wd.head, f))  # secret modes: no head file
                     for f in (encrypt.HEAD_FILE, encrypt.HEAD_META) if os.path.isfile(os.path.join(wd.head, f)))
    rows = []
    for site in wd.uploaded_sites():
        manifest = shards.read_manifest(wd.shards(site))
        token_bytes = shards.shard_bytes(wd.shards(site))
        if config.protocol == "token_upload":
            up, down = token_bytes, head_bytes
        else:
            model_bytes = model_io.file_bytes(wd.upload(site)) if os.path.isdir(wd.upload(site)) else 0
            up = model_bytes + (token_bytes if config.merge.data == "uploaded" else 0)
            down = head_bytes + (model_io.file_bytes(wd.initial) if os.path.isdir(wd.initial) else 0)
        rows.append({"name": site, "num_images": manifest["num_images"], "bytes_uploaded": up,
                     "bytes_downloaded": down})
    return rows


def run_eval(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir,
             data: sites_lib.FederatedData, log=print) -> dict:
    """kNN and linear probe of the backbone's frozen features, every kind of config.eval.features
    (and of a random-init backbone with the same head); writes report.json and returns it."""
    t0 = time.perf_counter()
    head_params, body_params, meta = model_io.load_backbone(wd.backbone, model)
    # the eval party plays a site: in a secret mode it applies the sites' head, not the server's
    head_params = encrypt.eval_head(config, model, mode, wd.root, head_params)
    train_set, test_set = data.labelled_train, data.test
    num_classes = len(test_set.class_names)
    ev = config.eval

    kinds = parse_kinds(ev.features)

    def features(body) -> tuple[dict, dict]:
        kw = dict(mean=config.data.mean, std=config.data.std, batch_size=ev.batch_size)
        return (extract_features(head_params, body, model, train_set.images, **kw),
                extract_features(head_params, body, model, test_set.images, **kw))

    def probe(f_train, f_test) -> dict:
        """{feature kind: {'knn': ..., 'linear': ...}} for every configured kind."""
        return {k: evaluate_with_config(config, f_train[k], train_set.labels, f_test[k], test_set.labels,
                                        num_classes)
                for k in kinds}

    f_train, f_test = features(body_params)
    trained = probe(f_train, f_test)
    protocol = meta.get("protocol", config.protocol)
    report = {"protocol": protocol, "sites": _site_traffic(config, wd),
              "features": kinds[0], "eval": trained[kinds[0]], "eval_by_features": trained}
    backbones = {protocol: (f_train[kinds[0]], f_test[kinds[0]])}
    if ev.random_init_baseline:
        b_train, b_test = features(train.init_student_params(config, model)["body"])
        baseline = probe(b_train, b_test)
        report["baseline_random_init"] = baseline[kinds[0]]
        report["baseline_random_init_by_features"] = baseline
        backbones[RANDOM_INIT] = (b_train[kinds[0]], b_test[kinds[0]])
    if ev.per_site:
        report["eval_by_site"] = _eval_by_site(config, data, f_train[kinds[0]], f_test[kinds[0]], log)
    fractions = label_efficiency.parse_fractions(ev.label_fractions)
    label_s = None
    if fractions:
        l0 = time.perf_counter()
        report["label_efficiency"] = {
            "fractions": fractions, "features": kinds[0], "draws": int(ev.label_draws),
            "rows": label_efficiency.run_probes(config, backbones, train_set.labels, test_set.labels,
                                                num_classes, fractions)}
        label_s = round(time.perf_counter() - l0, 2)
    records = _read_records(wd)
    timing = {k: round(v["seconds"], 2) for k, v in records.items() if "seconds" in v}
    if label_s is not None:
        timing["eval_label_efficiency"] = label_s
    timing["eval"] = round(time.perf_counter() - t0, 2)
    report.update(
        timing_s=timing,
        data={"name": config.data.name, "num_labelled_train": len(train_set),
              "num_test": len(test_set), "class_names": list(test_set.class_names)},
        model=model.to_dict(),
        devices={"backend": jax.default_backend(), "count": jax.device_count()},
        config=config.to_dict(),
    )
    metrics = _metrics_files(wd)
    warnings = []
    for path in metrics.values():
        try:
            warnings += train.read_collapse_warnings(path)
        except OSError as e:
            log(f"[eval] could not read {path}: {e}")
    report["collapse_warnings"] = warnings
    if warnings:
        log(f"[eval] COLLAPSE? {len(warnings)} logged step(s) flagged by the collapse monitor: "
            f"{sorted({(w['party'], w['kind']) for w in warnings})}")
    _write_report(wd, report)
    if config.train.tensorboard:
        try:
            _tensorboard_eval(wd, report)
        except Exception as e:  # noqa: BLE001 (the report is written; events are a convenience)
            log(f"[eval] TensorBoard events not written: {type(e).__name__}: {e}")
    # The figures come after the report, so a plotting failure cannot lose it.
    plots = []
    plot_dir = os.path.join(wd.root, "plots")
    try:
        if metrics:
            from msd_jax.evaluation import plots as plots_lib  # noqa: PLC0415 (matplotlib only when plotting)
            plots.append(plots_lib.training_curves(metrics, os.path.join(plot_dir, "training_curves.png")))
    except Exception as e:  # noqa: BLE001
        log(f"[eval] training curves not drawn: {type(e).__name__}: {e}")
    try:
        if len(test_set):
            from msd_jax.evaluation import plots as plots_lib  # noqa: PLC0415
            out = os.path.join(plot_dir, "attention.png")
            plots_lib.attention_maps(head_params, body_params, model, test_set.images[:8], out,
                                     mean=config.data.mean, std=config.data.std, num=8)
            plots.append(out)
    except Exception as e:  # noqa: BLE001
        log(f"[eval] attention maps not drawn: {type(e).__name__}: {e}")
    try:
        if report.get("eval_by_site"):
            from msd_jax.evaluation import plots as plots_lib  # noqa: PLC0415
            plots.append(plots_lib.site_accuracy(
                report["eval_by_site"], report["eval"], report.get("baseline_random_init"),
                os.path.join(plot_dir, "site_accuracy.png"), feature=kinds[0]))
    except Exception as e:  # noqa: BLE001
        log(f"[eval] site accuracy not drawn: {type(e).__name__}: {e}")
    try:
        if report.get("label_efficiency", {}).get("rows"):
            from msd_jax.evaluation import plots as plots_lib  # noqa: PLC0415
            plots.append(plots_lib.label_efficiency(report["label_efficiency"],
                                                    os.path.join(plot_dir, "label_efficiency.png")))
    except Exception as e:  # noqa: BLE001
        log(f"[eval] label efficiency not drawn: {type(e).__name__}: {e}")
    report["plots"] = plots
    _write_report(wd, report)
    return report


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def site_eval_skip_reason(config, images, what: str = "per-site probes need") -> str | None:
    """Why an evaluation fitted on one site's labelled `images` alone would not measure the
    features, or None when it would: it needs two classes among at least
    config.eval.per_site_min_images images. (The kNN clips its k to the images it has, so it needs
    no more than that.) `what` names the evaluation in the reason, with its verb."""
    n, need = len(images), int(config.eval.per_site_min_images)
    classes = [images.class_names[i] for i in np.unique(images.labels)]
    if n >= need and len(classes) >= 2:
        return None
    if n == 0:
        has = "no labelled images"
    elif len(classes) == 1:
        has = f"one class ({classes[0]}) among its {_plural(n, 'image')}"
    else:
        has = f"only {_plural(n, 'image')} ({len(classes)} classes: {', '.join(classes)})"
    return f"{has}; {what} >= 2 classes and >= {need} images (config.eval.per_site_min_images)"


def _eval_by_site(config, data, f_train: np.ndarray, f_test: np.ndarray, log) -> dict:
    """{site: {'num_images', 'knn', 'linear'}}: probes fitted on one site's own labelled images,
    scored on the pooled test split: what each hospital gets with its own labels. A site whose images
    cannot carry a probe (site_eval_skip_reason) gets knn and linear None and 'skipped': the reason.
    `f_train` holds the features of `data.labelled_train`, which is the sites' images in site order."""
    out, start = {}, 0
    for name, images in data.sites:
        f_site, start = f_train[start:start + len(images)], start + len(images)
        reason = site_eval_skip_reason(config, images)
        if reason is not None:
            log(f"[eval] site {name!r}: no per-site probes: {reason}")
            out[name] = {"num_images": len(images), "knn": None, "linear": None, "skipped": reason}
            continue
        r = evaluate_with_config(config, f_site, images.labels, f_test, data.test.labels,
                                 len(data.test.class_names))
        out[name] = {"num_images": len(images), **r}
    if start != len(f_train):
        raise ValueError(f"eval_by_site: {len(f_train)} labelled training features for {start} site images")
    return out


def probed_sites(by_site: dict) -> dict:
    """The entries of report['eval_by_site'] that have probe results (not skipped)."""
    return {site: r for site, r in by_site.items() if r.get("knn") is not None}


def _tensorboard_eval(wd: Workdir, report: dict) -> None:
    """The report's accuracies and AUCs as scalars under WORKDIR/tensorboard/eval/ (step 0)."""
    from msd_jax.training.tensorboard import ScalarWriter  # noqa: PLC0415
    with ScalarWriter(wd.tensorboard("eval")) as w:
        w.eval_results(report["eval_by_features"], "eval/")
        w.eval_results(report.get("baseline_random_init_by_features", {}), "eval_random_init/")
        w.eval_results({site: {p: r[p] for p in ("knn", "linear")}
                        for site, r in probed_sites(report.get("eval_by_site", {})).items()},
                       f"eval_by_site_{report['features']}/")


def _metrics_files(wd: Workdir) -> dict[str, str]:
    """{party: path} of every metrics/<party>.jsonl present."""
    root = os.path.join(wd.root, "metrics")
    if not os.path.isdir(root):
        return {}
    return {name[:-len(".jsonl")]: os.path.join(root, name) for name in sorted(os.listdir(root))
            if name.endswith(".jsonl")}


def _write_report(wd: Workdir, report: dict) -> None:
    if not distributed.is_writer():
        return
    with open(wd.report + ".tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(wd.report + ".tmp", wd.report)


def results_table(report: dict) -> str:
    """The report as text: probes of each backbone and feature kind (value [95% interval]), the
    per-site probes, the label-efficiency rows, the traffic and the timing."""
    rows = [("backbone", "features", "kNN acc", "kNN AUC", "linear acc", "linear AUC")]
    for name, key in ((report["protocol"], "eval_by_features"),
                      (RANDOM_INIT, "baseline_random_init_by_features")):
        for kind, r in report.get(key, {}).items():
            rows.append((name, kind, *(format_with_ci(r[p], m) for p in ("knn", "linear")
                                       for m in ("accuracy", "auc"))))
    lines = _aligned(rows)
    lines += _site_lines(report.get("eval_by_site", {}), report["features"])
    lines += _label_efficiency_lines(report.get("label_efficiency"))
    up = sum(s["bytes_uploaded"] for s in report["sites"])
    lines.append(f"sites: {len(report['sites'])}, uploaded {up / 2**20:.2f} MiB in one round; "
                 f"timing (s): {report['timing_s']}")
    return "\n".join(lines)


def _ci_suffix(r: dict) -> str:
    ci = r.get("accuracy_ci95")
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _aligned(rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _label_efficiency_lines(block: dict | None) -> list[str]:
    """The label-efficiency rows: mean over draws ± std, [95% interval of the mean]."""
    if not block or not block.get("rows"):
        return []
    rows = [("backbone", "probe", "fraction", "labelled", "draws", "accuracy (± std)", "AUC (± std)")]
    for r in block["rows"]:
        rows.append((r["backbone"], r["method"], f"{r['fraction']:g}", str(r["num_labelled"]), str(r["draws"]),
                     f"{format_with_ci(r, 'accuracy')} ±{r['accuracy_std']:.3f}",
                     f"{format_with_ci(r, 'auc')} ±{r['auc_std']:.3f}"))
    return [f"label efficiency ({block.get('features', '')} features; probes fitted on stratified, "
            f"nested subsets of the labelled train images; mean over draws [95% interval] ± std "
            f"across draws):"] + ["  " + line for line in _aligned(rows)]


def _site_lines(by_site: dict, feature: str) -> list[str]:
    """One line per site of the probes fitted on its own labels, or why it has none."""
    if not by_site:
        return []
    lines = [f"probes fitted on each site's own labels ({feature} features, pooled test split):"]
    for site, r in by_site.items():
        if r.get("knn") is None:
            lines.append(f"  {site} (n={r['num_images']}): skipped: {r.get('skipped', 'no result')}")
        else:
            lines.append(f"  {site} (n={r['num_images']}): kNN acc {r['knn']['accuracy']:.4f}"
                         f"{_ci_suffix(r['knn'])}, linear acc {r['linear']['accuracy']:.4f}"
                         f"{_ci_suffix(r['linear'])}")
    return lines
