"""The Flower ServerApp and ClientApp of the single round (Message API). They only translate between
Flower records and the plain dicts of server.py and site.py: requests and listings travel as JSON in
a ConfigRecord, files and chunks as uint8 arrays in an ArrayRecord (which Flower's transport splits
into objects of at most 5 MiB by itself; the round fetches uploads in chunks of `chunk-mib` on top,
so no single message grows with a site's data)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from msd_jax.protocols.flower import server, site, transfer

server_app = ServerApp()
client_app = ClientApp()

LISTING_FILE = ".flower-listing.json"  # in the site's work directory: what it offered this round


def _log(line: str) -> None:
    print(line, flush=True)


def encode(payload: dict, files: dict[str, bytes] | None = None) -> RecordDict:
    records = {"json": ConfigRecord({"json": json.dumps(payload)})}
    if files:
        records["files"] = ArrayRecord({k: Array(np.frombuffer(v, dtype=np.uint8)) for k, v in files.items()})
    return RecordDict(records)


def decode(content: RecordDict) -> tuple[dict, dict[str, bytes]]:
    payload = json.loads(str(content["json"]["json"]))
    files = {}
    if "files" in content:
        files = {k: np.ascontiguousarray(a.numpy(), dtype=np.uint8).tobytes()
                 for k, a in content["files"].items()}
    return payload, files


def _grid_ask(grid: Grid):
    def ask(requests: dict, timeout: float) -> dict:
        messages = []
        for node, req in requests.items():
            messages.append(Message(encode(req["request"], req.get("files")), dst_node_id=node,
                                    message_type=f"query.{req['request']['op']}"))
        out = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                out[node] = RuntimeError(reply.error.reason)
                continue
            payload, files = decode(reply.content)
            if "data" in files:
                payload["data"] = files["data"]
            out[node] = payload
        return out
    return ask


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise transfer.SiteDropout(f"{len(nodes)} of the {count} sites (run-config num-sites) connected "
                                       f"within {timeout:.0f} s (run-config connect-timeout)")
        time.sleep(0.5)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    settings = server.RoundSettings.from_run_config(rc)
    nodes = _wait_for_nodes(grid, int(rc["num-sites"]), float(rc["connect-timeout"]))
    _log(f"[flower] {len(nodes)} sites connected; server work directory {settings.workdir}")
    record = server.run_round(_grid_ask(grid), nodes, settings, log=_log)
    _log(f"[flower] round complete in {record['seconds']:.1f} s")


@client_app.query("prepare")
def site_prepare(message: Message, context: Context) -> Message:
    settings = site.SiteSettings.from_node_config(context.node_config)
    request, files = decode(message.content)
    listing = site.prepare_upload(settings, request, files, log=_log)
    path = os.path.join(settings.workdir, LISTING_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(listing, f)
    os.replace(path + ".tmp", path)
    return Message(encode({"site": settings.name, "listing": listing}), reply_to=message)


@client_app.query("chunk")
def site_chunk(message: Message, context: Context) -> Message:
    settings = site.SiteSettings.from_node_config(context.node_config)
    request, _ = decode(message.content)
    with open(os.path.join(settings.workdir, LISTING_FILE)) as f:
        listing = json.load(f)
    data = transfer.read_chunk(settings.workdir, settings.name, listing, request["kind"], request["file"],
                               int(request["offset"]), int(request["length"]))
    return Message(encode({}, {"data": data}), reply_to=message)
