"""Check uploaded shards on arrival, before the server trains on them.

    python -m msd_jax.encryption.verify DIR [DIR ...] [--head HEAD_DIR]

DIR is a site's shard folder (shards/<site>/, holding manifest.json), a folder of such folders
(shards/), or a work directory (holding shards/ and usually head/). Every shard listed in each
manifest is hashed and compared with the manifest's SHA-256, and its dtype and shape are checked:
the same check the server runs when it loads the shards (msd_jax.encryption.shards.load_shards). With a head
(--head, or the head/ folder of a work directory), the head file is checked against its own
fingerprint and every manifest's head_fingerprint must equal it: shards encrypted with another
head are useless to this server. In the secret modes (docs/privacy.md) the server has no head but
head/transform.json, the mode and fingerprint the sites sent: the manifests are checked against that.

Prints one line per site folder (OK or FAIL with the reason). Exit status 0 when every folder is
OK, 1 when any failed, 2 when a DIR holds no shard folder or the head cannot be read.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from msd_jax import layout, trust
from msd_jax.encryption import shards
from msd_jax.trust import InputError

HEAD_META = "head.json"  # msd_jax.encryption.encrypt.HEAD_META (not imported: keeps this command free of jax)
TRANSFORM_META = "transform.json"  # msd_jax.encryption.encrypt.TRANSFORM_META (secret modes)


class VerifyError(InputError):
    pass


def find_shard_dirs(path: str) -> list[str]:
    """Shard folders at `path`, under `path`, or under `path`/shards: every sub-folder holding a
    manifest, hidden ones included (they are reported, not skipped); this tool's unfinished
    folders aside."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise VerifyError(f"{path}: no such folder (expected a shard folder, a shards/ folder or a "
                          "work directory)")
    if os.path.isfile(os.path.join(path, shards.MANIFEST)):
        return [path]
    for root in (path, os.path.join(path, "shards")):
        if not os.path.isdir(root):
            continue
        found = sorted(os.path.join(root, d) for d in os.listdir(root)
                       if not d.startswith(layout.TEMP_PREFIX)
                       and os.path.isfile(os.path.join(root, d, shards.MANIFEST)))
        if found:
            return found
    raise VerifyError(f"{path}: no {shards.MANIFEST} here, in its sub-folders or in {path}/shards/* "
                      "(expected the output of --mode encrypt)")


def _read_json(path: str) -> dict:
    meta = trust.read_json(path, "the head's description")
    if not isinstance(meta.get("fingerprint"), str):
        raise VerifyError(f"{path}: field 'fingerprint' is {meta.get('fingerprint')!r}, expected a "
                          "string of 64 hex digits")
    return meta


def expected_fingerprint(head_dir: str) -> str:
    """The fingerprint every manifest must carry: head/transform.json's in a secret mode, else the
    public head's (head.msgpack checked against head.json first)."""
    head_dir = os.path.abspath(head_dir)
    transform = os.path.join(head_dir, TRANSFORM_META)
    if os.path.isfile(transform):
        if os.path.isfile(os.path.join(head_dir, HEAD_META)):
            head_fingerprint(head_dir)  # a public head next to it (feature_perm): still intact?
        return _read_json(transform)["fingerprint"]
    return head_fingerprint(head_dir)


def head_fingerprint(head_dir: str) -> str:
    """The head's fingerprint, after checking head.msgpack against it (msd_jax.encryption.encrypt.load_head)."""
    meta_path = os.path.join(os.path.abspath(head_dir), HEAD_META)
    if not os.path.isfile(meta_path):
        raise VerifyError(f"{meta_path}: no head here (expected the head/ folder the server distributed, "
                          f"with {HEAD_META}, or {TRANSFORM_META} in a secret mode)")
    meta = _read_json(meta_path)
    from msd_jax.encryption import encrypt  # noqa: PLC0415 (jax only when a head is checked)
    from msd_jax.models import vit  # noqa: PLC0415
    missing = [k for k in encrypt.HEAD_FIELDS if k not in meta]
    if missing:
        raise VerifyError(f"{meta_path}: field(s) {missing} missing")
    try:
        cfg = vit.HeadConfig(**{k: meta[k] for k in encrypt.HEAD_FIELDS})
        _, fp = encrypt.load_head(head_dir, cfg)
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as e:  # shape fields of the wrong type or value
        raise VerifyError(f"{meta_path}: the head's fields {[meta[k] for k in encrypt.HEAD_FIELDS]} "
                          f"describe no valid head ({type(e).__name__}: {e})") from e
    return fp


def verify_dir(shard_dir: str, fingerprint: Optional[str] = None, root: Optional[str] = None) -> dict:
    """Verifies one site's shards (and their head fingerprint when given); returns the manifest.
    A folder inside `root` (the DIR given) must be named like a site and must not lead out of it.
    Raises trust.InputError."""
    if root is not None and os.path.abspath(shard_dir) != os.path.abspath(root):
        name = os.path.basename(shard_dir)
        if name != layout.PROXY:
            layout.check_site_name(name, f"{shard_dir}: folder name")
        trust.within(root, shard_dir, "this site folder")
    tokens, manifest = shards.load_shards(shard_dir, fingerprint)
    del tokens
    return manifest


def main(argv=None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m msd_jax.encryption.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="a shard folder, a shards/ folder or a work directory")
    parser.add_argument("--head", default=None,
                        help="the head/ folder the shards must have been encrypted with "
                             "(default: DIR/head when DIR is a work directory)")
    args = parser.parse_args(argv)
    failed = 0
    for d in args.dirs:
        try:
            dirs = find_shard_dirs(d)
            own = os.path.join(d, "head")
            head_dir = args.head or (own if any(os.path.isfile(os.path.join(own, f))
                                                for f in (HEAD_META, TRANSFORM_META)) else None)
            fp = expected_fingerprint(head_dir) if head_dir else None
        except InputError as e:
            print(f"ERROR {e}", file=out)
            return 2
        if fp is None:
            print(f"note: no head given for {d} (--head): head fingerprints not checked", file=out)
        for sd in dirs:
            try:
                m = verify_dir(sd, fp, root=d)
                mib = shards.shard_bytes(sd) / 2**20
            except (InputError, OSError) as e:  # one site's bad upload: report it, check the next
                failed += 1
                print(f"FAIL {sd}: {e}", file=out)
                continue
            print(f"OK   {sd}: site {m['site']}, {m['num_images']} images x {m['tokens_per_image']} "
                  f"tokens x {m['embed_dim']} ({m['dtype']}), {len(m['shards'])} shard(s), {mib:.2f} MiB, "
                  f"head {m['head_fingerprint'][:16]}{' (matches)' if fp else ''}", file=out)
    if failed:
        print(f"{failed} shard folder(s) failed verification", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
