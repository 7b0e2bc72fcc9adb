"""Where each party reads and writes inside a work directory. Every arrow of the data flow is a
folder here, so each party can run on its own machine with the folders copied between them:

  head/            the fixed client head (server -> sites, before the round)
  initial/         the initial student (server -> sites; model upload only)
  shards/<site>/   encrypted tokens + manifest (site -> server; token upload, or merge.data=uploaded)
  shards/_proxy/   the server's proxy set, encrypted with the same head (model upload)
  uploads/<site>/  a site's trained model (site -> server; model upload)
  checkpoints/<party>/  Orbax training checkpoints (resume)
  backbone/        the final teacher backbone (head + body), Orbax
  metrics/<party>.jsonl, report.json
  tensorboard/<party>/  TensorBoard events of the same scalars (and tensorboard/eval/)
"""
from __future__ import annotations

import os

from msd_jax.trust import InputError, within

PROXY = "_proxy"      # the server's proxy set: a folder name no site may take
TEMP_PREFIX = ".tmp-"  # folders this tool is still writing (renamed into place when complete)


def check_site_name(name, field: str = "site name") -> str:
    """`name` if it can name a site's folder: one path component that is not `.` or `..`, has no
    separator, does not start with `.` (hidden, and this tool's temporary folders) and is not a
    reserved name; else InputError naming `field`."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty or not a string"
    elif name in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name) or "\0" in name:
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with '.' (hidden folders are not sites)"
    elif name == PROXY:
        problem = "is reserved for the server's proxy set"
    elif len(name.encode()) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise InputError(f"{field}: {name!r} {problem}; expected a plain folder name such as 'site0' "
                         "(letters, digits, '-', '_')")
    return name


class Workdir:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _p(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    @property
    def head(self) -> str:
        return self._p("head")

    @property
    def initial(self) -> str:
        return self._p("initial")

    @property
    def backbone(self) -> str:
        return self._p("backbone")

    @property
    def report(self) -> str:
        return self._p("report.json")

    @property
    def shards_root(self) -> str:
        return self._p("shards")

    @property
    def uploads_root(self) -> str:
        return self._p("uploads")

    def shards(self, site: str) -> str:
        """shards/<site>/ (or the proxy set's shards/_proxy/)."""
        return self._p("shards", site if site == PROXY else check_site_name(site))

    def upload(self, site: str) -> str:
        return self._p("uploads", check_site_name(site))

    def checkpoints(self, party: str) -> str:
        return self._p("checkpoints", check_site_name(party, "party name"))

    def metrics(self, party: str) -> str:
        os.makedirs(self._p("metrics"), exist_ok=True)
        return self._p("metrics", f"{check_site_name(party, 'party name')}.jsonl")

    def tensorboard(self, party: str) -> str:
        return self._p("tensorboard", check_site_name(party, "party name"))

    def _received(self, root: str, exclude: tuple = ()) -> list[str]:
        """The site folders under `root`, sorted, each checked: a valid site name, and no symlink
        out of the work directory. This tool's own unfinished folders are skipped; any other
        folder that cannot be a site is an error, never silently left out."""
        if not os.path.isdir(root):
            return []
        within(self.root, root, "the folder")
        names = []
        for d in sorted(os.listdir(root)):
            path = os.path.join(root, d)
            if d in exclude or d.startswith(TEMP_PREFIX) or not os.path.isdir(path):
                continue
            check_site_name(d, f"{path}: folder name")
            within(self.root, path, "this site folder")
            names.append(d)
        return names

    def uploaded_sites(self) -> list[str]:
        """Sites whose shards are present, in sorted order (the proxy set excluded)."""
        return self._received(self.shards_root, exclude=(PROXY,))

    def uploaded_models(self) -> list[str]:
        return self._received(self.uploads_root)
