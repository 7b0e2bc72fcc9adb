"""A site's side of the round over Flower, without Flower types: its settings from the SuperNode's
node-config, the server's files written into the site's own work directory, its encryption (and,
for model upload, its training) run as `--mode encrypt` / `--mode site` run by hand, and the files
it offers back. Keys never leave: the permutation keys are never written, and the site's
site_secret/, checkpoints/ and images are never listed (transfer.ALLOWED_FILES)."""
from __future__ import annotations

import dataclasses
import os

from msd_jax import layout
from msd_jax.protocols.flower import commands, transfer
from msd_jax.trust import InputError

# What the server may write into a site's work directory, per folder.
RECEIVED_FILES = {"head": ("head.json", "head.msgpack"), "initial": ("model.json", "params.msgpack")}


@dataclasses.dataclass
class SiteSettings:
    workdir: str          # the site's own work directory (keys, checkpoints and staging stay here)
    site_dir: str         # its image folder
    test_dir: str         # a labelled folder the encrypt run reads (default: site_dir)
    name: str             # its site name (default: the image folder's name)
    config: str           # its own copy of the config file ('' = the path the server sent)
    overrides: list[str]  # site-side --config overrides (e.g. --config.encrypt.key_source=urandom)

    @classmethod
    def from_node_config(cls, node_config) -> "SiteSettings":
        def get(key, default=None):
            value = node_config.get(key, default)
            if value is None:
                raise InputError(f"SuperNode --node-config: key {key!r} missing (expected "
                                 f"'workdir=\"DIR\" site-dir=\"DIR\"', see docs/hospitals.md)")
            return str(value)
        site_dir = os.path.abspath(get("site-dir"))
        name = get("site-name", "") or os.path.basename(site_dir)
        return cls(workdir=os.path.abspath(get("workdir")), site_dir=site_dir,
                   test_dir=os.path.abspath(get("test-dir", "") or site_dir),
                   name=layout.check_site_name(name, "SuperNode --node-config site-name"),
                   config=get("config", ""), overrides=commands.split_overrides(get("overrides", "")))


def write_received(workdir: str, files: dict[str, bytes]) -> None:
    """The server's files ('head/head.json', 'initial/params.msgpack', ...) into the site's work
    directory, each written under a temporary name and renamed."""
    for key, data in files.items():
        folder, _, name = key.partition("/")
        if name not in RECEIVED_FILES.get(folder, ()):
            raise InputError(f"file {key!r} from the server: not a file the server sends "
                             f"(expected one of {RECEIVED_FILES})")
        out = os.path.join(workdir, folder)
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, layout.TEMP_PREFIX + name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out, name))


def prepare_upload(settings: SiteSettings, request: dict, files: dict[str, bytes], log=print) -> list[dict]:
    """The site's part of the round: writes the server's files, encrypts (and trains, when the
    server asks for uploads/), returns the listing of what it offers."""
    kinds = list(request["kinds"])
    os.makedirs(settings.workdir, exist_ok=True)
    write_received(settings.workdir, files)
    config = settings.config or request["config"]
    overrides = [*commands.split_overrides(request.get("overrides", "")), "--config.data.name=folders",
                 f"--config.data.site_dirs={settings.site_dir}", f"--config.data.test_dir={settings.test_dir}",
                 f"--config.data.site_names={settings.name}", *settings.overrides]
    train = "uploads" in kinds
    if train:  # the merge's proxy set is the server's business; the site's config check skips it
        overrides.append("--config.merge.data=uploaded")
    commands.run_main(config, settings.workdir, "encrypt", overrides, log=log)
    if train:
        commands.run_main(config, settings.workdir, "site", overrides, sites=[settings.name], log=log)
    return transfer.list_upload(settings.workdir, settings.name, kinds + ["head"])
