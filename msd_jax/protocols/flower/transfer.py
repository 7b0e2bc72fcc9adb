"""Moving a site's upload folders over messages: what a site offers (a listing of files with sizes
and SHA-256), the chunks the server asks for, and the server's staging area, which becomes the work
directory's shards/<site>/ and uploads/<site>/ only once every site's files have arrived whole and
passed the same checks as `python -m msd_jax.encryption.verify`.

No Flower import here: the functions take and return plain values, so the whole transfer can be
checked without a deployment."""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil

from msd_jax import layout
from msd_jax.encryption import shards, verify
from msd_jax.trust import InputError

# What a site may send, per folder kind: shard folders and uploaded models hold only files this
# tool writes; from head/ only the secret modes' transform.json (the public head goes the other way).
ALLOWED_FILES = {
    "shards": lambda name: name == shards.MANIFEST or bool(shards.SHARD_NAME.fullmatch(name)),
    "uploads": lambda name: name in ("model.json", "params.msgpack"),
    "head": lambda name: name == verify.TRANSFORM_META,
}
KINDS = tuple(ALLOWED_FILES)


class SiteDropout(RuntimeError):
    """A site stopped answering (or answered with an error) before its upload was complete."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def site_folder(workdir: str, kind: str, site: str) -> str:
    """The folder of `kind` a site uploads from (and the server writes to): shards/<site>,
    uploads/<site> or head."""
    wd = layout.Workdir(workdir)
    if kind == "shards":
        return wd.shards(site)
    if kind == "uploads":
        return wd.upload(site)
    if kind == "head":
        return wd.head
    raise InputError(f"upload kind {kind!r}: expected one of {list(KINDS)}")


def list_upload(workdir: str, site: str, kinds: list[str]) -> list[dict]:
    """Site: [{'kind', 'file', 'bytes', 'sha256'}] of every file it will upload, in a fixed order.
    Only files ALLOWED_FILES names are offered; a kind whose folder is absent offers nothing (the
    secret transform exists only in the secret modes)."""
    entries = []
    for kind in kinds:
        folder = site_folder(workdir, kind, site)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if ALLOWED_FILES[kind](name) and os.path.isfile(path) and not os.path.islink(path):
                entries.append({"kind": kind, "file": name, "bytes": os.path.getsize(path),
                                "sha256": shards.sha256_file(path)})
    return entries


def read_chunk(workdir: str, site: str, listing: list[dict], kind: str, name: str, offset: int,
               length: int) -> bytes:
    """Site: bytes [offset, offset + length) of a file it listed. Anything not in its own listing is
    refused, so the server can read nothing else from the site's disk (no key, no image)."""
    entry = next((e for e in listing if e["kind"] == kind and e["file"] == name), None)
    if entry is None:
        raise InputError(f"chunk request for {kind}/{name}: not a file this site offered")
    if not (0 <= offset <= entry["bytes"] and 0 < length and offset + length <= entry["bytes"]):
        raise InputError(f"chunk request for {kind}/{name}: bytes {offset}..{offset + length} outside "
                         f"the file's {entry['bytes']} bytes")
    with open(os.path.join(site_folder(workdir, kind, site), name), "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InputError(f"{kind}/{name}: changed since it was listed (read {len(data)} of {length} bytes)")
    return data


def check_listing(site: str, listing, kinds: list[str], max_bytes: int) -> list[dict]:
    """Server: a site's listing, checked before anything is fetched: each entry a known kind and an
    allowed plain file name, sizes integers in [0, max_bytes] in total, SHA-256 64 hex digits, no
    duplicates; the shard folder's manifest present when shards are expected."""
    where = f"site {site!r}: upload listing"
    if not isinstance(listing, list):
        raise InputError(f"{where}: expected a list of files, got {type(listing).__name__}")
    seen, total = set(), 0
    for i, e in enumerate(listing):
        if not isinstance(e, dict) or set(e) != {"kind", "file", "bytes", "sha256"}:
            raise InputError(f"{where}[{i}]: expected an object with kind, file, bytes, sha256, got {e!r}")
        kind, name, size, digest = e["kind"], e["file"], e["bytes"], e["sha256"]
        if kind not in kinds:
            raise InputError(f"{where}[{i}]: kind {kind!r} not asked for (asked: {kinds})")
        if not isinstance(name, str) or not ALLOWED_FILES[kind](name):
            raise InputError(f"{where}[{i}]: file {name!r} is not a file a {kind} folder holds")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"{where}[{i}]: bytes {size!r}, expected an integer >= 0")
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise InputError(f"{where}[{i}]: sha256 {digest!r}, expected 64 lowercase hex digits")
        if (kind, name) in seen:
            raise InputError(f"{where}[{i}]: {kind}/{name} listed twice")
        seen.add((kind, name))
        total += size
    if total > max_bytes:
        raise InputError(f"{where}: {total} bytes in all, more than the {max_bytes} this server accepts "
                         "(run-config max-upload-mib)")
    if "shards" in kinds and ("shards", shards.MANIFEST) not in seen:
        raise InputError(f"{where}: no shards/{shards.MANIFEST} (did the site's encryption run?)")
    return listing


def chunk_plan(listing: list[dict], chunk_bytes: int) -> list[tuple[str, str, int, int]]:
    """(kind, file, offset, length) of every chunk to fetch, each at most `chunk_bytes`."""
    plan = []
    for e in listing:
        for offset in range(0, e["bytes"], chunk_bytes):
            plan.append((e["kind"], e["file"], offset, min(chunk_bytes, e["bytes"] - offset)))
    return plan


class Staging:
    """Server: the folders a round writes, first under `.tmp-` names next to their destinations;
    `commit` renames them into place once every site is complete and verified, `discard` removes
    them. Nothing under a real site folder name exists before commit."""

    def __init__(self, workdir: str):
        self.wd = layout.Workdir(workdir)
        self.token = secrets.token_hex(4)
        self.folders: dict[tuple[str, str], str] = {}  # (kind, site) -> staging folder

    def folder(self, kind: str, site: str) -> str:
        key = (kind, site)
        if key not in self.folders:
            final = site_folder(self.wd.root, kind, site)
            parent = os.path.dirname(final) if kind != "head" else self.wd.root
            path = os.path.join(parent, f"{layout.TEMP_PREFIX}{kind}-{site}-{self.token}")
            os.makedirs(path)
            self.folders[key] = path
        return self.folders[key]

    def write(self, kind: str, site: str, name: str, offset: int, data: bytes) -> None:
        path = os.path.join(self.folder(kind, site), name)
        with open(path, "r+b" if offset else "wb") as f:
            if os.path.getsize(path) != offset:
                raise InputError(f"site {site!r}: {kind}/{name}: chunk at byte {offset} arrived with "
                                 f"{os.path.getsize(path)} bytes written")
            f.seek(offset)
            f.write(data)

    def check_files(self, site: str, listing: list[dict]) -> None:
        """Every listed file staged whole: its size and SHA-256 as listed."""
        for e in listing:
            path = os.path.join(self.folder(e["kind"], site), e["file"])
            if e["bytes"] == 0 and not os.path.exists(path):  # an empty file needs no chunk
                open(path, "wb").close()
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            if size != e["bytes"]:
                raise InputError(f"site {site!r}: {e['kind']}/{e['file']}: {size} bytes arrived, "
                                 f"{e['bytes']} listed")
            if shards.sha256_file(path) != e["sha256"]:
                raise InputError(f"site {site!r}: {e['kind']}/{e['file']}: SHA-256 differs from the "
                                 "site's listing (corrupted in transit)")

    def transform(self, sites: list[str]) -> str | None:
        """The staged head/transform.json the sites sent (secret modes), after checking they all
        sent the same bytes; None when none sent one."""
        paths = [os.path.join(self.folders[("head", s)], verify.TRANSFORM_META)
                 for s in sites if ("head", s) in self.folders]
        if not paths:
            return None
        if len(paths) != len(sites):
            raise InputError(f"head/{verify.TRANSFORM_META}: sent by {len(paths)} of {len(sites)} sites; "
                             "every site of a secret mode sends it")
        first = open(paths[0], "rb").read()
        for p in paths[1:]:
            if open(p, "rb").read() != first:
                raise InputError(f"head/{verify.TRANSFORM_META}: the sites sent different transforms "
                                 "(they do not share one key: docs/privacy.md)")
        return paths[0]

    def verify(self, sites: list[str]) -> dict[str, dict]:
        """{site: manifest} of every staged shard folder, checked as `python -m
        msd_jax.encryption.verify` checks a work directory: against the server's head, or in a
        secret mode against the transform the sites sent."""
        transform = self.transform(sites)
        head_dir = self.wd.head
        if transform is not None:
            head_dir = self.folder("head", "_check")
            shutil.copy(transform, os.path.join(head_dir, verify.TRANSFORM_META))
            for name in (verify.HEAD_META, "head.msgpack"):  # feature_perm keeps the public head
                if os.path.isfile(os.path.join(self.wd.head, name)):
                    shutil.copy(os.path.join(self.wd.head, name), os.path.join(head_dir, name))
        fingerprint = verify.expected_fingerprint(head_dir)
        return {s: verify.verify_dir(self.folders[("shards", s)], fingerprint)
                for s in sites if ("shards", s) in self.folders}

    def commit(self, sites: list[str]) -> None:
        """Renames every staged site folder into place (replacing a previous upload of that site
        only when it holds nothing but this tool's files), and the sites' transform into head/."""
        transform = self.transform(sites)
        for (kind, site), path in self.folders.items():
            if kind == "head":
                continue
            final = site_folder(self.wd.root, kind, site)
            if os.path.lexists(final):
                _remove_previous(final, kind)
            os.rename(path, final)
        if transform is not None:
            os.makedirs(self.wd.head, exist_ok=True)
            tmp = os.path.join(self.wd.head, f"{layout.TEMP_PREFIX}{verify.TRANSFORM_META}")
            shutil.copy(transform, tmp)
            os.replace(tmp, os.path.join(self.wd.head, verify.TRANSFORM_META))
        self.discard()

    def discard(self) -> None:
        for path in self.folders.values():
            if os.path.isdir(path):
                shutil.rmtree(path)
        self.folders.clear()


def _remove_previous(folder: str, kind: str) -> None:
    """A previous upload of the same site, removed before the new one takes its name; a folder with
    files this tool does not write (or a symlink) is left alone and reported."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise InputError(f"{folder}: exists and is not a folder this tool wrote; move it away")
    if kind == "shards":
        shards.remove_own_shards(folder)
        if os.path.exists(folder):
            os.rmdir(folder)
        return
    foreign = [n for n in os.listdir(folder) if not ALLOWED_FILES[kind](n)]
    if foreign:
        raise InputError(f"{folder}: holds files this tool does not write ({foreign[:3]}); move them away")
    shutil.rmtree(folder)

