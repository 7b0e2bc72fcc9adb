"""End-to-end tests of `python -m msd_jax.main` in a subprocess, on small ImageFolder trees.

Two classes drawn so that they are separable (bright vs dark, with noise). The model is shrunk
below configs/demo.py:quick with --config overrides; a JAX compilation cache shared by the
subprocesses of this module keeps the repeated compiles cheap.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SITES = ("hospital_a", "hospital_b")
PER_CLASS = 6  # images per class per folder -> 12 per site

SMALL = [
    "--config.model.image_size=16", "--config.model.patch_size=4", "--config.model.embed_dim=16",
    "--config.model.num_heads=2", "--config.model.out_dim=32", "--config.model.head_hidden_dim=16",
    "--config.model.head_bottleneck_dim=8", "--config.msd.num_local=0",
    "--config.train.batch_size=8", "--config.eval.linear_steps=20", "--config.eval.knn_k=5",
]


def _write_class_images(folder, cls, n, seed, size=20):
    rng = np.random.default_rng(seed)
    os.makedirs(folder / cls, exist_ok=True)
    base = 190 if cls == "bright" else 60
    for i in range(n):
        arr = np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").save(folder / cls / f"img{i:02d}.png")


def make_folder(folder, seed, n=PER_CLASS):
    for j, cls in enumerate(("bright", "dark")):
        _write_class_images(folder, cls, n, seed * 10 + j)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    sites = [str(make_folder(root / name, i + 1)) for i, name in enumerate(SITES)]
    test = str(make_folder(root / "test", 9))
    return {"root": root, "sites": sites, "test": test, "cache": str(root / "tfds_cache"),
            "jax_cache": str(root / "jax_cache")}


def cli(tree, workdir, *extra, sites=None, test=None, timeout=300):
    args = [sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick",
            f"--workdir={workdir}", "--config.data.name=folders",
            f"--config.data.site_dirs={','.join(sites or tree['sites'])}",
            f"--config.data.test_dir={test or tree['test']}",
            f"--config.data.cache_dir={tree['cache']}", *SMALL, *extra]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tree["jax_cache"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n" \
                                 f"STDERR:\n{proc.stderr[-5000:]}"
    return proc


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def count_images(folder):
    return sum(len(files) for _, _, files in os.walk(folder))


def check_probe(result, min_knn_acc):
    for probe in ("knn", "linear"):
        for metric in ("accuracy", "auc"):
            v = result[probe][metric]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (probe, metric, v)
    assert result["knn"]["accuracy"] >= min_knn_acc


def check_report(tree, wd, proc, protocol):
    last = proc.stdout.strip().splitlines()[-1]
    report_path = os.path.join(str(wd), "report.json")
    assert os.path.isabs(last) and last == os.path.abspath(report_path)
    with open(last) as f:
        report = json.load(f)
    assert report["protocol"] == protocol
    names = [s["name"] for s in report["sites"]]
    assert names == sorted(SITES)
    for s in report["sites"]:
        assert s["num_images"] == count_images(tree["root"] / s["name"]) == 2 * PER_CLASS
    # Bright vs dark is separable from the token means alone: the probes must find it.
    check_probe(report["eval"], 0.9)
    check_probe(report["baseline_random_init"], 0.5)
    assert report["data"]["num_test"] == 2 * PER_CLASS
    assert report["data"]["num_labelled_train"] == 2 * PER_CLASS * len(SITES)
    assert report["data"]["class_names"] == ["bright", "dark"]
    return report


@pytest.fixture(scope="module")
def token_run(tree):
    wd = tree["root"] / "wd_token"
    proc = ok(cli(tree, wd, "--config.train.num_steps=3"))
    return wd, proc


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------
def test_token_upload_all(tree, token_run):
    wd, proc = token_run
    report = check_report(tree, wd, proc, "token_upload")
    for s in report["sites"]:
        shard_dir = wd / "shards" / s["name"]
        files = sorted(os.listdir(shard_dir))
        assert "manifest.json" in files and all(f.endswith(".npy") for f in files if f != "manifest.json")
        assert s["bytes_uploaded"] == dir_bytes(shard_dir)
        # 12 images x 16 tokens x 16 dims x 2 bytes (bfloat16) is the payload.
        assert s["bytes_uploaded"] > 12 * 16 * 16 * 2
    assert set(report["timing_s"]) >= {"encrypt", "server", "eval"}
    assert all(v >= 0 for v in report["timing_s"].values())
    assert os.path.isdir(wd / "backbone") and os.path.isfile(wd / "head" / "head.json")


def test_num_steps_override_is_honoured(token_run):
    wd, _ = token_run
    lines = [json.loads(l) for l in open(wd / "metrics" / "server.jsonl")]
    assert lines[-1]["step"] == 3
    assert max(l["step"] for l in lines) == 3
    report = json.load(open(wd / "report.json"))
    assert report["config"]["train"]["num_steps"] == 3
    assert report["config"]["model"]["embed_dim"] == 16


def test_parties_run_separately(tree, token_run, tmp_path):
    wd = tmp_path / "wd_parties"
    ok(cli(tree, wd, "--config.train.num_steps=3", "--mode=encrypt"))
    assert sorted(os.listdir(wd / "shards")) == sorted(SITES)
    assert not os.path.exists(wd / "backbone")
    ok(cli(tree, wd, "--config.train.num_steps=3", "--mode=server"))
    assert not os.path.exists(wd / "report.json")
    proc = ok(cli(tree, wd, "--config.train.num_steps=3", "--mode=eval"))
    report = check_report(tree, wd, proc, "token_upload")
    for s in report["sites"]:
        assert s["bytes_uploaded"] == dir_bytes(wd / "shards" / s["name"])
    # Seeded keys: the same shards, byte for byte, as the all-in-one run ...
    all_wd, _ = token_run
    for site in SITES:
        for f in os.listdir(wd / "shards" / site):
            assert (wd / "shards" / site / f).read_bytes() == (all_wd / "shards" / site / f).read_bytes()
    # ... and the same evaluation.
    ref = json.load(open(all_wd / "report.json"))
    for key in ("eval", "baseline_random_init"):
        for probe in ("knn", "linear"):
            for metric in ("accuracy", "auc"):
                assert report[key][probe][metric] == pytest.approx(ref[key][probe][metric], abs=1e-6)
    assert set(report["timing_s"]) >= {"encrypt", "server", "eval"}


def test_setup_mode_needs_no_images_and_writes_the_round_files(tree, token_run, tmp_path):
    """--mode setup (the server before the round) reads no folders: the config check does not ask
    for data.site_dirs / test_dir; it writes the same head as the all-in-one run, and initial/."""
    wd = tmp_path / "wd_setup"
    args = [sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick",
            f"--workdir={wd}", "--mode=setup", "--config.data.name=folders",
            "--config.protocol=model_upload", *SMALL]
    proc = ok(subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")))
    assert "send it to every site" in proc.stdout
    all_wd, _ = token_run
    for f in ("head.msgpack", "head.json"):
        assert (wd / "head" / f).read_bytes() == (all_wd / "head" / f).read_bytes()
    assert sorted(os.listdir(wd / "initial")) == ["model.json", "params.msgpack"]
    assert not os.path.exists(wd / "shards") and not os.path.exists(wd / "backbone")
    # The modes that read images still ask for the folders, naming the key.
    bad = subprocess.run(args[:6] + ["--mode=encrypt", "--config.data.name=folders", *SMALL], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "config.data.site_dirs" in bad.stderr


def test_model_upload_all(tree, tmp_path):
    wd = tmp_path / "wd_model"
    proc = ok(cli(tree, wd, "--config.protocol=model_upload", "--config.merge.data=uploaded",
                  "--config.train.site_steps=2", "--config.merge.num_steps=2"))
    report = check_report(tree, wd, proc, "model_upload")
    for s in report["sites"]:
        upload = wd / "uploads" / s["name"]
        assert sorted(os.listdir(upload)) == ["model.json", "params.msgpack"]
        # Uploaded: the site's model plus its token shards (the server distils on them).
        assert s["bytes_uploaded"] == dir_bytes(upload) + dir_bytes(wd / "shards" / s["name"])
        steps = [json.loads(l)["step"] for l in open(wd / "metrics" / f"{s['name']}.jsonl")]
        assert steps[-1] == 2
    merge_steps = [json.loads(l)["step"] for l in open(wd / "metrics" / "server_merge.jsonl")]
    assert merge_steps[-1] == 2
    assert set(report["timing_s"]) >= {"encrypt", "site_training", "server", "eval"}


# ---------------------------------------------------------------------------------------------
# Bad configs and bad data
# ---------------------------------------------------------------------------------------------
def test_unknown_config_key(tree, tmp_path):
    proc = cli(tree, tmp_path / "wd", "--config.train.nope=1")
    assert proc.returncode != 0
    assert "nope" in proc.stderr
    assert not os.path.exists(tmp_path / "wd" / "report.json")


def test_bad_protocol(tree, tmp_path):
    proc = cli(tree, tmp_path / "wd", "--config.protocol=bogus")
    assert proc.returncode != 0
    assert "config.protocol" in proc.stderr and "bogus" in proc.stderr


def test_empty_site_folder(tree, tmp_path):
    empty = tmp_path / "empty_site"
    for cls in ("bright", "dark"):
        os.makedirs(empty / cls)
    proc = cli(tree, tmp_path / "wd", sites=[tree["sites"][0], str(empty)],
               timeout=120)
    assert proc.returncode != 0
    assert str(empty) in proc.stderr
    assert "empty" in proc.stderr
    assert not os.path.exists(tmp_path / "wd" / "shards")


def test_corrupt_image(tree, tmp_path):
    site = tmp_path / "site_with_bad_file"
    shutil.copytree(tree["sites"][1], site)
    bad = site / "dark" / "img_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    proc = cli(tree, tmp_path / "wd", sites=[tree["sites"][0], str(site)], timeout=120)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr
    assert not os.path.exists(tmp_path / "wd" / "shards")
