"""FedAvg-MSD, the many-round baseline: every round each site downloads the global model (student,
EMA teacher and teacher centre), trains `local_steps` MSD steps on its own encrypted tokens with the
same step as every other protocol, and uploads its model; the server averages the site models
weighted by site size.

Every model that travels is written with `model_io.save_params` (flax msgpack + model.json) into
`fedavg/round<r>/global/` (server -> every site) and `fedavg/round<r>/uploads/<site>/` (site ->
server), so `protocols.comm` counts the bytes of real files. The schedules (lr, weight decay, teacher
momentum and temperature) run over the global step (the steps of the earlier rounds + s) of one
budget of all rounds' steps, so FedAvg with one site and one round is plain training. Each site starts every
round with a fresh Adam state (its moments are not sent). A killed run resumes from the last round
whose global model was written (and, inside a round, from each site's Orbax checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax import trust
from msd_jax.encryption import encrypt
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.training import train
from msd_jax.protocols import model_io, pretrained
from msd_jax.protocols.token_upload import load_received
from msd_jax.layout import Workdir
from msd_jax.models import vit
from msd_jax.msd import step as step_lib

ROOT = "fedavg"


def weighted_average(trees: Sequence, weights: Sequence[float]):
    """sum_i w_i tree_i / sum_i w_i, leaf by leaf, accumulated in float64 and cast back to each
    leaf's dtype. `weights` (e.g. site sizes) must be finite and >= 0 with a positive sum."""
    trees = list(trees)
    w = np.asarray(weights, np.float64)
    if not trees or w.shape != (len(trees),):
        raise ValueError(f"weighted_average: {len(trees)} models but weights of shape {w.shape}; "
                         "expected one weight per model")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weighted_average: weights {w.tolist()}: expected finite, >= 0, positive sum")
    w = w / w.sum()
    structs = {str(jax.tree_util.tree_structure(t)) for t in trees}
    if len(structs) > 1:
        raise ValueError("weighted_average: the models have different parameter trees")

    def avg(*xs):
        acc = sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs))
        return acc.astype(np.asarray(xs[0]).dtype)
    return jax.tree_util.tree_map(avg, *trees)


def _round_dir(wd: Workdir, r: int) -> str:
    return os.path.join(wd.root, ROOT, f"round{r:04d}")


def _global_dir(wd: Workdir, r: int) -> str:
    return os.path.join(_round_dir(wd, r), "global")


def _upload_dir(wd: Workdir, r: int, site: str) -> str:
    return os.path.join(_round_dir(wd, r), "uploads", site)


def _template(config, model: vit.ViTConfig):
    init = pretrained.initial_student(config, model)
    return {"student": init, "teacher": init, "center": np.zeros((1, model.out_dim), np.float32)}


def round_steps(rounds: int, local_steps) -> list[int]:
    """Local steps of each round: `local_steps` if an int, else the list itself (length `rounds`)."""
    steps = [int(local_steps)] * int(rounds) if np.ndim(local_steps) == 0 else [int(e) for e in local_steps]
    if rounds < 1 or len(steps) != rounds or min(steps) < 1:
        raise ValueError(f"FedAvg: expected rounds >= 1 and local steps >= 1 for each of them, got "
                         f"rounds={rounds}, local_steps={local_steps}")
    return steps


def run_fedavg(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, *, rounds: int, local_steps,
               keep_rounds: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Runs FedAvg-MSD over the sites whose shards are in `wd` (written by `parties.run_encrypt`;
    in FedAvg they stay at their site). Returns {"teacher": the global teacher {'body', 'heads_0'},
    "student": ..., "traffic": [{"round", "site", "direction", "what", "bytes"}], "sites",
    "site_sizes", "optimizer_steps"}. `local_steps`: one int E for every round, or a list of the
    steps of each round (to spend a budget that R x E cannot hit exactly). Unless `keep_rounds`, a finished round's files are deleted once
    the next global model is written (their sizes are recorded first in fedavg/traffic.json)."""
    steps = round_steps(rounds, local_steps)
    offsets = np.concatenate([[0], np.cumsum(steps)]).astype(int).tolist()
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    sites = wd.uploaded_sites()
    if not sites:
        raise trust.InputError(f"{wd.shards_root}: no site shards (run parties.run_encrypt first)")
    tokens = {s: load_received(config, model, mode, wd.shards(s), fingerprint) for s in sites}
    sizes = [len(tokens[s]) for s in sites]
    total = offsets[-1]
    template = _template(config, model)
    traffic_path = os.path.join(wd.root, ROOT, "traffic.json")
    traffic = []
    if os.path.isfile(traffic_path):
        with open(traffic_path) as f:
            traffic = json.load(f)

    start = 0  # resume: the last round whose global model is on disk
    for r in range(rounds, -1, -1):
        if os.path.isfile(os.path.join(_global_dir(wd, r), model_io.META_FILE)):
            start = r
            break
    else:
        model_io.save_params(_global_dir(wd, 0), template, model, role="fedavg global", round=0)
    traffic = [t for t in traffic if t["round"] < start]
    for r in range(start, rounds):
        gdir = _global_dir(wd, r)
        uploads = []
        for site in sites:
            udir = _upload_dir(wd, r, site)
            if not os.path.isfile(os.path.join(udir, model_io.META_FILE)):
                g, _ = model_io.load_params(gdir, template, model)  # the site's download
                # a fresh optimizer state each round (FedAvg averages the models, not Adam's moments)
                sc = step_lib.StepConfig.from_config(config, tokens[site].shape[1], total, 1,
                                                     config.train.batch_size)
                fresh = step_lib.init_state(g["student"], 1, model.out_dim, sc)
                state = fresh.replace(step=jnp.asarray(offsets[r], jnp.int32),
                                      ema_params=g["teacher"], center=jnp.asarray(g["center"]))
                st = train.train(config, model, party=site, tokens=tokens[site], init_params=g["student"],
                                 ckpt_dir=os.path.join(_round_dir(wd, r), "checkpoints", site),
                                 metrics_path=wd.metrics(f"fedavg_{site}"), total_steps=total,
                                 stop_at=offsets[r + 1], init_state=state, log=log)
                model_io.save_params(udir, {"student": st.params, "teacher": st.ema_params,
                                            "center": np.asarray(st.center)},
                                     model, role="fedavg site model", site=site, round=r)
            uploads.append(model_io.load_params(udir, template, model)[0])  # the server's download
            traffic += [{"round": r, "site": site, "direction": "down", "what": "global model",
                         "bytes": model_io.file_bytes(gdir)},
                        {"round": r, "site": site, "direction": "up", "what": "site model",
                         "bytes": model_io.file_bytes(udir)}]
        new_global = weighted_average(uploads, sizes)
        model_io.save_params(_global_dir(wd, r + 1), new_global, model, role="fedavg global",
                             round=r + 1)
        with open(traffic_path + ".tmp", "w") as f:
            json.dump(traffic, f)
        os.replace(traffic_path + ".tmp", traffic_path)
        if not keep_rounds:
            shutil.rmtree(_round_dir(wd, r), ignore_errors=True)
        log(f"[fedavg] round {r + 1}/{rounds}: averaged {len(sites)} site models (weights {sizes})")
    final, _ = model_io.load_params(_global_dir(wd, rounds), template, model)
    return {"teacher": final["teacher"], "student": final["student"], "center": final["center"],
            "traffic": traffic, "sites": sites, "site_sizes": sizes,
            "optimizer_steps": total * len(sites), "round_steps": steps}
