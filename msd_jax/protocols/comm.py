"""Communication accounting, measured on the files a protocol actually writes and moves.

Every record is {"round", "site", "direction": "up" | "down", "what", "bytes"}, with bytes the size on
disk of what is sent (shards in their stored dtype plus manifest, the head, msgpack models plus
their JSON description, raw uint8 images). `totals` sums them.
"""
from __future__ import annotations

import os

import numpy as np

from msd_jax.encryption import encrypt, shards
from msd_jax.protocols import model_io
from msd_jax.layout import Workdir

RAW_FILE = "images.npy"


def dir_bytes(path: str) -> int:
    """Bytes of every regular file under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def head_bytes(wd: Workdir) -> int:
    """The head a site downloads before the round: its params and its description."""
    return sum(os.path.getsize(os.path.join(wd.head, f)) for f in (encrypt.HEAD_FILE, encrypt.HEAD_META)
               if os.path.isfile(os.path.join(wd.head, f)))  # a secret mode sends no head file


def _rec(r, site, direction, what, nbytes):
    return {"round": r, "site": site, "direction": direction, "what": what, "bytes": int(nbytes)}


def token_upload_traffic(wd: Workdir) -> list[dict]:
    """Token upload: the head down, the shards (and manifest) up, once."""
    hb = head_bytes(wd)
    out = []
    for s in wd.uploaded_sites():
        out += [_rec(0, s, "down", "head", hb), _rec(0, s, "up", "token shards + manifest",
                                                     shards.shard_bytes(wd.shards(s)))]
    return out


def model_upload_traffic(wd: Workdir, merge_data: str) -> list[dict]:
    """Model upload: the head and the initial student down; the site model (and, with
    merge.data='uploaded', the shards) up. The server's own proxy set moves nowhere."""
    hb, ib = head_bytes(wd), model_io.file_bytes(wd.initial)
    out = []
    for s in wd.uploaded_sites():
        out += [_rec(0, s, "down", "head", hb), _rec(0, s, "down", "initial student", ib),
                _rec(0, s, "up", "site model", model_io.file_bytes(wd.upload(s)))]
        if merge_data == "uploaded":
            out.append(_rec(0, s, "up", "token shards + manifest", shards.shard_bytes(wd.shards(s))))
    return out


def local_only_traffic(wd: Workdir) -> list[dict]:
    """Local-only training: each site only receives the head (and the common initial student)."""
    hb = head_bytes(wd)
    ib = model_io.file_bytes(wd.initial) if os.path.isfile(os.path.join(wd.initial, model_io.META_FILE)) else 0
    out = []
    for s in wd.uploaded_sites():
        out.append(_rec(0, s, "down", "head", hb))
        if ib:
            out.append(_rec(0, s, "down", "initial student", ib))
    return out


def fedavg_traffic(wd: Workdir, round_records: list[dict]) -> list[dict]:
    """FedAvg: the head down once, then the per-round records of `fedavg.run_fedavg`."""
    hb = head_bytes(wd)
    return [_rec(0, s, "down", "head", hb) for s in wd.uploaded_sites()] + list(round_records)


def write_raw_images(out_dir: str, site: str, images: np.ndarray) -> str:
    """What pooling raw images moves: the site's images as uint8 [N, H, W, C] .npy (8 bits per pixel,
    the precision of the source JPEGs). Returns the file's path."""
    d = os.path.join(out_dir, site)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, RAW_FILE)
    arr = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    np.save(path + ".tmp.npy", arr, allow_pickle=False)
    os.replace(path + ".tmp.npy", path)
    return path


def raw_upload_traffic(raw_dir: str, sites: list[str], labels: bool = False,
                       label_counts: dict | None = None) -> list[dict]:
    """Pooling: every site's raw image file up (plus one int32 label per image when `labels`)."""
    out = []
    for s in sites:
        out.append(_rec(0, s, "up", "raw uint8 images", os.path.getsize(os.path.join(raw_dir, s, RAW_FILE))))
        if labels:
            out.append(_rec(0, s, "up", "int32 labels", 4 * int((label_counts or {})[s])))
    return out


def totals(records: list[dict]) -> dict:
    """{"bytes_up", "bytes_down", "rounds", "per_site": {site: {"up", "down"}}}."""
    per_site: dict = {}
    for r in records:
        if r["direction"] not in ("up", "down"):
            raise ValueError(f"traffic record {r}: direction must be 'up' or 'down'")
        d = per_site.setdefault(r["site"], {"up": 0, "down": 0})
        d[r["direction"]] += int(r["bytes"])
    rounds = len({r["round"] for r in records if r["direction"] == "up"})
    return {"bytes_up": sum(d["up"] for d in per_site.values()),
            "bytes_down": sum(d["down"] for d in per_site.values()),
            "rounds": rounds, "per_site": per_site}
