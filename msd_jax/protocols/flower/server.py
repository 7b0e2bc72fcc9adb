"""The server's side of the round over Flower, without Flower types. `ask` sends one request to
each of some nodes and returns their replies ({node: reply dict}, or {node: exception} for a node
that did not answer); everything else is here:

1. `--mode setup` in the server's work directory (head/, and initial/ for model upload);
2. every site gets the head (or, in a secret mode, nothing: its transform comes back) and, for
   model upload, the initial student, runs its own encryption (and training), and lists its files;
3. the server fetches every file in chunks of at most `chunk_bytes` into `.tmp-` folders, checks
   each file's size and SHA-256 against the listing, then every shard folder as
   `python -m msd_jax.encryption.verify` does;
4. only then are all folders renamed into place (shards/<site>/, uploads/<site>/, head/transform.json).
Any failure (a site dropping out, a bad file) removes the staging folders: the work directory is
left as it was before the round."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from msd_jax.protocols.flower import commands, transfer
from msd_jax.protocols.flower.site import RECEIVED_FILES
from msd_jax.trust import InputError
from msd_jax import layout

Ask = Callable[[dict, float], dict]  # ({node: request}, timeout_s) -> {node: reply or Exception}


@dataclasses.dataclass
class RoundSettings:
    config: str            # the config file argument of msd_jax.main (path[:arg])
    overrides: str         # --config.KEY=VALUE arguments every party adds
    workdir: str           # the server's work directory
    upload: list[str]      # what the sites send: shards (token upload), uploads (model upload)
    chunk_bytes: int
    site_timeout_s: float  # for a site's encryption (and training)
    chunk_timeout_s: float  # for one chunk
    max_upload_bytes: int  # per site

    @classmethod
    def from_run_config(cls, rc) -> "RoundSettings":
        upload = [k.strip() for k in str(rc["upload"]).split(",") if k.strip()]
        bad = [k for k in upload if k not in ("shards", "uploads")] or ([] if upload else ["(empty)"])
        if bad:
            raise ValueError(f"run-config upload: {bad} not understood; expected 'shards', 'uploads' "
                             "or 'shards,uploads'")
        for key in ("chunk-mib", "site-timeout", "chunk-timeout", "max-upload-mib"):
            if not float(rc[key]) > 0:
                raise ValueError(f"run-config {key}: expected > 0, got {rc[key]!r}")
        commands.split_overrides(str(rc["overrides"]))
        if not str(rc["workdir"]) or not str(rc["config"]):
            raise ValueError("run-config workdir and config: expected the server's work directory and "
                             "config file (python -m msd_jax.protocols.flower.launch sets them)")
        return cls(config=str(rc["config"]), overrides=str(rc["overrides"]),
                   workdir=os.path.abspath(str(rc["workdir"])), upload=upload,
                   chunk_bytes=max(1, int(float(rc["chunk-mib"]) * 2**20)),
                   site_timeout_s=float(rc["site-timeout"]), chunk_timeout_s=float(rc["chunk-timeout"]),
                   max_upload_bytes=int(float(rc["max-upload-mib"]) * 2**20))


def files_to_send(workdir: str, upload: list[str]) -> dict[str, bytes]:
    """{'head/head.json': bytes, ...}: the public head when there is one (none in the secret-head
    modes) and, when the sites train, the initial student."""
    out = {}
    folders = ["head"] + (["initial"] if "uploads" in upload else [])
    for folder in folders:
        for name in RECEIVED_FILES[folder]:
            path = os.path.join(workdir, folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[f"{folder}/{name}"] = f.read()
    if "uploads" in upload and not any(k.startswith("initial/") for k in out):
        raise InputError(f"{workdir}/initial: no initial student after --mode setup (upload=uploads "
                         "needs config.protocol='model_upload')")
    return out


def _replies(ask: Ask, requests: dict, timeout: float, names: dict, what: str) -> dict:
    """The replies to `requests`; SiteDropout naming the first site that did not answer."""
    replies = ask(requests, timeout)
    for node in requests:
        reply = replies.get(node)
        if reply is None or isinstance(reply, Exception):
            site = names.get(node, f"node {node}")
            why = f"no reply within {timeout:.0f} s" if reply is None else str(reply)
            raise transfer.SiteDropout(f"site {site} (SuperNode {node}) failed or dropped out during {what}: {why}. "
                                       "Nothing was written to shards/ or uploads/; run the round again "
                                       "when the site is back")
    return replies


def run_round(ask: Ask, nodes: list, s: RoundSettings, log=print) -> dict:
    """The whole round (see the module's docstring); returns the record written to
    records/flower.json (seconds, bytes down and up per site, chunks)."""
    t0 = time.perf_counter()
    overrides = commands.split_overrides(s.overrides)
    commands.run_main(s.config, s.workdir, "setup", overrides, log=log)
    files = files_to_send(s.workdir, s.upload)
    request = {"op": "prepare", "config": s.config, "overrides": s.overrides, "kinds": s.upload}
    log(f"[flower] sending {sorted(files)} ({sum(map(len, files.values()))} bytes) to {len(nodes)} sites")
    replies = _replies(ask, {n: {"request": request, "files": files} for n in nodes}, s.site_timeout_s,
                       {}, "encryption")
    names, listings = {}, {}
    for node in nodes:
        name = layout.check_site_name(replies[node].get("site"), f"SuperNode {node}: site name")
        if name in names.values():
            raise InputError(f"site name {name!r} sent by two SuperNodes; give each --node-config "
                             "site-name a different value")
        names[node] = name
        listings[node] = transfer.check_listing(name, replies[node].get("listing"), s.upload + ["head"],
                                                s.max_upload_bytes)
    staging = transfer.Staging(s.workdir)
    try:
        plans = {n: transfer.chunk_plan(listings[n], s.chunk_bytes) for n in nodes}
        for k in range(max((len(p) for p in plans.values()), default=0)):
            batch = {n: {"request": dict(zip(("op", "kind", "file", "offset", "length"),
                                             ("chunk", *plans[n][k])))}
                     for n in nodes if k < len(plans[n])}
            got = _replies(ask, batch, s.chunk_timeout_s, names, f"the upload (chunk {k + 1})")
            for n, req in batch.items():
                data = got[n].get("data", b"")
                r = req["request"]
                if len(data) != r["length"]:
                    raise InputError(f"site {names[n]!r}: chunk of {r['kind']}/{r['file']} at byte "
                                     f"{r['offset']}: {len(data)} bytes, asked for {r['length']}")
                staging.write(r["kind"], names[n], r["file"], r["offset"], data)
        for n in nodes:
            staging.check_files(names[n], listings[n])
        manifests = staging.verify(list(names.values()))
        staging.commit(list(names.values()))
    except BaseException:
        staging.discard()
        raise
    record = {"seconds": time.perf_counter() - t0, "sites": {
        names[n]: {"bytes_downloaded": sum(map(len, files.values())),
                   "bytes_uploaded": sum(e["bytes"] for e in listings[n]), "chunks": len(plans[n]),
                   "num_images": manifests.get(names[n], {}).get("num_images")} for n in nodes}}
    os.makedirs(os.path.join(s.workdir, "records"), exist_ok=True)
    with open(os.path.join(s.workdir, "records", "flower.json"), "w") as f:
        json.dump(record, f, indent=1)
    for name, r in record["sites"].items():
        log(f"[flower] {name}: {r['bytes_uploaded']} bytes in {r['chunks']} chunk(s), verified")
    return record
