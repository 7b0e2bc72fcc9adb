"""Token upload (the paper's protocol): the server trains on the union of the uploaded shards."""
from __future__ import annotations

import numpy as np

from msd_jax.encryption import encrypt, shards
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.training import train
from msd_jax.layout import Workdir
from msd_jax.models import vit


def load_uploaded_tokens(wd: Workdir, fingerprint: str, sites: list[str]) -> np.ndarray:
    """Verified tokens of every site, concatenated (ids are positions in this union)."""
    if not sites:
        raise FileNotFoundError(f"{wd.shards_root}: no site shards found (run --mode encrypt at the sites "
                                "and copy each shards/<site>/ folder here)")
    parts = [shards.load_shards(wd.shards(s), expected_fingerprint=fingerprint)[0] for s in sites]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise shards.ShardError(f"{wd.shards_root}: sites uploaded tokens of different shapes {shapes} "
                                "(config.encrypt.keep_ratio must be the same at every site)")
    return np.concatenate(parts)


def train_server(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print, *,
                 num_steps: int | None = None):
    """Trains for `num_steps` steps (default config.train.num_steps); returns the trained teacher's
    parameters {'body', 'heads_0'}."""
    steps = config.train.num_steps if num_steps is None else num_steps
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    tokens = load_uploaded_tokens(wd, fingerprint, wd.uploaded_sites())
    state = train.train(config, model, party="server", tokens=tokens,
                        init_params=train.init_student_params(config, model),
                        ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"),
                        tensorboard_dir=wd.tensorboard("server"),
                        total_steps=steps, log=log)
    return state.ema_params
