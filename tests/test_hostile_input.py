"""What a hostile or careless site can send, and what the server does with it: every load of
another party's file either returns what an honest party wrote or raises trust.InputError naming the
file; nothing outside the work directory is read, followed or deleted.

The hostile work directories come from tests/hostile.py (real head, real encrypted tokens, real
uploaded models, then rewritten by an attacker who keeps hashes and sizes consistent).
"""
import io
import os
import shutil
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

import hostile
from conftest import REPO, mode_of, model_of, tiny_demo_config
from msd_jax import parties
from msd_jax.data import sites as sites_lib
from msd_jax.encryption import shards, verify
from msd_jax.layout import Workdir, check_site_name
from msd_jax.protocols import model_io, model_upload, token_upload
from msd_jax.training import train
from msd_jax.trust import InputError


@pytest.fixture(scope="module")
def config():
    return tiny_demo_config()


@pytest.fixture(scope="module")
def honest(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("honest") / "wd"
    hostile.honest_workdir(root, config, model_of(config))
    return root


@pytest.fixture
def wd(honest, tmp_path):
    """A fresh copy of the honest work directory, next to an `outside/` folder the attacker aims at."""
    shutil.copytree(honest, tmp_path / "wd", symlinks=True)
    (tmp_path / "outside").mkdir()
    return Workdir(str(tmp_path / "wd"))


def load_all(config, wd):
    """What the token-upload server loads before it trains."""
    model, mode = model_of(config), mode_of(config)
    fp = parties.encrypt.expected_fingerprint(mode, wd.head, model)
    return token_upload.load_uploaded_tokens(config, model, mode, wd, fp)


def run_verify(*dirs):
    out = io.StringIO()
    return verify.main([str(d) for d in dirs], out=out), out.getvalue()


def snapshot(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(folder) for f in files}


def test_the_honest_workdir_loads(config, wd):
    tokens = load_all(config, wd)
    assert tokens.shape == (11, model_of(config).num_patches, model_of(config).embed_dim)
    rc, text = run_verify(wd.root)
    assert rc == 0, text


# ---------------------------------------------------------------------------------------------
# Site names are one path component (case 1, 9)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "../../victim", "/tmp/victim", "a/b", "a\\b", ".hid",
                                  "_proxy", "", "x\0y"])
def test_a_site_name_that_is_not_one_plain_component_is_refused(name):
    with pytest.raises(InputError, match="config.data.site_names"):
        check_site_name(name, "config.data.site_names")
    with pytest.raises(InputError):
        Workdir("/tmp/w").shards(name) if name != "_proxy" else Workdir("/tmp/w").upload(name)


def _folders_config(tmp_path, names, dirs):
    from test_cli import make_folder
    c = tiny_demo_config()
    paths = [str(make_folder(tmp_path / d, i, n=2)) for i, d in enumerate(dirs)]
    c.data.update(name="folders", site_dirs=",".join(paths), site_names=names,
                  test_dir=str(make_folder(tmp_path / "test", 9, n=2)), cache_dir=str(tmp_path / "cache"))
    return c


@pytest.mark.parametrize("names", ["../../victim,c", "..,c", ".,c", ".hid,c"])
def test_site_names_from_the_config_are_checked_before_anything_is_read(tmp_path, names):
    c = _folders_config(tmp_path, names, ["a", "b"])
    with pytest.raises(InputError, match="config.data.site_names"):
        sites_lib.load(c)


def test_a_site_folder_given_as_dot_is_named_after_the_folder(tmp_path, monkeypatch):
    c = _folders_config(tmp_path, "", ["hospital_a", "b"])
    monkeypatch.chdir(tmp_path / "hospital_a")
    c.data.site_dirs = "." + "," + str(tmp_path / "b")
    data = sites_lib.load(c)
    assert [n for n, _ in data.sites] == ["hospital_a", "b"]


def test_the_command_line_refuses_a_path_as_site_name_and_touches_nothing(tmp_path):
    """`--config.data.site_names=..,c` once emptied the work directory, `../../victim,c` replaced
    a folder outside it."""
    from test_cli import make_folder
    wd, victim = tmp_path / "runs" / "w", tmp_path / "victim"
    wd.mkdir(parents=True)
    victim.mkdir()
    (wd / "report.json").write_text("{}")
    (victim / "precious.txt").write_text("keep me")
    sites = [str(make_folder(tmp_path / d, i, n=2)) for i, d in enumerate(("a", "c"))]
    def untouched():
        return {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("cache")}
    before = untouched()
    for names in ("..,c", "../../victim,c"):
        proc = subprocess.run(
            [sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick", f"--workdir={wd}",
             "--mode=encrypt", "--config.data.name=folders", f"--config.data.site_dirs={','.join(sites)}",
             f"--config.data.site_names={names}", f"--config.data.test_dir={sites[0]}",
             f"--config.data.cache_dir={tmp_path / 'cache'}"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert "config.data.site_names" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert untouched() == before


def test_a_hidden_site_folder_is_reported_not_silently_left_out(config, wd):
    shutil.copytree(wd.shards("site1"), os.path.join(wd.shards_root, ".hid"))
    with pytest.raises(InputError, match=r"\.hid"):
        wd.uploaded_sites()
    with pytest.raises(InputError, match=r"\.hid"):
        load_all(config, wd)
    rc, text = run_verify(wd.root)
    assert rc == 1
    assert any(line.startswith("FAIL") and ".hid" in line for line in text.splitlines()), text
    assert sum(line.startswith("OK") for line in text.splitlines()) == 2, text


def test_unfinished_shard_folders_of_this_tool_are_skipped(config, wd):
    os.makedirs(os.path.join(wd.shards_root, ".tmp-shards-abc"))
    assert wd.uploaded_sites() == ["site0", "site1"]


def test_re_encryption_deletes_only_what_this_tool_wrote(wd, tmp_path):
    target = wd.shards("site0")
    (tmp_path / "outside" / "precious.txt").write_text("keep me")
    with open(os.path.join(target, "notes.txt"), "w") as f:
        f.write("a site's own file")
    tokens = np.zeros((2, 16, 16), np.float32)
    with pytest.raises(InputError, match="notes.txt"):
        shards.write_shards(target, "site0", tokens, dtype="float32", head_fingerprint="ab" * 32)
    assert os.path.isfile(os.path.join(target, "notes.txt"))
    assert os.path.isfile(os.path.join(target, shards.MANIFEST))
    # a site folder that is a symlink out of the work directory is neither followed nor deleted
    shutil.rmtree(target)
    os.symlink(tmp_path / "outside", target)
    with pytest.raises(InputError, match="symlink"):
        shards.write_shards(target, "site0", tokens, dtype="float32", head_fingerprint="ab" * 32)
    assert (tmp_path / "outside" / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Paths read from a manifest stay inside their folder (case 2, 3)
# ---------------------------------------------------------------------------------------------
def _outside_shard(wd, tmp_path):
    """A valid shard of site0 copied outside the work directory (what the attacker points at)."""
    m = hostile.manifest(wd, "site0")
    target = tmp_path / "outside" / "stolen.npy"
    shutil.copy(os.path.join(wd.shards("site0"), m["shards"][0]["file"]), target)
    return str(target)


@pytest.mark.parametrize("relative", [True, False], ids=["dotdot", "absolute"])
def test_a_manifest_entry_out_of_the_folder_is_refused(config, wd, tmp_path, relative):
    target = _outside_shard(wd, tmp_path)
    hostile.point_entry_at(wd, "site0", target, relative=relative)
    with pytest.raises(InputError, match=r"shards\[0\]\.file") as e:
        load_all(config, wd)
    assert "outside" in str(e.value)
    rc, text = run_verify(wd.root)
    assert rc == 1 and "FAIL" in text and "shards[0].file" in text, text


def test_a_symlinked_shard_pointing_outside_is_refused(config, wd, tmp_path):
    target = _outside_shard(wd, tmp_path)
    m = hostile.manifest(wd, "site0")
    path = os.path.join(wd.shards("site0"), m["shards"][0]["file"])
    os.remove(path)
    os.symlink(target, path)
    with pytest.raises(InputError, match="outside"):
        load_all(config, wd)
    rc, text = run_verify(wd.root)
    assert rc == 1 and "FAIL" in text, text


def test_a_symlinked_site_folder_pointing_outside_is_refused(config, wd, tmp_path):
    shutil.move(wd.shards("site1"), tmp_path / "outside" / "site1")
    os.symlink(tmp_path / "outside" / "site1", wd.shards("site1"))
    with pytest.raises(InputError, match="outside the work directory"):
        load_all(config, wd)
    rc, text = run_verify(wd.root)
    assert rc == 1 and any(line.startswith("FAIL") and "site1" in line for line in text.splitlines()), text


@pytest.mark.parametrize("which", ["manifest", "params", "model.json", "head.json"])
def test_a_symlinked_file_pointing_outside_is_refused(config, wd, tmp_path, which):
    """A valid copy outside the work directory, linked from where the real file was."""
    path = {"manifest": os.path.join(wd.shards("site0"), shards.MANIFEST),
            "params": os.path.join(wd.upload("site0"), model_io.PARAMS_FILE),
            "model.json": os.path.join(wd.upload("site0"), model_io.META_FILE),
            "head.json": os.path.join(wd.head, "head.json")}[which]
    target = tmp_path / "outside" / os.path.basename(path)
    shutil.move(path, target)
    os.symlink(target, path)
    with pytest.raises(InputError, match="outside") as e:
        if which in ("params", "model.json"):
            _load_upload(config, wd)
        else:
            load_all(config, wd)
    assert path in str(e.value)
    if which in ("manifest", "head.json"):
        rc, text = run_verify(wd.root)
        assert rc != 0 and "outside" in text, text


# ---------------------------------------------------------------------------------------------
# Manifests of the wrong types and .npy files that lie (case 5)
# ---------------------------------------------------------------------------------------------
def _edit(m, path, value):
    *keys, last = path
    for k in keys:
        m = m[k]
    m[last] = value


@pytest.mark.parametrize("edit,field", [
    (lambda m: 42, "a JSON int"),
    (lambda m: "[1, 2", "not valid JSON"),
    (lambda m: _edit(m, ("shards", 0, "file"), 5) or m, "'file'"),
    (lambda m: _edit(m, ("num_images",), "11") or m, "'num_images'"),
    (lambda m: _edit(m, ("num_images",), 60) or m, "'num_images' is 60"),
    (lambda m: _edit(m, ("shards", 0, "num_images"), True) or m, "'num_images'"),
    (lambda m: _edit(m, ("shards", 0), "tokens-00000.npy") or m, r"shards\[0\]"),
    (lambda m: _edit(m, ("shards",), {}) or m, "'shards'"),
    (lambda m: _edit(m, ("embed_dim",), -1) or m, "'embed_dim'"),
    (lambda m: _edit(m, ("shards", 0, "bytes"), "12"), "'bytes'"),
], ids=["int", "truncated", "file-int", "num-str", "num-60", "num-bool", "entry-str", "shards-dict",
        "dim-negative", "bytes-str"])
def test_a_manifest_of_the_wrong_types_is_refused_naming_the_field(config, wd, edit, field):
    m = hostile.manifest(wd, "site0")
    new = edit(m)
    path = hostile.write_manifest(wd, "site0", m if new is None else new)
    with pytest.raises(InputError, match=field) as e:
        load_all(config, wd)
    assert path in str(e.value)


def test_an_npy_header_claiming_56_tib_is_refused_without_allocating(config, wd):
    path = hostile.replace_shard(wd, "site0", 0, hostile.npy_with_header(
        (1 << 40, 16, 16), np.uint16, b"\0" * 64))
    with pytest.raises(InputError, match="header") as e:
        load_all(config, wd)
    assert path in str(e.value)


@pytest.mark.parametrize("payload", ["pickled", "garbage", "empty", "float64"])
def test_an_unreadable_npy_fails_that_site_and_verify_checks_the_next(config, wd, payload):
    shape = hostile.shard_tokens(wd, "site0").shape
    data = {"pickled": hostile.npy_bytes(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True),
            "garbage": os.urandom(300),
            "empty": b"",
            "float64": hostile.npy_bytes(np.zeros(shape, np.float64))}[payload]
    path = hostile.replace_shard(wd, "site0", 0, data)
    with pytest.raises(InputError) as e:
        load_all(config, wd)
    assert path in str(e.value)
    rc, text = run_verify(wd.root)
    lines = text.splitlines()
    assert rc == 1
    assert lines[0].startswith("FAIL") and "site0" in lines[0], text
    assert lines[1].startswith("OK") and "site1" in lines[1], text


# ---------------------------------------------------------------------------------------------
# Non-finite or absurd numbers, shapes of another model (case 6, 7)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
def test_tokens_that_are_not_finite_numbers_are_refused_before_training(config, wd, value):
    hostile.set_tokens(wd, "site1", value)
    rc, text = run_verify(wd.root)
    assert rc == 1 and "FAIL" in text and "site1" in text, text
    with pytest.raises(InputError, match="tokens"):
        parties.run_server(config, model_of(config), mode_of(config), wd)
    assert not os.path.exists(wd.checkpoints("server")), "refused only after training had started"


@pytest.mark.parametrize("field,value", [("embed_dim", 8), ("tokens_per_image", 20),
                                         ("tokens_per_image", 8)])
def test_shards_of_another_shape_than_the_model_are_refused(config, wd, field, value):
    m = hostile.manifest(wd, "site0")
    m[field] = value
    path = hostile.write_manifest(wd, "site0", m)
    with pytest.raises(InputError, match=f"'{field}' is {value}, expected") as e:
        load_all(config, wd)
    assert path in str(e.value)


# ---------------------------------------------------------------------------------------------
# Uploaded models (case 6, 8)
# ---------------------------------------------------------------------------------------------
def _load_upload(config, wd, site="site0"):
    model = model_of(config)
    return model_io.load_params(wd.upload(site), train.init_student_params(config, model), model)


def _params(config):
    return jax.device_get(train.init_student_params(config, model_of(config)))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "an-int", "wrong-shape", "missing-leaf",
                                  "nan", "1e30", "float16"])
def test_an_uploaded_model_that_is_not_this_model_is_refused_naming_the_file(config, wd, kind):
    good = flax.serialization.to_bytes(_params(config))
    p = _params(config)
    key_path = jax.tree_util.tree_flatten_with_path(p)[0][0][0]
    if kind in ("nan", "1e30", "wrong-shape", "float16", "missing-leaf"):
        def change(path, x):
            if path != key_path:
                return x
            x = np.array(x)
            if kind == "nan":
                x.flat[0] = np.nan
            elif kind == "1e30":
                x.flat[0] = 1e30
            elif kind == "wrong-shape":
                x = np.zeros(x.shape + (2,), x.dtype)
            elif kind == "float16":
                x = x.astype(np.float16)
            return x
        p = jax.tree_util.tree_map_with_path(change, p)
        if kind == "missing-leaf":
            del p["heads_0"]
    raw = {"garbage": os.urandom(500), "truncated": good[:len(good) // 2], "empty": b"",
           "an-int": flax.serialization.msgpack_serialize(7)}
    data = raw[kind] if kind in raw else flax.serialization.to_bytes(p)
    path = hostile.tamper_upload(wd, "site0", data)
    with pytest.raises(InputError) as e:
        _load_upload(config, wd)
    assert path in str(e.value)
    assert "Traceback" not in str(e.value)


def test_uploaded_weights_of_1e30_are_refused_before_the_merge_trains(config, wd):
    p = _params(config)
    p = jax.tree_util.tree_map(lambda x: np.full_like(np.asarray(x), 1e30), p)
    hostile.tamper_upload(wd, "site1", flax.serialization.to_bytes(p))
    c = config.copy_and_resolve_references()
    c.protocol, c.merge.data = "model_upload", "uploaded"
    with pytest.raises(InputError, match="site1"):
        model_upload.merge(c, model_of(c), mode_of(c), wd, num_steps=2)
    assert not os.path.exists(wd.checkpoints("server_merge"))


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"model": 5}', ""])
def test_a_model_description_that_is_not_json_is_refused(config, wd, text):
    path = os.path.join(wd.upload("site0"), model_io.META_FILE)
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(InputError) as e:
        _load_upload(config, wd)
    assert path in str(e.value)


@pytest.mark.parametrize("text", ["not json", "[]", '{"fingerprint": 5}'])
def test_a_head_description_that_is_not_json_is_refused(config, wd, text):
    path = os.path.join(wd.head, "head.json")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(InputError) as e:
        load_all(config, wd)
    assert path in str(e.value)
    rc, out = run_verify(wd.root)
    assert rc == 2 and path in out


def test_a_truncated_backbone_is_reported_with_its_path(config, tmp_path):
    model = model_of(config)
    p = _params(config)
    head = jax.device_get(parties.encrypt.vit.init_head(model, jax.random.key(0)))
    out = str(tmp_path / "backbone")
    model_io.save_backbone(out, head, p["body"], model)
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if "params" in r),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.raises(InputError, match="cannot be read") as e:
        model_io.load_backbone(out, model)
    assert os.path.join(out, "params") in str(e.value)
    # the innermost error (the byte range past the truncated end), not TensorStore's wrappers
    assert "OUT_OF_RANGE" in str(e.value) and "TensorStore details" not in str(e.value)
