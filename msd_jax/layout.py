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

PROXY = "_proxy"


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

    def shards(self, site: str) -> str:
        return self._p("shards", site)

    def upload(self, site: str) -> str:
        return self._p("uploads", site)

    def checkpoints(self, party: str) -> str:
        return self._p("checkpoints", party)

    def metrics(self, party: str) -> str:
        os.makedirs(self._p("metrics"), exist_ok=True)
        return self._p("metrics", f"{party}.jsonl")

    def tensorboard(self, party: str) -> str:
        return self._p("tensorboard", party)

    def uploaded_sites(self) -> list[str]:
        """Sites whose shards are present, in sorted order (the proxy set excluded)."""
        root = self._p("shards")
        if not os.path.isdir(root):
            return []
        return sorted(d for d in os.listdir(root) if d != PROXY and not d.startswith(".")
                      and os.path.isdir(os.path.join(root, d)))

    def uploaded_models(self) -> list[str]:
        root = self._p("uploads")
        if not os.path.isdir(root):
            return []
        return sorted(d for d in os.listdir(root) if not d.startswith(".")
                      and os.path.isdir(os.path.join(root, d)))
