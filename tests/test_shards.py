"""Tests for msd_jax.encryption.shards: the token shards + manifest a site uploads.

Every expected value is computed independently of the code under test: SHA-256 with hashlib, sizes
with os.path.getsize, bfloat16 rounding with integer bit arithmetic in numpy.
"""
import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from msd_jax.encryption import shards
from msd_jax.encryption.shards import ShardError, load_shards, read_manifest, shard_bytes, write_shards

FP = "ab" * 32  # a head fingerprint (64 hex digits)


def _tokens(n=10, t=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, size=(n, t, d)).astype(np.float32)
    # A few values that exercise rounding: exact ties, signed zeros, tiny and large magnitudes.
    x[0, 0, :8] = [0.0, -0.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8),
                   1e-30, 9.0e3, -9.9e3]  # within trust.MAX_ABS_VALUE
    return x


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even, by integer arithmetic."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _files(d):
    return sorted(os.listdir(d))


# ---------------------------------------------------------------------------------------------
# Round trip and manifest
# ---------------------------------------------------------------------------------------------
def test_bf16_round_trip_matches_independent_rounding(tmp_path):
    x = _tokens()
    out = tmp_path / "site"
    write_shards(str(out), "site", x, dtype="bfloat16", head_fingerprint=FP)
    got, manifest = load_shards(str(out), expected_fingerprint=FP)
    assert manifest["dtype"] == "bfloat16"
    assert got.dtype == ml_dtypes.bfloat16
    assert got.shape == x.shape
    expected_bits = _bf16_bits(x)
    np.testing.assert_array_equal(got.view(np.uint16), expected_bits)
    # The file itself holds the raw 16-bit patterns as uint16.
    raw = np.load(out / manifest["shards"][0]["file"])
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, expected_bits)
    # And the values are close to the input (relative error of bf16 <= 2^-8).
    finite = np.isfinite(got.astype(np.float32))
    rel = np.abs(got.astype(np.float32)[finite] - x[finite]) / np.maximum(np.abs(x[finite]), 1e-30)
    assert rel.max() <= 2.0 ** -8


def test_float16_round_trip(tmp_path):
    x = _tokens()
    write_shards(str(tmp_path / "s"), "s", x, dtype="float16", head_fingerprint=FP)
    got, manifest = load_shards(str(tmp_path / "s"))
    assert got.dtype == np.float16 and manifest["dtype"] == "float16"
    np.testing.assert_array_equal(got, x.astype(np.float16))


def test_float32_round_trip_is_exact(tmp_path):
    x = _tokens()
    write_shards(str(tmp_path / "s"), "s", x, dtype="float32", head_fingerprint=FP)
    got, _ = load_shards(str(tmp_path / "s"))
    assert got.dtype == np.float32
    assert got.tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype,itemsize", [("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_manifest_fields_and_several_shards(tmp_path, dtype, itemsize):
    n, t, d = 10, 5, 8
    x = _tokens(n, t, d)
    out = tmp_path / "shards" / "hospital_a"
    returned = write_shards(str(out), "hospital_a", x, dtype=dtype, head_fingerprint=FP, shard_size=4)
    with open(out / "manifest.json") as f:
        on_disk = json.load(f)
    assert returned == on_disk
    m = on_disk
    assert m["site"] == "hospital_a"
    assert m["num_images"] == n
    assert m["tokens_per_image"] == t
    assert m["embed_dim"] == d
    assert m["dtype"] == dtype
    assert m["head_fingerprint"] == FP
    assert [e["num_images"] for e in m["shards"]] == [4, 4, 2]
    names = [e["file"] for e in m["shards"]]
    assert len(set(names)) == 3
    # Exactly the shards and the manifest, nothing else (no temp files, no leftovers).
    assert _files(out) == sorted(names + ["manifest.json"])
    assert _files(out.parent) == ["hospital_a"]
    for e in m["shards"]:
        path = out / e["file"]
        assert e["sha256"] == _sha(path)
        assert e["bytes"] == os.path.getsize(path)
        # data bytes + a .npy header
        assert e["bytes"] >= e["num_images"] * t * d * itemsize
    total = sum(os.path.getsize(out / f) for f in _files(out))
    assert shard_bytes(str(out)) == total
    got, _ = load_shards(str(out), expected_fingerprint=FP)
    # Order of images survives the split into shards.
    np.testing.assert_array_equal(np.asarray(got, np.float32), x.astype(shards.DTYPES[dtype]).astype(np.float32))


def test_shard_size_exact_multiple_and_single(tmp_path):
    x = _tokens(8)
    m = write_shards(str(tmp_path / "a"), "a", x, dtype="float32", head_fingerprint=FP, shard_size=4)
    assert [e["num_images"] for e in m["shards"]] == [4, 4]
    m = write_shards(str(tmp_path / "b"), "b", x, dtype="float32", head_fingerprint=FP, shard_size=1024)
    assert [e["num_images"] for e in m["shards"]] == [8]


def test_overwrite_removes_stale_shards(tmp_path):
    out = tmp_path / "s"
    write_shards(str(out), "s", _tokens(10), dtype="float32", head_fingerprint=FP, shard_size=3)
    assert len(_files(out)) == 5
    x2 = _tokens(2, seed=5)
    write_shards(str(out), "s", x2, dtype="float32", head_fingerprint=FP, shard_size=3)
    assert len(_files(out)) == 2
    got, m = load_shards(str(out))
    assert m["num_images"] == 2
    np.testing.assert_array_equal(got, x2)


def test_bad_tokens_and_dtype(tmp_path):
    with pytest.raises(ShardError, match="tokens"):
        write_shards(str(tmp_path / "s"), "s", np.zeros((3, 4), np.float32), dtype="float32",
                     head_fingerprint=FP)
    with pytest.raises(ShardError):
        write_shards(str(tmp_path / "s"), "s", np.zeros((0, 4, 2), np.float32), dtype="float32",
                     head_fingerprint=FP)
    with pytest.raises(ShardError, match="float64"):
        write_shards(str(tmp_path / "s"), "s", _tokens(), dtype="float64", head_fingerprint=FP)
    assert not os.path.exists(tmp_path / "s")
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------
# Bad inputs at load time: ShardError naming the file
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path):
    out = tmp_path / "site"
    m = write_shards(str(out), "site", _tokens(10), dtype="bfloat16", head_fingerprint=FP, shard_size=4)
    return out, m


def test_flipped_byte_is_detected(site):
    out, m = site
    path = out / m["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit of the token data, not the header: np.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="SHA-256") as e:
        load_shards(str(out), expected_fingerprint=FP)
    assert str(path) in str(e.value)


def test_wrong_fingerprint(site):
    out, _ = site
    other = "cd" * 32
    with pytest.raises(ShardError, match="head_fingerprint") as e:
        load_shards(str(out), expected_fingerprint=other)
    assert str(out / "manifest.json") in str(e.value)
    # Without an expected fingerprint the same shards load.
    load_shards(str(out))


def test_missing_shard(site):
    out, m = site
    path = out / m["shards"][2]["file"]
    os.remove(path)
    with pytest.raises(ShardError, match="missing") as e:
        load_shards(str(out))
    assert str(path) in str(e.value)


def test_missing_manifest(site):
    out, _ = site
    os.remove(out / "manifest.json")
    for fn in (load_shards, read_manifest, shard_bytes):
        with pytest.raises(ShardError) as e:
            fn(str(out))
        assert str(out / "manifest.json") in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ShardError) as e:
        load_shards(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)


def test_invalid_manifest_json(site):
    out, _ = site
    (out / "manifest.json").write_text('{"site": "site", "num_images": ')
    with pytest.raises(ShardError, match="JSON") as e:
        load_shards(str(out))
    assert str(out / "manifest.json") in str(e.value)


@pytest.mark.parametrize("field", ["site", "num_images", "tokens_per_image", "embed_dim", "dtype",
                                   "head_fingerprint", "shards"])
def test_manifest_missing_field(site, field):
    out, m = site
    m = dict(m)
    del m[field]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError) as e:
        load_shards(str(out))
    assert field in str(e.value) and str(out / "manifest.json") in str(e.value)


def test_manifest_bad_dtype_and_count(site):
    out, m = site
    bad = dict(m, dtype="int8")
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="dtype"):
        load_shards(str(out))
    bad = dict(m, num_images=m["num_images"] + 1)
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="num_images") as e:
        load_shards(str(out))
    assert str(out / "manifest.json") in str(e.value)


def test_manifest_wrong_shape(site):
    out, m = site
    bad = dict(m, embed_dim=m["embed_dim"] + 1)
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="shape") as e:
        load_shards(str(out))
    assert str(out / m["shards"][0]["file"]) in str(e.value)


def test_manifest_dtype_must_match_stored_array(tmp_path):
    out = tmp_path / "s"
    m = write_shards(str(out), "s", _tokens(4), dtype="float32", head_fingerprint=FP)
    (out / "manifest.json").write_text(json.dumps(dict(m, dtype="bfloat16")))
    with pytest.raises(ShardError) as e:
        tokens, _ = load_shards(str(out))
        # If it does not raise, it must at least honour the manifest's shape.
        assert tokens.shape == (4, m["tokens_per_image"], m["embed_dim"])
    assert str(out) in str(e.value)


def test_manifest_shard_entry_missing_sha(site):
    out, m = site
    entries = [dict(e) for e in m["shards"]]
    del entries[0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(dict(m, shards=entries)))
    with pytest.raises(ShardError) as e:
        load_shards(str(out))
    assert str(out) in str(e.value)


def test_manifest_with_no_shards(site):
    out, m = site
    (out / "manifest.json").write_text(json.dumps(dict(m, shards=[])))
    with pytest.raises(ShardError) as e:
        load_shards(str(out))
    assert str(out / "manifest.json") in str(e.value)


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------
def test_failed_write_keeps_previous_content(tmp_path, monkeypatch):
    out = tmp_path / "site"
    old = _tokens(6, seed=1)
    write_shards(str(out), "site", old, dtype="float32", head_fingerprint=FP, shard_size=2)
    before = {f: (out / f).read_bytes() for f in _files(out)}

    real_save = np.save
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(shards.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        write_shards(str(out), "site", _tokens(6, seed=2), dtype="float32", head_fingerprint=FP,
                     shard_size=2)
    monkeypatch.setattr(shards.np, "save", real_save)
    assert len(calls) == 2
    # The first shard of the failed write went into a temp folder, never into out_dir.
    assert not str(calls[0]).startswith(str(out) + os.sep)
    after = {f: (out / f).read_bytes() for f in _files(out)}
    assert after == before
    got, _ = load_shards(str(out), expected_fingerprint=FP)
    np.testing.assert_array_equal(got, old)
    assert _files(tmp_path) == ["site"]  # no temp folder left behind


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "site"

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt  # a kill, not only an Exception

    monkeypatch.setattr(shards.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(out), "site", _tokens(4), dtype="float32", head_fingerprint=FP)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# A range of rows (a server process loads only its rows)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi", [(0, 10), (3, 7), (4, 8), (5, 6), (9, 10), (6, 6)])
def test_rows_read_only_the_shards_holding_them(tmp_path, lo, hi):
    """10 rows in shards of 4: files hold rows [0, 4), [4, 8), [8, 10). Every other file is
    corrupted, so a read of any of them would fail; the rows equal the written ones."""
    x = _tokens(10)
    out = tmp_path / "s"
    m = write_shards(str(out), "s", x, dtype="float32", head_fingerprint=FP, shard_size=4)
    touched = [i for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 10)]) if a < hi and b > lo]
    assert shards.shards_for_rows(m, lo, hi) == touched
    for i, entry in enumerate(m["shards"]):
        if i not in touched:
            path = out / entry["file"]
            path.write_bytes(b"\0" * path.stat().st_size)  # same size, wrong hash
    got, _ = load_shards(str(out), FP, tokens_per_image=5, embed_dim=8, rows=(lo, hi))
    np.testing.assert_array_equal(got, x[lo:hi])
    assert got.dtype == np.float32
    if len(touched) < 3:
        with pytest.raises(ShardError, match="SHA-256"):
            load_shards(str(out), FP)


def test_rows_still_check_the_manifest_and_every_file_read(tmp_path):
    out = tmp_path / "s"
    m = write_shards(str(out), "s", _tokens(10), dtype="bfloat16", head_fingerprint=FP, shard_size=4)
    with pytest.raises(ShardError, match="head_fingerprint"):
        load_shards(str(out), "cd" * 32, rows=(8, 10))
    with pytest.raises(ShardError, match="embed_dim"):
        load_shards(str(out), FP, tokens_per_image=5, embed_dim=9, rows=(8, 10))
    with pytest.raises(ShardError, match=r"rows \[8, 11\).*num_images"):
        load_shards(str(out), FP, rows=(8, 11))
    path = out / m["shards"][2]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="SHA-256") as e:
        load_shards(str(out), FP, rows=(7, 9))
    assert str(path) in str(e.value)
    got, _ = load_shards(str(out), FP, rows=(0, 8))
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (8, 5, 8)
