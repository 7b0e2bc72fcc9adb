"""The rows: each trains one protocol or baseline in its run folder through the project's parties,
FedAvg or the baselines, spending the steps its budget plan gives each party, and returns
(backbones [(name, head, body)], traffic records, extra result fields). `run_row` evaluates the
backbones and writes the row's result.json. A row whose party's output is already on disk (a killed
run) does not train that party again."""
from __future__ import annotations

import copy
import os
import time
from typing import Callable

import numpy as np

from msd_jax import parties
from msd_jax.encryption import encrypt
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.experiments.compare.evaluate import evaluate_row
from msd_jax.experiments.compare.results import RESULT, write_json, write_predictions
from msd_jax.evaluation.finetune import finetune
from msd_jax.experiments.compare.settings import protocol_config
from msd_jax.layout import Workdir
from msd_jax.models import vit
from msd_jax.protocols import centralized, comm, fedavg, model_io, supervised
from msd_jax.training import train


def _head(config, model, mode, wd):
    """The head the sites apply in `mode`: what a backbone is evaluated with."""
    return encrypt.site_head(config, model, mode, wd.root, train.party_key(config.seed, "head"))[0]


def _has_backbone(wd) -> bool:
    return os.path.isfile(os.path.join(wd.backbone, "backbone.json"))


def _backbone(config, model, mode, wd):
    _, body, _ = model_io.load_backbone(wd.backbone, model)
    return [("server", _head(config, model, mode, wd), body)]


def _train_sites(config, model, mode, wd, data, plan, log) -> None:
    """Model upload at every site that has not uploaded yet, each for its planned steps."""
    for name, _ in data.sites:
        if not os.path.isfile(os.path.join(wd.upload(name), model_io.META_FILE)):
            parties.run_sites(config, model, mode, wd, [name], site_steps=plan["steps"][name], log=log)


def _run_token_upload(config, model, mode, wd, data, plan, log):
    cfg = protocol_config(config, "token_upload")
    parties.run_encrypt(cfg, model, mode, wd, data, log=log)
    if not _has_backbone(wd):
        parties.run_server(cfg, model, mode, wd, num_steps=plan["steps"]["server"], log=log)
    return _backbone(cfg, model, mode, wd), comm.token_upload_traffic(wd), {}


def _run_model_upload(config, model, mode, wd, data, plan, log):
    cfg = protocol_config(config, "model_upload")
    parties.run_encrypt(cfg, model, mode, wd, data, log=log)
    _train_sites(cfg, model, mode, wd, data, plan, log)
    if not _has_backbone(wd):
        parties.run_server(cfg, model, mode, wd, num_steps=plan["steps"]["merge"], log=log)
    return _backbone(cfg, model, mode, wd), comm.model_upload_traffic(wd, cfg.merge.data), {}


def _run_local_only(config, model, mode, wd, data, plan, log):
    # no merge, so no proxy set to encrypt
    cfg = protocol_config(config, "model_upload", merge_data="uploaded")
    parties.run_encrypt(cfg, model, mode, wd, data, log=log)
    _train_sites(cfg, model, mode, wd, data, plan, log)
    head = _head(cfg, model, mode, wd)
    template = train.init_student_params(cfg, model)
    backbones = [(name, head, model_io.load_params(wd.upload(name), template, model)[0]["body"])
                 for name, _ in data.sites]
    return backbones, comm.local_only_traffic(wd), {"finetune_sets": [[(n, s)] for n, s in data.sites]}


def _run_fedavg(config, model, mode, wd, data, plan, log):
    # the sites encrypt their own images as in token upload, but the shards stay at the site
    cfg = protocol_config(config, "token_upload")
    parties.run_encrypt(cfg, model, mode, wd, data, log=log)
    out = fedavg.run_fedavg(cfg, model, mode, wd, rounds=plan["rounds"], local_steps=plan["local_steps"],
                            log=log)
    return ([("global", _head(cfg, model, mode, wd), out["teacher"]["body"])],
            comm.fedavg_traffic(wd, out["traffic"]),
            {"fedavg_round_steps": out["round_steps"]})


def _pooled_raw(wd, data) -> str:
    """The sites' raw images as uploaded to a central server (written once per run folder)."""
    raw = os.path.join(wd.root, "raw_uploads")
    for name, s in data.sites:
        if not os.path.isfile(os.path.join(raw, name, comm.RAW_FILE)):
            comm.write_raw_images(raw, name, s.images)
    return raw


def _centralized_runner(train_fn: Callable) -> Callable:
    def run(config, model, mode, wd, data, plan, log):
        raw = _pooled_raw(wd, data)
        out = train_fn(config, model, data.labelled_train.images, total_steps=plan["steps"]["server"],
                       ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"), log=log)
        return ([("server", out["head"], out["body"])], comm.raw_upload_traffic(raw, [n for n, _ in data.sites]),
                {})
    return run


def _run_no_pretraining(config, model, mode, wd, data, plan, log):
    body = train.init_student_params(config, model)["body"]
    return [("random_init", _head(config, model, mode, wd), body)], [], {}


def _run_finetune_only(config, model, mode, wd, data, plan, log):
    """The fine-tuning recipe (evaluation/finetune.py, as every backbone's fine-tune column) started
    from the random-init body with the sites' head: the paper's 'fine-tuning only' baseline. Its
    backbone is the fine-tuned one; per-site fine-tuning starts from the random init."""
    head = _head(config, model, mode, wd)
    body = train.init_student_params(config, model)["body"]
    r = finetune(config, model, head, body, data.labelled_train, data.test, steps=plan["steps"]["finetune"],
                 train_head=bool(config.compare.finetune_train_head), seed=config.seed, log=log)
    tuned_head = {**head, "patch_embed": r["params"]["patch_embed"]} if "patch_embed" in r["params"] else head
    return ([("finetuned", tuned_head, r["params"]["body"])], [],
            {"own_finetune": np.asarray(r["probs"]), "finetune_start": [(head, body)]})


def _run_supervised(config, model, mode, wd, data, plan, log):
    raw = _pooled_raw(wd, data)
    # the batch of the fine-tuning budget (budget.plan_budget), not the pretraining one
    config = copy.deepcopy(config)
    config.train.batch_size = int(plan["batch"]["server"])
    params = supervised.train_supervised(config, model, data.labelled_train,
                                         total_steps=plan["steps"]["server"], log=log)
    probs = np.asarray(supervised.predict_supervised(config, model, params, data.test.images))
    traffic = comm.raw_upload_traffic(raw, [n for n, _ in data.sites], labels=True,
                                      label_counts={n: len(s) for n, s in data.sites})
    return [("supervised", params["head"], params["body"])], traffic, {"own_finetune": probs}


RUNNERS: dict[str, Callable] = {
    "msd_token_upload": _run_token_upload,
    "msd_model_upload": _run_model_upload,
    "fedavg_msd": _run_fedavg,
    "local_only": _run_local_only,
    "centralized_dino": _centralized_runner(centralized.train_pixel_dino),
    "centralized_msd": _centralized_runner(centralized.train_centralized_msd),
    "no_pretraining": _run_no_pretraining,
    "finetune_only": _run_finetune_only,
    "supervised_scratch": _run_supervised,
}


def run_row(config, row: str, run_dir: str, data, plan: dict, log=print, *,
            changed_settings: dict | None = None) -> dict:
    """Trains and evaluates one row for one seed in `run_dir`; writes run_dir/result.json.
    `changed_settings`: {'section.key': value} that `config` holds in place of the user's (from
    needs.check_rows), recorded in the result."""
    wd = Workdir(run_dir)
    os.makedirs(wd.root, exist_ok=True)
    t0 = time.perf_counter()
    # a row's parties run under copies of `config` that change only the protocol, so one model
    # and one mode serve them all
    model = vit.ViTConfig.from_config(config.model)
    mode = EncryptionMode.from_config(config.encrypt)
    backbones, traffic, extra = RUNNERS[row](config, model, mode, wd, data, plan[row], log)
    train_s = time.perf_counter() - t0
    finetune_sets = extra.pop("finetune_sets", None)
    own_finetune, finetune_start = extra.pop("own_finetune", None), extra.pop("finetune_start", None)
    t1 = time.perf_counter()
    ev, probs = evaluate_row(config, row, model, backbones, data, plan[row], log, finetune_sets=finetune_sets,
                             own_finetune=own_finetune, finetune_start=finetune_start)
    write_predictions(run_dir, probs, data.test.labels)
    eval_s = time.perf_counter() - t1
    tot = comm.totals(traffic)
    result = {"row": row, "seed": int(config.seed), **ev,
              "bytes_up": tot["bytes_up"], "bytes_down": tot["bytes_down"], "rounds": tot["rounds"],
              "bytes_per_site": tot["per_site"], "traffic": traffic,
              "image_views": plan[row]["image_views"], "optimizer_steps": plan[row]["optimizer_steps"],
              "budget": plan[row], "target_image_views": plan["target_image_views"],
              "wall_s": round(train_s, 2), "eval_s": round(eval_s, 2),
              "site_sizes": {n: len(s) for n, s in data.sites}, **extra}
    if changed_settings:
        result["changed_settings"] = dict(changed_settings)
    write_json(os.path.join(run_dir, RESULT), result)
    return result
