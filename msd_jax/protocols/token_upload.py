"""Token upload (the paper's protocol): the server trains on the union of the uploaded shards."""
from __future__ import annotations

import numpy as np

from msd_jax import trust
from msd_jax.encryption import encrypt, shards
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.training import train
from msd_jax.protocols import pretrained
from msd_jax.layout import Workdir
from msd_jax.models import vit


def load_received(config, model: vit.ViTConfig, mode: EncryptionMode, shard_dir: str,
                  fingerprint: str) -> np.ndarray:
    """One shard folder a site sent (or the server's proxy set), verified before training: its
    manifest, head fingerprint and token shape against this server's model and mode, every shard's
    hash and values (shards.load_shards)."""
    n, d = encrypt.token_shape(config.encrypt, model, mode)
    return shards.load_shards(shard_dir, fingerprint, tokens_per_image=n, embed_dim=d)[0]


def load_uploaded_tokens(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir,
                         fingerprint: str) -> np.ndarray:
    """Verified tokens of every site, concatenated (ids are positions in this union)."""
    sites = wd.uploaded_sites()
    if not sites:
        raise trust.InputError(f"{wd.shards_root}: no site shards found (run --mode encrypt at the sites "
                                "and copy each shards/<site>/ folder here)")
    return np.concatenate([load_received(config, model, mode, wd.shards(s), fingerprint) for s in sites])


def train_server(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print, *,
                 num_steps: int | None = None):
    """Trains for `num_steps` steps (default config.train.num_steps); returns the trained teacher's
    parameters {'body', 'heads_0'}."""
    steps = config.train.num_steps if num_steps is None else num_steps
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    tokens = load_uploaded_tokens(config, model, mode, wd, fingerprint)
    state = train.train(config, model, party="server", tokens=tokens,
                        init_params=pretrained.initial_student(config, model),
                        ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"),
                        tensorboard_dir=wd.tensorboard("server"),
                        total_steps=steps, log=log)
    return state.ema_params
