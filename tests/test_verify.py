"""Tests for `python -m msd_jax.encryption.verify`: the arrival check of uploaded shards (docs/hospitals.md).

A tiny work directory is built with the real writers (encrypt.save_head, shards.write_shards); the
tests then corrupt it the ways a transfer can and check the verdict and the message.
"""
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from msd_jax.encryption import encrypt, shards, verify
from msd_jax.models import vit
from conftest import tiny_model

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CFG = tiny_model(image_size=8, patch_size=4, channels=1, embed_dim=8, depth=1, num_heads=2)


def _workdir(root, sites=("site0", "site1"), seed=0):
    head = jax.device_get(vit.init_head(CFG, jax.random.key(seed)))
    fp = encrypt.save_head(str(root / "head"), CFG, head)
    rng = np.random.default_rng(seed)
    for i, s in enumerate(sites):
        tokens = rng.normal(size=(5 + i, CFG.num_patches, CFG.embed_dim)).astype(np.float32)
        shards.write_shards(str(root / "shards" / s), s, tokens, dtype="bfloat16", head_fingerprint=fp,
                            shard_size=3)
    return fp


def _run(*argv):
    out = io.StringIO()
    rc = verify.main([str(a) for a in argv], out=out)
    return rc, out.getvalue()


def test_intact_workdir_is_ok(tmp_path):
    fp = _workdir(tmp_path)
    rc, text = _run(tmp_path)
    assert rc == 0, text
    ok = [line for line in text.splitlines() if line.startswith("OK")]
    assert len(ok) == 2
    assert "site site0, 5 images x 4 tokens x 8 (bfloat16), 2 shard(s)" in ok[0]
    assert "site site1, 6 images" in ok[1]
    assert fp[:16] in ok[0] and "(matches)" in ok[0]


def test_single_site_folder_and_shards_root(tmp_path):
    _workdir(tmp_path)
    rc, text = _run(tmp_path / "shards" / "site1")
    assert rc == 0 and sum(line.startswith("OK") for line in text.splitlines()) == 1
    assert "no head given" in text  # nothing to compare the fingerprint with
    rc, text = _run(tmp_path / "shards", "--head", tmp_path / "head")
    assert rc == 0 and "(matches)" in text and "site site0" in text and "site site1" in text


def test_altered_shard_fails_and_names_the_file(tmp_path):
    _workdir(tmp_path)
    path = tmp_path / "shards" / "site1" / "tokens-00001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one token value, the size unchanged
    path.write_bytes(bytes(data))
    rc, text = _run(tmp_path)
    assert rc == 1, text
    fail = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and str(path) in fail[0] and "SHA-256" in fail[0]
    assert any(line.startswith("OK") and "site site0" in line for line in text.splitlines())


def test_missing_shard_fails(tmp_path):
    _workdir(tmp_path)
    os.remove(tmp_path / "shards" / "site0" / "tokens-00000.npy")
    rc, text = _run(tmp_path)
    assert rc == 1 and "tokens-00000.npy: shard listed in" in text and "missing" in text


def test_shards_of_another_head_fail(tmp_path):
    _workdir(tmp_path / "a", seed=0)
    _workdir(tmp_path / "b", seed=1)  # a second head: other fingerprint
    rc, text = _run(tmp_path / "a" / "shards", "--head", tmp_path / "b" / "head")
    assert rc == 1 and text.count("FAIL") == 2 and "head_fingerprint" in text
    assert _run(tmp_path / "a" / "shards", "--head", tmp_path / "a" / "head")[0] == 0


def test_secret_mode_checks_against_transform_json(tmp_path):
    """Secret modes: the server holds head/transform.json (mode + fingerprint), no head parameters."""
    secret_fp = "cd" * 32
    tokens = np.zeros((3, CFG.num_patches, CFG.embed_dim), np.float32)
    shards.write_shards(str(tmp_path / "shards" / "site0"), "site0", tokens, dtype="float16",
                        head_fingerprint=secret_fp)
    (tmp_path / "head").mkdir()
    transform = {"mode": "secret_head", "fingerprint": secret_fp,
                 **{k: getattr(CFG, k) for k in encrypt.HEAD_FIELDS}}
    (tmp_path / "head" / "transform.json").write_text(json.dumps(transform))
    rc, text = _run(tmp_path)
    assert rc == 0 and "(matches)" in text, text
    transform["fingerprint"] = "ef" * 32
    (tmp_path / "head" / "transform.json").write_text(json.dumps(transform))
    rc, text = _run(tmp_path)
    assert rc == 1 and "head_fingerprint" in text, text


def test_tampered_head_is_an_error(tmp_path):
    _workdir(tmp_path)
    meta_path = tmp_path / "head" / encrypt.HEAD_META
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "00" * 32
    meta_path.write_text(json.dumps(meta))
    rc, text = _run(tmp_path)
    assert rc == 2 and "do not match the fingerprint" in text


def test_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, text = _run(tmp_path / "empty")
    assert rc == 2 and "manifest.json" in text and str(tmp_path / "empty") in text
    rc, text = _run(tmp_path / "nope")
    assert rc == 2 and "no such folder" in text


def test_command_line(tmp_path):
    _workdir(tmp_path)
    cmd = [sys.executable, "-m", "msd_jax.encryption.verify", str(tmp_path)]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copy(tmp_path / "shards" / "site0" / "tokens-00000.npy",
                tmp_path / "shards" / "site0" / "tokens-00001.npy")  # a swapped file
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr
