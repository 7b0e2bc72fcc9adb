"""Server training on jax.distributed, for real: two `python -m msd_jax.main --mode server`
processes on 127.0.0.1 (CPU devices, gloo collectives), each with two devices, against one process
with one device. Every run draws its batches from 2 row groups (the 2-process runs by default, one
per process; the 1-process runs by config.distributed.row_groups=2), so every topology trains on the
same batches, and each of the 2 processes loads only the shards holding its rows.

One encrypted work directory is made once; every server run trains on a copy of it. Checkpoints are
taken every 2 of 4 steps. A run resumed from another topology's step-2 checkpoint trains steps 3-4
and must end where the 1 x 1 reference ends: 2 x 2 -> 1 x 1, 1 x 1 -> 2 x 2, 1 x 1 -> 1 x 2, and a
final checkpoint of 1 x 2 restored on 1 x 1. A process killed mid-run makes the other exit with
JAX's error naming it.

Tolerance: every topology computes the same sums over the same rows of the same global batch, in
another order (per-device partial sums, then the all-reduce across devices and processes); float32
rounding of that order, carried through a few Adam steps, stays below 1e-4 relative to
max(1, |value|) on losses and parameters (measured: 2.4e-7 on the losses, 1.3e-8 on the
backbone). Other batches (the 1-process run with 1 row group: 0.13), a wrong restored state or a
skipped step move them by 1e-2 or more.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import class_folder

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TOL = 1e-4
STEPS = 4
GROUPS = 2
SHARD_SIZE = 4

ARGS = [
    "--config", "configs/demo.py:quick", "--config.data.name=folders",
    "--config.model.image_size=16", "--config.model.patch_size=4", "--config.model.embed_dim=16",
    "--config.model.num_heads=2", "--config.model.out_dim=32", "--config.model.head_hidden_dim=16",
    "--config.model.head_bottleneck_dim=8", "--config.model.matmul_dtype=float32",
    "--config.msd.num_local=0", "--config.train.batch_size=8", f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2",
]


def _env(tmp, devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _check(proc, out, err):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-5000:]}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(tmp, wd, processes, devices, *extra):
    """`--mode server` on `wd` by `processes` processes of `devices` CPU devices each."""
    args = [sys.executable, "-m", "msd_jax.main", *ARGS, f"--workdir={wd}", "--mode=server", *extra]
    if processes > 1:  # config.distributed.row_groups = 0: one row group per process
        port = _free_port()
        args_of = [args + [f"--config.distributed.coordinator=127.0.0.1:{port}",
                           f"--config.distributed.num_processes={processes}",
                           f"--config.distributed.process_id={i}",
                           "--config.distributed.timeout_s=120"] for i in range(processes)]
    else:
        args_of = [args + [f"--config.distributed.row_groups={GROUPS}"]]
    procs = [subprocess.Popen(a, cwd=REPO, env=_env(tmp, devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args_of]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        _check(p, out, err)
    return [out for out, _ in outputs]


def losses(wd) -> dict:
    with open(os.path.join(wd, "metrics", "server.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def backbone(wd) -> dict:
    """{name: array} of the backbone written by --mode server, read with Orbax only."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(wd, "backbone", "params"))
    flat = {}
    for path, leaf in _flatten(tree):
        flat[path] = np.asarray(leaf, np.float64)
    return flat


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    else:
        yield prefix, tree


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(1.0, np.abs(b[k])))) for k in a)


def loss_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / max(1.0, abs(b[s])) for s in a)


def copy_at(src, dst, step):
    """A copy of work directory `src` as its run stood at checkpoint `step`: later checkpoints,
    the backbone and the metrics lines are removed."""
    shutil.copytree(src, dst)
    ckpt = os.path.join(dst, "checkpoints", "server")
    for name in os.listdir(ckpt):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(ckpt, name))
    shutil.rmtree(os.path.join(dst, "backbone"), ignore_errors=True)
    os.remove(os.path.join(dst, "metrics", "server.jsonl"))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    # 16 and 12 images in shards of 4: the two processes' rows [0, 14) and [14, 28) split a shard
    sites = [class_folder(tmp / "site_a", 1, 8), class_folder(tmp / "site_b", 2, 6)]
    base = tmp / "encrypted"
    proc = subprocess.run([sys.executable, "-m", "msd_jax.main", *ARGS, f"--workdir={base}", "--mode=encrypt",
                           f"--config.data.site_dirs={','.join(sites)}", f"--config.data.test_dir={sites[0]}",
                           f"--config.data.cache_dir={tmp / 'tfds'}", f"--config.encrypt.shard_size={SHARD_SIZE}"],
                          cwd=REPO, env=_env(tmp, 1), capture_output=True, text=True, timeout=600)
    _check(proc, proc.stdout, proc.stderr)
    out = {"tmp": tmp, "base": base}
    out["ref"] = str(shutil.copytree(base, tmp / "ref_1x1"))
    out["ref_stdout"] = server(tmp, out["ref"], 1, 1)
    out["two"] = str(shutil.copytree(base, tmp / "two_2x2"))
    out["two_stdout"] = server(tmp, out["two"], 2, 2)
    return out


def test_two_processes_train_as_one(runs):
    ref, two = runs["ref"], runs["two"]
    assert sorted(losses(ref)) == list(range(1, STEPS + 1))
    d_loss, d_params = loss_diff(losses(two), losses(ref)), max_diff(backbone(two), backbone(ref))
    print(f"2 processes x 2 devices vs 1 x 1: max loss diff {d_loss:.3g}, max backbone diff {d_params:.3g}")
    assert d_loss < TOL and d_params < TOL
    # the loss differs from step to step far more than the tolerance: the comparison can fail
    assert max(losses(ref).values()) - min(losses(ref).values()) > 100 * TOL
    for out in runs["two_stdout"]:
        assert "on 4 cpu device(s)" in out


def manifest(wd, site) -> dict:
    with open(os.path.join(wd, "shards", site, "manifest.json")) as f:
        return json.load(f)


def expected_reads(wd, process, processes) -> str:
    """What process `process` of `processes` must report loading, from the manifests alone: its
    rows (its row groups of the sites' rows concatenated in sorted order: np.array_split of the
    rows into GROUPS groups), the rows of each site they cover, the shards holding those and their
    bytes."""
    sites = sorted(os.listdir(os.path.join(wd, "shards")))
    manifests = [manifest(wd, s) for s in sites]
    total = sum(m["num_images"] for m in manifests)
    groups = np.array_split(np.arange(total), GROUPS)
    mine = np.concatenate(groups[process * GROUPS // processes:(process + 1) * GROUPS // processes])
    lo, hi = int(mine[0]), int(mine[-1]) + 1
    reads, files, nbytes, offset = [], 0, 0, 0
    for site, m in zip(sites, manifests):
        a, b = max(lo - offset, 0), min(hi - offset, m["num_images"])
        offset += m["num_images"]
        if a >= b:
            continue
        ends = np.cumsum([e["num_images"] for e in m["shards"]])
        read = [i for i, end in enumerate(ends) if end - m["shards"][i]["num_images"] < b and end > a]
        reads.append(f"{site} rows [{a}, {b}) from shards {read[0]}-{read[-1]}")
        files += len(read)
        nbytes += sum(m["shards"][i]["bytes"] for i in read)
    return (f"[server] process {process} of {processes} loads rows [{lo}, {hi}) of {total}: "
            f"{'; '.join(reads)} ({files} shard files, {nbytes} bytes), {GROUPS} row groups")


def test_each_process_loads_only_its_rows(runs):
    all_files = sum(len(manifest(runs["base"], s)["shards"]) for s in os.listdir(os.path.join(runs["base"], "shards")))
    for p, out in enumerate(runs["two_stdout"]):
        want = expected_reads(runs["two"], p, 2)
        print(want)
        assert want in out, out[-3000:]
        assert int(want.split("(")[1].split(" shard files")[0]) < all_files  # a share, not all
    one = expected_reads(runs["ref"], 0, 1)
    assert f"({all_files} shard files" in one and one in runs["ref_stdout"][0]


def test_only_process_zero_writes_the_shared_files(runs):
    two = runs["two"]
    with open(os.path.join(two, "metrics", "server.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, STEPS + 1))  # each line once
    assert len(os.listdir(os.path.join(two, "tensorboard", "server"))) == 1
    assert os.path.isfile(os.path.join(two, "records", "server.json"))
    assert os.path.isfile(os.path.join(two, "backbone", "backbone.json"))


def resume_from_step_2(runs, source, processes, devices) -> str:
    """`source`'s run resumed from its step-2 checkpoint by `processes` x `devices`: steps 3-4 and
    the backbone match the reference."""
    tmp = runs["tmp"]
    wd = str(copy_at(runs[source], tmp / f"resume_{source}_{processes}x{devices}", 2))
    outs = server(tmp, wd, processes, devices)
    assert "resumed from" in outs[0] and "at step 2/4" in outs[0]
    got = losses(wd)
    assert sorted(got) == [3, 4]
    assert loss_diff(got, {s: losses(runs["ref"])[s] for s in got}) < TOL
    assert max_diff(backbone(wd), backbone(runs["ref"])) < TOL
    return wd


@pytest.mark.parametrize("source, processes, devices", [
    ("two", 1, 1),   # 2 processes x 2 devices -> 1 x 1
    ("ref", 2, 2),   # 1 x 1 -> 2 processes x 2 devices
])
def test_resume_on_another_topology(runs, source, processes, devices):
    resume_from_step_2(runs, source, processes, devices)


def test_one_process_of_two_devices_and_back_to_one(runs):
    """1 x 1 -> 1 x 2 from step 2; then that run's final checkpoint (written by 1 process x 2
    devices) restored on 1 x 1: nothing left to train, the backbone is the checkpoint's."""
    wide = resume_from_step_2(runs, "ref", 1, 2)
    wd = runs["tmp"] / "restore_1x2_on_1x1"
    shutil.copytree(wide, wd)
    shutil.rmtree(wd / "backbone")
    out = server(runs["tmp"], wd, 1, 1)[0]
    assert "at step 4/4" in out
    assert max_diff(backbone(str(wd)), backbone(wide)) == 0.0


def test_a_process_that_dies_stops_the_other(runs):
    """Process 1 killed once training began: process 0 exits with an error naming the lost task
    (after at most distributed.heartbeat_timeout_s), instead of waiting for it for ever."""
    tmp = runs["tmp"]
    wd = str(shutil.copytree(runs["base"], tmp / "killed"))
    port = _free_port()
    args = [sys.executable, "-u", "-m", "msd_jax.main", *ARGS, f"--workdir={wd}", "--mode=server",
            f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            "--config.distributed.heartbeat_timeout_s=5"]
    procs = [subprocess.Popen(args + [f"--config.distributed.process_id={i}"], cwd=REPO, env=_env(tmp, 2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        for line in procs[1].stdout:
            if "[server] training" in line:
                procs[1].kill()
                break
        out = procs[0].communicate(timeout=300)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0, out[-3000:]
    assert "The following tasks are unhealthy (stopped sending heartbeats)" in out, out[-3000:]
