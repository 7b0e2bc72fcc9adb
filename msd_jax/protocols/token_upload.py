"""Token upload (the paper's protocol): the server trains on the union of the uploaded shards.

The union's rows are the sites' rows concatenated in the order of `Workdir.uploaded_sites`. A
server process loads only the rows it trains on (its row groups, training/batches.py): it reads
every site's manifest, for the row count and the checks, and only the shards holding its rows.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from msd_jax import trust
from msd_jax.encryption import encrypt, shards
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.training import batches, train
from msd_jax.protocols import pretrained
from msd_jax.layout import Workdir
from msd_jax.models import vit


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """The rows [start, start + len(tokens)) of a token set of `total` rows, and what reading them
    took: for each folder read, (folder, its rows [lo, hi), its shards [first, last]); the bytes of
    the shard files read."""
    tokens: np.ndarray
    start: int
    total: int
    reads: tuple
    bytes_read: int

    def describe(self) -> str:
        reads = "; ".join(f"{os.path.basename(d)} rows [{lo}, {hi}) from shards {a}-{b}"
                          for d, (lo, hi), (a, b) in self.reads)
        num_files = sum(b - a + 1 for _, _, (a, b) in self.reads)
        return (f"rows [{self.start}, {self.start + len(self.tokens)}) of {self.total}: {reads or 'none'} "
                f"({num_files} shard files, {self.bytes_read} bytes)")


def load_received(config, model: vit.ViTConfig, mode: EncryptionMode, shard_dir: str,
                  fingerprint: str) -> np.ndarray:
    """One shard folder a site sent (or the server's proxy set), verified before training: its
    manifest, head fingerprint and token shape against this server's model and mode, every shard's
    hash and values (shards.load_shards)."""
    n, d = encrypt.token_shape(config.encrypt, model, mode)
    return shards.load_shards(shard_dir, fingerprint, tokens_per_image=n, embed_dim=d)[0]


def checked_manifests(config, model: vit.ViTConfig, mode: EncryptionMode, shard_dirs: list[str],
                      fingerprint: str) -> list[dict]:
    """Every folder's manifest, checked against this server's head and token shape (no shard read)."""
    n, d = encrypt.token_shape(config.encrypt, model, mode)
    manifests = []
    for shard_dir in shard_dirs:
        manifest = shards.read_manifest(shard_dir)
        shards.check_manifest(shard_dir, manifest, fingerprint, tokens_per_image=n, embed_dim=d)
        manifests.append(manifest)
    return manifests


def load_rows(config, model: vit.ViTConfig, mode: EncryptionMode, shard_dirs: list[str], fingerprint: str,
              rows_of=None) -> TokenRows:
    """The verified rows of the union of `shard_dirs` (concatenated in that order) that
    `rows_of(total) -> (lo, hi)` picks (default: all), read from only the shards holding them."""
    manifests = checked_manifests(config, model, mode, shard_dirs, fingerprint)
    total = sum(m["num_images"] for m in manifests)
    lo, hi = (0, total) if rows_of is None else rows_of(total)
    n, d = encrypt.token_shape(config.encrypt, model, mode)
    parts, reads, nbytes, offset = [], [], 0, 0
    for shard_dir, manifest in zip(shard_dirs, manifests):
        a, b = max(lo - offset, 0), min(hi - offset, manifest["num_images"])
        offset += manifest["num_images"]
        if a >= b:
            continue
        tokens, manifest = shards.load_shards(shard_dir, fingerprint, tokens_per_image=n, embed_dim=d, rows=(a, b))
        read = shards.shards_for_rows(manifest, a, b)
        parts.append(tokens)
        reads.append((shard_dir, (a, b), (read[0], read[-1])))
        nbytes += sum(manifest["shards"][i]["bytes"] for i in read)
    tokens = np.concatenate(parts) if parts else np.zeros((0, n, d), np.float32)
    return TokenRows(tokens, lo, total, tuple(reads), nbytes)


def uploaded_dirs(wd: Workdir) -> list[str]:
    """Every site's shard folder, in the union's order."""
    sites = wd.uploaded_sites()
    if not sites:
        raise trust.InputError(f"{wd.shards_root}: no site shards found (run --mode encrypt at the sites "
                                "and copy each shards/<site>/ folder here)")
    return [wd.shards(s) for s in sites]


def load_uploaded_tokens(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir,
                         fingerprint: str) -> np.ndarray:
    """Verified tokens of every site, concatenated (ids are positions in this union)."""
    return load_rows(config, model, mode, uploaded_dirs(wd), fingerprint).tokens


def process_rows_of(config):
    """total -> the rows [lo, hi) this process trains on (its row groups, training/batches.py)."""
    groups = train.row_groups(config)
    return lambda total: batches.process_rows(total, groups, jax.process_index(), jax.process_count())


def load_process_rows(config, model: vit.ViTConfig, mode: EncryptionMode, shard_dirs: list[str],
                      fingerprint: str, party: str, log=print) -> TokenRows:
    """This process's rows of the union of `shard_dirs`, logged with what reading them took."""
    rows = load_rows(config, model, mode, shard_dirs, fingerprint, process_rows_of(config))
    log(f"[{party}] process {jax.process_index()} of {jax.process_count()} loads "
        f"{rows.describe()}, {train.row_groups(config)} row groups")
    return rows


def train_server(config, model: vit.ViTConfig, mode: EncryptionMode, wd: Workdir, log=print, *,
                 num_steps: int | None = None):
    """Trains for `num_steps` steps (default config.train.num_steps); returns the trained teacher's
    parameters {'body', 'heads_0'}."""
    steps = config.train.num_steps if num_steps is None else num_steps
    fingerprint = encrypt.expected_fingerprint(mode, wd.head, model)
    rows = load_process_rows(config, model, mode, uploaded_dirs(wd), fingerprint, "server", log)
    state = train.train(config, model, party="server", tokens=rows.tokens, row_start=rows.start,
                        num_rows=rows.total, init_params=pretrained.initial_student(config, model),
                        ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"),
                        tensorboard_dir=wd.tensorboard("server"),
                        total_steps=steps, log=log)
    return state.ema_params
