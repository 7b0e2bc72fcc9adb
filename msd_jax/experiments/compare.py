"""The comparison of every protocol and baseline at one compute budget (configs/compare.py).

  python -m msd_jax.main --config configs/compare.py --workdir DIR [--config.quick=True]

For each seed k (config.seed + k changes the partition, the head and every key) and each row it runs
the protocol in DIR/runs/<row>/seed<k>/ through the project's parties (run_encrypt, run_sites,
run_server), FedAvg (protocols/fedavg.py) or the baselines (msd_jax/baselines), evaluates the
backbone with the same code for every row (kNN + linear probe on frozen features, full fine-tuning
with a linear head), and writes DIR/runs/<row>/seed<k>/result.json atomically; a killed run skips the
row-seeds whose result exists. Then DIR/comparison.json, .md and .png.

The budget is counted in student image-views: (msd.num_global + msd.num_local) views x batch x
steps. `plan_budget` splits one budget (compare.budget_steps server steps of token upload) among
every protocol; bytes are measured on the files each protocol writes (protocols/comm.py).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Callable

import numpy as np

ROWS = ("msd_token_upload", "msd_model_upload", "fedavg_msd", "local_only", "centralized_dino",
        "centralized_msd", "no_pretraining", "supervised_scratch")
RESULT = "result.json"


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

def _setting(config, key: str):
    if "compare" not in config:
        raise ValueError("config.compare: missing; start from configs/compare.py")
    if key not in config.compare:
        raise ValueError(f"config.compare.{key}: missing; start from configs/compare.py")
    return config.compare[key]


def parse_rows(value: str) -> list[str]:
    rows = [r.strip() for r in str(value).split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if not rows or bad:
        raise ValueError(f"config.compare.rows: expected a comma-separated list of {list(ROWS)}, "
                         f"got {value!r} (unknown: {bad})")
    return rows


def apply_quick(config):
    """A copy of `config` with config.quick_settings.<section>.<key> applied when config.quick."""
    config = copy.deepcopy(config)
    if config.get("quick", False):
        for section, values in config.quick_settings.items():
            for k, v in values.items():
                if k not in config[section]:
                    raise ValueError(f"config.quick_settings.{section}.{k}: config.{section} has no "
                                     f"key {k!r}")
                config[section][k] = v
    return config


def check_config(config) -> None:
    c = config.compare
    parse_rows(c.rows)
    for key in ("seeds", "budget_steps", "fedavg_rounds", "finetune_steps"):
        if int(c[key]) < 1:
            raise ValueError(f"config.compare.{key}: expected >= 1, got {c[key]}")
    if not 0.0 <= float(c.merge_frac) < 1.0:
        raise ValueError(f"config.compare.merge_frac: expected in [0, 1), got {c.merge_frac}")
    if c.site_split not in ("size", "equal"):
        raise ValueError(f"config.compare.site_split: expected 'size' or 'equal', got {c.site_split!r}")


# --------------------------------------------------------------------------------------------------
# the budget
# --------------------------------------------------------------------------------------------------

def _batch(requested: int, n: int) -> int:
    from msd_jax.training import batches  # noqa: PLC0415
    return batches.batch_size_for(requested, n, 1)


def _split_steps(target_views: float, weights, batches, views_per_image: int) -> list[int]:
    """Steps per party so that party i gets about weights[i] / sum(weights) of `target_views`."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return [max(1, int(round(target_views * wi / (views_per_image * b)))) for wi, b in zip(w, batches)]


def plan_budget(config, site_sizes: list[int], proxy_size: int | None = None,
                site_names: list[str] | None = None) -> dict:
    """Splits one budget of student image-views among every row.

    The budget is that of token upload: V x B x compare.budget_steps, where V = msd.num_global +
    msd.num_local views per image and B the batch. Returns {"target_image_views", "views_per_image",
    row: {"steps": {party: steps}, "batch": {party: batch}, "image_views", "optimizer_steps", "how"}}.
    Whole steps leave a rounding error, reported as "rounding" (image-views minus target).
    `no_pretraining` spends nothing (0 image-views)."""
    m, t, c = config.msd, config.train, config.compare
    V = int(m.num_global + m.num_local)
    B = int(t.batch_size)
    S = int(c.budget_steps)
    n_pool = int(sum(site_sizes))
    if n_pool < 1 or any(n < 1 for n in site_sizes):
        raise ValueError(f"plan_budget: site sizes {site_sizes}: every site needs >= 1 image")
    b_pool = _batch(B, n_pool)
    target = V * b_pool * S
    names = list(site_names) if site_names is not None else [f"site{i}" for i in range(len(site_sizes))]
    if len(names) != len(site_sizes):
        raise ValueError(f"plan_budget: {len(names)} site names for {len(site_sizes)} site sizes")
    b_sites = [_batch(B, n) for n in site_sizes]
    weights = site_sizes if c.site_split == "size" else [1] * len(site_sizes)
    plan: dict = {"target_image_views": target, "views_per_image": V}

    def entry(steps: dict, batch: dict, per_image: int, how: str):
        views = sum(per_image * batch[p] * s for p, s in steps.items())
        return {"steps": steps, "batch": batch, "image_views": int(views),
                "optimizer_steps": int(sum(steps.values())), "rounding": int(views - target), "how": how}

    pooled_how = (f"{S} steps x batch {b_pool} x {V} student views on the pooled "
                  f"{n_pool} images")
    plan["msd_token_upload"] = entry({"server": S}, {"server": b_pool}, V,
                                     "server trains on the uploaded tokens: " + pooled_how)
    plan["centralized_msd"] = entry({"server": S}, {"server": b_pool}, V,
                                    "token views of raw pooled images, patch embedding trained: "
                                    + pooled_how)
    plan["centralized_dino"] = entry({"server": S}, {"server": b_pool}, V,
                                     "DINO pixel multi-crop of raw pooled images: " + pooled_how)
    sup_steps = max(1, int(round(target / b_pool)))
    plan["supervised_scratch"] = entry({"server": sup_steps}, {"server": b_pool}, 1,
                                       f"{sup_steps} supervised steps x batch {b_pool} x 1 view on the "
                                       f"pooled labelled images")
    # model upload: a share of the budget for the one-shot merge, the rest split over the sites
    n_merge = int(proxy_size) if (config.merge.data == "proxy" and proxy_size) else n_pool
    b_merge = _batch(B, n_merge)
    merge_steps = max(1, int(round(float(c.merge_frac) * target / (V * b_merge))))
    site_steps = _split_steps(target - V * b_merge * merge_steps, weights, b_sites, V)
    plan["msd_model_upload"] = entry(
        {**dict(zip(names, site_steps)), "merge": merge_steps}, {**dict(zip(names, b_sites)), "merge": b_merge},
        V, f"site steps {site_steps} ({c.site_split} split) + {merge_steps} merge steps on "
           f"{n_merge} {config.merge.data} token sets, {V} views")
    local_steps = _split_steps(target, weights, b_sites, V)
    plan["local_only"] = entry(dict(zip(names, local_steps)), dict(zip(names, b_sites)), V,
                               f"each site alone, steps {local_steps} ({c.site_split} split), {V} views")
    # FedAvg: every site takes the same local steps in a round; the rounds' steps differ by at most
    # one so that R rounds can spend the budget (R x E alone rounds to a multiple of R)
    R = int(c.fedavg_rounds)
    total = max(R, int(round(target / (V * sum(b_sites)))))
    base, extra = divmod(total, R)
    per_round = [base + 1] * extra + [base] * (R - extra)
    E_txt = f"{base}" if not extra else f"{base}-{base + 1} ({extra} rounds of {base + 1})"
    plan["fedavg_msd"] = entry({n: total for n in names}, dict(zip(names, b_sites)), V,
                               f"{R} rounds x {E_txt} local steps x {len(names)} sites, {V} views")
    plan["fedavg_msd"]["rounds"], plan["fedavg_msd"]["local_steps"] = R, per_round
    plan["no_pretraining"] = {"steps": {}, "batch": {}, "image_views": 0, "optimizer_steps": 0,
                              "rounding": -target, "how": "no pretraining: random-init body, same head"}
    return plan


# --------------------------------------------------------------------------------------------------
# evaluation (the same for every row)
# --------------------------------------------------------------------------------------------------

def evaluate_backbone(config, head, body, data) -> dict:
    """kNN + linear probe on the first feature kind of config.eval.features, fitted on the pooled
    labelled train split and scored on the test split: what parties.run_eval reports as "eval"."""
    from msd_jax.evaluation import evaluate_with_config  # noqa: PLC0415
    from msd_jax.evaluation.features import extract_features, parse_kinds  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    ev = config.eval
    kind = parse_kinds(ev.features)[0]
    model_cfg = vit.ViTConfig.from_config(config.model)
    kw = dict(mean=config.data.mean, std=config.data.std, batch_size=ev.batch_size)
    train_set, test_set = data.labelled_train, data.test
    f_train = extract_features(head, body, model_cfg, train_set.images, **kw)[kind]
    f_test = extract_features(head, body, model_cfg, test_set.images, **kw)[kind]
    return evaluate_with_config(config, f_train, train_set.labels, f_test, test_set.labels,
                                len(test_set.class_names))


def _finetune(config, head, body, train_set, test_set, log) -> dict:
    from msd_jax.evaluation.finetune import finetune_eval  # noqa: PLC0415
    c = config.compare
    r = finetune_eval(config, head, body, train_set, test_set, steps=int(c.finetune_steps),
                      train_head=bool(c.finetune_train_head), seed=config.seed, log=log)
    return {"accuracy": float(r["accuracy"]), "auc": float(r["auc"])}


def _mean_metrics(results: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in results])) for k in ("accuracy", "auc")}


def evaluate_row(config, backbones, data, log, *, finetune_sets=None) -> dict:
    """Probes and fine-tuning of one row. `backbones`: [(name, head, body)]; with several (local
    only) the row reports their mean and keeps each one. `finetune_sets`: per backbone, the labelled
    set its per-site fine-tuning uses (default: every site's set for every backbone)."""
    per = []
    for i, (name, head, body) in enumerate(backbones):
        r = evaluate_backbone(config, head, body, data)
        r["finetune"] = _finetune(config, head, body, data.labelled_train, data.test, log)
        if config.compare.finetune_per_site:
            sets = finetune_sets[i] if finetune_sets else data.sites
            site_r = {s: _finetune(config, head, body, ds, data.test, log) for s, ds in sets}
            r["finetune_per_site"] = {**_mean_metrics(list(site_r.values())), "sites": site_r}
        per.append({"name": name, **r})
    out = {k: _mean_metrics([p[k] for p in per]) for k in ("knn", "linear", "finetune")}
    if config.compare.finetune_per_site:
        out["finetune_per_site"] = _mean_metrics([p["finetune_per_site"] for p in per])
    if len(per) > 1:
        out["per_backbone"] = per
        out["best"] = {k: max(p[k]["accuracy"] for p in per) for k in ("knn", "linear", "finetune")}
    return out


# --------------------------------------------------------------------------------------------------
# the rows: each trains and returns (backbones, traffic records, extra)
# --------------------------------------------------------------------------------------------------

def _row_config(config, **overrides):
    c = copy.deepcopy(config)
    for key, v in overrides.items():
        section, field = key.split(".")
        c[section][field] = v
    return c


def _head(config, wd):
    """The head the sites apply (config.encrypt.mode): what a backbone is evaluated with."""
    from msd_jax.encryption import encrypt  # noqa: PLC0415
    from msd_jax.training import train  # noqa: PLC0415
    return encrypt.site_head(config, wd.root, train.party_key(config.seed, "head"))[0]


def _backbone(config, wd):
    from msd_jax.protocols import model_io  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    _, body, _ = model_io.load_backbone(wd.backbone, vit.ViTConfig.from_config(config.model))
    return [("server", _head(config, wd), body)]


def _run_token_upload(config, wd, data, plan, log):
    from msd_jax import parties  # noqa: PLC0415
    from msd_jax.protocols import comm  # noqa: PLC0415
    cfg = _row_config(config, **{"train.num_steps": plan["steps"]["server"]})
    cfg.protocol = "token_upload"
    parties.run_encrypt(cfg, wd, data, log=log)
    if not os.path.isfile(os.path.join(wd.backbone, "backbone.json")):
        parties.run_server(cfg, wd, log=log)
    return _backbone(cfg, wd), comm.token_upload_traffic(wd), {}


def _run_model_upload(config, wd, data, plan, log):
    from msd_jax import parties  # noqa: PLC0415
    from msd_jax.protocols import comm, model_io  # noqa: PLC0415
    cfg = _row_config(config, **{"merge.num_steps": plan["steps"]["merge"]})
    cfg.protocol = "model_upload"
    parties.run_encrypt(cfg, wd, data, log=log)
    for name, _ in data.sites:
        if not os.path.isfile(os.path.join(wd.upload(name), model_io.META_FILE)):
            parties.run_sites(_row_config(cfg, **{"train.site_steps": plan["steps"][name]}), wd, [name],
                              log=log)
    if not os.path.isfile(os.path.join(wd.backbone, "backbone.json")):
        parties.run_server(cfg, wd, log=log)
    return _backbone(cfg, wd), comm.model_upload_traffic(wd, cfg.merge.data), {}


def _run_local_only(config, wd, data, plan, log):
    from msd_jax import parties  # noqa: PLC0415
    from msd_jax.training import train  # noqa: PLC0415
    from msd_jax.protocols import comm, model_io  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    cfg = _row_config(config, **{"merge.data": "uploaded"})  # no proxy set to encrypt
    cfg.protocol = "model_upload"
    parties.run_encrypt(cfg, wd, data, log=log)
    for name, _ in data.sites:
        if not os.path.isfile(os.path.join(wd.upload(name), model_io.META_FILE)):
            parties.run_sites(_row_config(cfg, **{"train.site_steps": plan["steps"][name]}), wd, [name],
                              log=log)
    head = _head(cfg, wd)
    model_cfg = vit.ViTConfig.from_config(cfg.model)
    template = train.init_student_params(cfg)
    backbones = [(name, head, model_io.load_params(wd.upload(name), template, model_cfg)[0]["body"])
                 for name, _ in data.sites]
    return backbones, comm.local_only_traffic(wd), {"finetune_sets": [[(n, s)] for n, s in data.sites]}


def _run_fedavg(config, wd, data, plan, log):
    from msd_jax import parties  # noqa: PLC0415
    from msd_jax.protocols import comm, fedavg  # noqa: PLC0415
    cfg = copy.deepcopy(config)
    cfg.protocol = "token_upload"  # sites encrypt their own images (the shards stay at the site)
    parties.run_encrypt(cfg, wd, data, log=log)
    out = fedavg.run_fedavg(cfg, wd, rounds=plan["rounds"], local_steps=plan["local_steps"], log=log)
    return ([("global", _head(cfg, wd), out["teacher"]["body"])], comm.fedavg_traffic(wd, out["traffic"]),
            {"fedavg_round_steps": out["round_steps"]})


def _pooled_raw(config, wd, data):
    from msd_jax.protocols import comm  # noqa: PLC0415
    raw = os.path.join(wd.root, "raw_uploads")
    for name, s in data.sites:
        if not os.path.isfile(os.path.join(raw, name, comm.RAW_FILE)):
            comm.write_raw_images(raw, name, s.images)
    return raw


def _run_centralized(which):
    def run(config, wd, data, plan, log):
        from msd_jax.protocols import centralized  # noqa: PLC0415
        from msd_jax.protocols import comm  # noqa: PLC0415
        raw = _pooled_raw(config, wd, data)
        fn = centralized.train_pixel_dino if which == "dino" else centralized.train_centralized_msd
        out = fn(config, data.labelled_train.images, total_steps=plan["steps"]["server"],
                 ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"), log=log)
        return ([("server", out["head"], out["body"])], comm.raw_upload_traffic(raw, [n for n, _ in data.sites]),
                {})
    return run


def _run_no_pretraining(config, wd, data, plan, log):
    from msd_jax.training import train  # noqa: PLC0415
    return [("random_init", _head(config, wd), train.init_student_params(config)["body"])], [], {}


def _run_supervised(config, wd, data, plan, log):
    from msd_jax.protocols import supervised  # noqa: PLC0415
    from msd_jax.evaluation.metrics import accuracy, roc_auc  # noqa: PLC0415
    from msd_jax.protocols import comm  # noqa: PLC0415
    raw = _pooled_raw(config, wd, data)
    params = supervised.train_supervised(config, data.labelled_train, total_steps=plan["steps"]["server"],
                                         log=log)
    probs = np.asarray(supervised.predict_supervised(config, params, data.test.images))
    own = {"accuracy": accuracy(probs, data.test.labels), "auc": roc_auc(probs, data.test.labels)}
    traffic = comm.raw_upload_traffic(raw, [n for n, _ in data.sites], labels=True,
                                      label_counts={n: len(s) for n, s in data.sites})
    return [("supervised", params["head"], params["body"])], traffic, {"own_classifier": own}


RUNNERS: dict[str, Callable] = {
    "msd_token_upload": _run_token_upload,
    "msd_model_upload": _run_model_upload,
    "fedavg_msd": _run_fedavg,
    "local_only": _run_local_only,
    "centralized_dino": _run_centralized("dino"),
    "centralized_msd": _run_centralized("msd"),
    "no_pretraining": _run_no_pretraining,
    "supervised_scratch": _run_supervised,
}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def run_row(config, row: str, run_dir: str, data, plan: dict, log=print) -> dict:
    """Trains and evaluates one row for one seed in `run_dir`; writes run_dir/result.json."""
    from msd_jax.protocols import comm  # noqa: PLC0415
    from msd_jax.layout import Workdir  # noqa: PLC0415
    wd = Workdir(run_dir)
    os.makedirs(wd.root, exist_ok=True)
    t0 = time.perf_counter()
    backbones, traffic, extra = RUNNERS[row](config, wd, data, plan[row], log)
    train_s = time.perf_counter() - t0
    finetune_sets = extra.pop("finetune_sets", None)
    t1 = time.perf_counter()
    ev = evaluate_row(config, backbones, data, log, finetune_sets=finetune_sets)
    if row == "supervised_scratch":
        # 'fine-tuning only': the supervised network is already fine-tuned; its own test predictions
        ev["finetune_of_backbone"] = ev["finetune"]
        ev["finetune"] = extra["own_classifier"]
    eval_s = time.perf_counter() - t1
    tot = comm.totals(traffic)
    result = {"row": row, "seed": int(config.seed), **ev,
              "bytes_up": tot["bytes_up"], "bytes_down": tot["bytes_down"], "rounds": tot["rounds"],
              "bytes_per_site": tot["per_site"], "traffic": traffic,
              "image_views": plan[row]["image_views"], "optimizer_steps": plan[row]["optimizer_steps"],
              "budget": plan[row], "target_image_views": plan["target_image_views"],
              "wall_s": round(train_s, 2), "eval_s": round(eval_s, 2),
              "site_sizes": {n: len(s) for n, s in data.sites}, **extra}
    _write_json(os.path.join(run_dir, RESULT), result)
    return result


# --------------------------------------------------------------------------------------------------
# aggregation, table, figure
# --------------------------------------------------------------------------------------------------

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
            vals = [r[group][metric] for r in rs if group in r]
            if vals:
                row[f"{group}_{metric}_mean"] = float(np.mean(vals))
                row[f"{group}_{metric}_std"] = float(np.std(vals))
        for k in ("bytes_up", "bytes_down", "rounds", "image_views", "optimizer_steps", "wall_s", "eval_s"):
            row[k] = float(np.mean([r[k] for r in rs]))
        row["how"] = rs[0]["budget"]["how"]
        if "best" in rs[0]:
            row["best_linear_accuracy_mean"] = float(np.mean([r["best"]["linear"] for r in rs]))
        rows.append(row)
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _pm(row, key) -> str:
    if f"{key}_mean" not in row:
        return "-"
    return f"{row[key + '_mean']:.3f} ± {row[key + '_std']:.3f}"


def table_md(rows: list[dict], config, target: int, note: str = "") -> str:
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
    out = ["# Comparison at one compute budget", "",
           f"Budget: {target} student image-views per protocol (mean ± std over seeds; std with "
           f"ddof=0). Features: {config.eval.features.split(',')[0]}; fine-tuning "
           f"{config.compare.finetune_steps} steps on the pooled labelled train split (per site: on "
           f"each site's labelled images, mean over sites), scored on the pooled test split.", ""]
    out += lines + ["", "How each protocol spent the budget:", ""]
    out += [f"- **{r['name']}**: {r['how']}." for r in rows]
    out += ["", "`no_pretraining` spends no pretraining compute (random-init body with the fixed head); "
                "`supervised_scratch` counts one view per image per step, so it takes V times the steps; "
                "its fine-tune column is its own classifier's test score (it is trained on the labels). "
                "`local_only` reports the mean over the site models (each evaluated as a backbone; per "
                "site fine-tuning on its own site's labels). Bytes are the sizes of the files each "
                "protocol writes and moves (token shards with manifests, the head, msgpack models, raw "
                "uint8 images), summed over sites and rounds; the final backbone's distribution is not "
                "counted for any row."]
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> str:
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


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------

def _enable_compile_cache(root: str) -> None:
    import jax  # noqa: PLC0415
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run_compare(config, workdir: str, log: Callable[[str], None] = print) -> list[dict]:
    """Runs every row of config.compare.rows for config.compare.seeds seeds (or, with
    config.compare.sweep='section.key=v1,v2,...', the comparison once per value); writes
    comparison.json/.md/.png in `workdir`. Returns the aggregated rows."""
    config = apply_quick(config)
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    if config.compare.sweep:
        return run_sweep(config, workdir, log)
    if config.compare.compile_cache:
        _enable_compile_cache(workdir)
    from msd_jax.data import sites as sites_lib  # noqa: PLC0415
    rows = parse_rows(config.compare.rows)
    results: dict[str, list[dict]] = {r: [] for r in rows}
    target, t_all, missing = None, time.perf_counter(), []
    for k in range(int(config.compare.seeds)):
        cfg = copy.deepcopy(config)
        cfg.seed = int(config.seed) + k
        data = sites_lib.load(cfg)
        plan = plan_budget(cfg, [len(s) for _, s in data.sites],
                           None if data.proxy is None else len(data.proxy), [n for n, _ in data.sites])
        target = plan["target_image_views"]
        for row in rows:
            run_dir = os.path.join(workdir, "runs", row, f"seed{k}")
            path = os.path.join(run_dir, RESULT)
            if os.path.isfile(path):
                with open(path) as f:
                    results[row].append(json.load(f))
                log(f"[compare] {row} seed {k}: result exists, skipped ({path})")
                continue
            if config.compare.report_only:
                missing.append(f"{row}/seed{k}")
                continue
            log(f"[compare] {row} seed {k}: {plan[row]['how']}")
            r = run_row(cfg, row, run_dir, data, plan, log=_quiet(log, cfg))
            results[row].append(r)
            log(f"[compare] {row} seed {k}: linear {r['linear']['accuracy']:.3f} fine-tune "
                f"{r['finetune']['accuracy']:.3f}, {(r['bytes_up'] + r['bytes_down']) / 2**20:.2f} MiB, "
                f"train {r['wall_s']:.0f} s, eval {r['eval_s']:.0f} s")
    agg = aggregate(results)
    note = ("" if config.compare.finetune_per_site else
            "Per-site fine-tuning was off (config.compare.finetune_per_site=False) to fit the budget.")
    if missing:
        note += (f"\n\nReport only (config.compare.report_only=True): no result yet for "
                 f"{', '.join(missing)}; those rows average fewer seeds (see the seeds column).")
    write_outputs(config, workdir, agg, target, note, wall_s=time.perf_counter() - t_all)
    return agg


def _quiet(log, config):
    """The training loops' progress lines only when config.compare.verbose."""
    if config.compare.verbose:
        return log
    return lambda msg: None if ("step " in msg and "ETA" in msg) else log(msg)


def write_outputs(config, workdir, agg, target, note="", wall_s=None) -> None:
    out = {"rows": agg, "target_image_views": target, "quick": bool(config.get("quick", False)),
           "wall_s": None if wall_s is None else round(wall_s, 1), "config": config.to_dict()}
    _write_json(os.path.join(workdir, "comparison.json"), out)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table_md(agg, config, target, note))
    try:
        plot(agg, os.path.join(workdir, "comparison.png"))
    except Exception as e:  # noqa: BLE001 (the table must survive a plotting failure)
        print(f"[compare] comparison.png not drawn: {type(e).__name__}: {e}")


def parse_sweep(value: str, config) -> tuple[str, list]:
    """'section.key=v1,v2' -> ('section.key', [typed values])."""
    if "=" not in value:
        raise ValueError(f"config.compare.sweep: expected 'section.key=v1,v2,...', got {value!r}")
    key, vals = value.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in config or parts[1] not in config[parts[0]]:
        raise ValueError(f"config.compare.sweep: {key!r} is not a config key (section.key)")
    cur = config[parts[0]][parts[1]]
    typ = type(cur)
    out = []
    for v in vals.split(","):
        v = v.strip()
        if typ is bool:
            out.append(v.lower() in ("1", "true", "yes"))
        else:
            out.append(typ(v))
    return key, out


def run_sweep(config, workdir, log) -> list[dict]:
    """The comparison once per value of config.compare.sweep, in DIR/sweep/<key>=<value>/; writes
    DIR/ablation.json and DIR/ablation.md (one table row per value and protocol)."""
    key, values = parse_sweep(config.compare.sweep, config)
    section, field = key.split(".")
    all_rows = []
    for v in values:
        sub = copy.deepcopy(config)
        sub[section][field] = v
        sub.compare.sweep = ""
        sub.quick = False  # quick settings are already applied
        d = os.path.join(workdir, "sweep", f"{key}={v}")
        log(f"[compare] sweep {key}={v} -> {d}")
        for r in run_compare(sub, d, log):
            all_rows.append({key: v, **r})
    _write_json(os.path.join(workdir, "ablation.json"), {"sweep": key, "rows": all_rows})
    lines = [f"# Ablation over {key}", "",
             f"| {key} | row | linear acc | fine-tune acc | kNN acc | MiB moved | image-views |",
             "|---|---|---|---|---|---|---|"]
    for r in all_rows:
        lines.append(f"| {r[key]} | {r['name']} | {_pm(r, 'linear_accuracy')} | {_pm(r, 'finetune_accuracy')} | "
                     f"{_pm(r, 'knn_accuracy')} | {_mib(r['bytes_up'] + r['bytes_down'])} | "
                     f"{r['image_views']:.0f} |")
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return all_rows


def budget_is_fair(plan: dict, tolerance: float = 0.0) -> bool:
    """Every row but no_pretraining within `tolerance` (relative) of the target image-views."""
    t = plan["target_image_views"]
    return all(abs(plan[r]["image_views"] - t) <= tolerance * t + 1e-9 for r in ROWS
               if r != "no_pretraining" and r in plan)

