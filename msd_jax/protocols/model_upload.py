"""Model upload: sites train their own models from one initial student and upload only those; the
server merges them by one-shot distillation on tokens it holds.

Independently trained DINO heads do not share prototype order, so their outputs are never averaged.
The global student gets one projection head per site teacher over one shared body; head s starts as
site s's head and learns to match site s's centred, sharpened output.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax import trust
from msd_jax.encryption import encrypt
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.training import train
from msd_jax.protocols import model_io, pretrained
from msd_jax.protocols.token_upload import TokenRows, load_process_rows, load_received, uploaded_dirs
from msd_jax.layout import PROXY, Workdir
from msd_jax.models import vit


def send_initial(config, model: vit.ViTConfig, wd: Workdir) -> int:
    """Server: writes the initial student every site starts from; returns its bytes."""
    return model_io.save_params(wd.initial, pretrained.initial_student(config, model), model,
                                role="initial student")


def train_site(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, site: str, log=print, *,
               site_steps: int | None = None) -> int:
    """Site: trains on its own shards from the initial student for `site_steps` steps (default
    config.train.site_steps); writes uploads/<site>/ (the EMA teacher, the site's model) and returns
    the bytes uploaded."""
    steps = config.train.site_steps if site_steps is None else site_steps
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    tokens = load_received(config, model, mode, wd.shards(site), fingerprint)
    template = train.init_student_params(config, model)
    initial, _ = model_io.load_params(wd.initial, template, model)
    state = train.train(config, model, party=site, tokens=tokens, init_params=initial,
                        ckpt_dir=wd.checkpoints(site), metrics_path=wd.metrics(site),
                        tensorboard_dir=wd.tensorboard(site),
                        total_steps=steps, log=log)
    return model_io.save_params(wd.upload(site), state.ema_params, model, site=site,
                                num_images=int(len(tokens)), steps=steps)


def merged_init(site_params: list, initial, how: str):
    """The global student before distillation: one head per site (copied from that site) over a body
    that is either the sites' average or the initial body."""
    if how == "average":
        body = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0),
                                      *[p["body"] for p in site_params])
    else:
        body = initial["body"]
    student = {"body": body}
    for i, p in enumerate(site_params):
        student[f"heads_{i}"] = p["heads_0"]
    return jax.device_get(student)


def distillation_tokens(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir,
                        fingerprint: str, log=print) -> TokenRows:
    """This process's rows of the tokens the server distils on: its proxy set or the uploaded site
    shards."""
    if config.merge.data == "proxy":
        if not os.path.isdir(wd.shards(PROXY)):
            raise trust.InputError(f"{wd.shards(PROXY)}: no proxy shards (config.merge.data='proxy' "
                                    "needs a proxy set encrypted with the same head)")
        dirs = [wd.shards(PROXY)]
    else:
        dirs = uploaded_dirs(wd)
    return load_process_rows(config, model, mode, dirs, fingerprint, "server_merge", log)


def merge(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print, *,
          num_steps: int | None = None):
    """Server: one-shot distillation of the uploaded site models into one student for `num_steps`
    steps (default config.merge.num_steps). Returns the merged student's EMA parameters
    {'body', 'heads_0', ...}."""
    steps = config.merge.num_steps if num_steps is None else num_steps
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    sites = wd.uploaded_models()
    if not sites:
        raise trust.InputError(f"{wd.uploads_root}: no site models uploaded (run --mode site at the sites)")
    template = train.init_student_params(config, model)
    site_params = [model_io.load_params(wd.upload(s), template, model)[0] for s in sites]
    rows = distillation_tokens(config, model, mode, wd, fingerprint, log)
    student = merged_init(site_params, template, config.merge.init)
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *site_params)
    log(f"[server] merging {len(sites)} site models by one-shot distillation on "
        f"{rows.total} {config.merge.data} token sets")
    state = train.train(config, model, party="server_merge", tokens=rows.tokens, row_start=rows.start,
                        num_rows=rows.total, init_params=student,
                        ckpt_dir=wd.checkpoints("server_merge"), metrics_path=wd.metrics("server_merge"),
                        tensorboard_dir=wd.tensorboard("server_merge"),
                        total_steps=steps, num_heads_out=len(sites),
                        site_params=stacked, log=log)
    return state.ema_params
