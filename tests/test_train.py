"""Tests for msd_jax.training.train: Orbax checkpoints, kill-and-resume, divergence, batches, metrics.

A tiny model (16 tokens of 16 dims, one block, no local views) keeps each compile to seconds;
the runs every test needs are made once per module.
"""
import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from msd_jax.training import train
from msd_jax.training import batches
from msd_jax.training.batches import BatchOrder, batch_size_for
from msd_jax.training.checkpoints import CheckpointMismatchError
from msd_jax.training.metrics import TrainingDivergedError
from conftest import model_of, tiny_demo_config

N, T, D = 10, 16, 16
TOTAL, EVERY, STOP = 6, 2, 2   # batch 4 of 10 -> 2 steps/epoch: the run spans 3 epochs


def make_config(**overrides):
    c = tiny_demo_config(embed_dim=D)
    c.msd.num_local = 0
    c.train.update(batch_size=4, log_every=EVERY, checkpoint_every=EVERY, keep_checkpoints=3)
    for k, v in overrides.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def good_tokens():
    return np.random.default_rng(0).normal(size=(N, T, D)).astype(np.float32)


def run(config, ckpt_dir, tokens=None, total=TOTAL, metrics=None, logs=None, **kw):
    model = model_of(config)
    return train.train(config, model, party="server", tokens=good_tokens() if tokens is None else tokens,
                       init_params=train.init_student_params(config, model), ckpt_dir=str(ckpt_dir),
                       metrics_path=None if metrics is None else str(metrics), total_steps=total,
                       log=(logs.append if logs is not None else (lambda *_: None)), **kw)


def leaves(state):
    return jax.tree_util.tree_leaves_with_path(
        {"step": state.step, "params": state.params, "ema": state.ema_params,
         "opt": state.opt_state, "center": state.center})


def assert_same_state(a, b, atol=0.0):
    la, lb = leaves(a), leaves(b)
    assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
    assert len(la) > 10
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        if atol:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def saved_steps(ckpt_dir):
    with ocp.CheckpointManager(os.path.abspath(str(ckpt_dir))) as m:
        return list(m.all_steps())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run stopped at STOP then resumed (snapshot kept at STOP)."""
    root = tmp_path_factory.mktemp("train_runs")
    cfg = make_config()
    out = {"root": root, "cfg": cfg}
    out["full_logs"] = []
    out["full"] = run(cfg, root / "full", metrics=root / "full.jsonl", logs=out["full_logs"])
    out["stopped"] = run(cfg, root / "interrupted", metrics=root / "interrupted.jsonl", stop_at=STOP)
    shutil.copytree(root / "interrupted", root / "snapshot_at_stop")
    out["resume_logs"] = []
    out["resumed"] = run(cfg, root / "interrupted", metrics=root / "interrupted.jsonl",
                         logs=out["resume_logs"])
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------
def test_full_run_trains_and_checkpoints(runs):
    full = runs["full"]
    assert int(full.step) == TOTAL
    init = train.init_student_params(runs["cfg"], model_of(runs["cfg"]))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(init))]
    assert sum(moved) > len(moved) // 2  # training changed the student
    assert saved_steps(runs["root"] / "full") == [2, 4, 6]
    assert any("training" in m for m in runs["full_logs"])


def test_kill_and_resume_equals_uninterrupted(runs):
    assert int(runs["stopped"].step) == STOP
    assert saved_steps(runs["root"] / "snapshot_at_stop") == [STOP]
    assert any("resumed from" in m and f"step {STOP}/{TOTAL}" in m for m in runs["resume_logs"])
    assert int(runs["resumed"].step) == TOTAL
    assert_same_state(runs["resumed"], runs["full"], atol=1e-6)


def test_restore_returns_identical_state_without_training(runs, tmp_path):
    d = tmp_path / "full"
    shutil.copytree(runs["root"] / "full", d)
    logs = []
    # NaN tokens: any training step here would raise TrainingDivergedError.
    poisoned = np.full((N, T, D), np.nan, np.float32)
    again = run(runs["cfg"], d, tokens=poisoned, logs=logs, metrics=tmp_path / "m.jsonl")
    assert_same_state(again, runs["full"])
    assert len(logs) == 1 and "resumed" in logs[0] and f"step {TOTAL}/{TOTAL}" in logs[0]
    assert not os.path.exists(tmp_path / "m.jsonl") or os.path.getsize(tmp_path / "m.jsonl") == 0
    assert saved_steps(d) == [2, 4, 6]


def test_restore_of_stopped_snapshot(runs, tmp_path):
    d = tmp_path / "snap"
    shutil.copytree(runs["root"] / "snapshot_at_stop", d)
    again = run(runs["cfg"], d, stop_at=STOP)
    assert_same_state(again, runs["stopped"])


@pytest.mark.parametrize("field,value", [("embed_dim", 24), ("out_dim", 48), ("depth", 2)])
def test_checkpoint_of_another_model(runs, tmp_path, field, value):
    d = tmp_path / "ck"
    shutil.copytree(runs["root"] / "full", d)
    cfg = make_config(**{f"model.{field}": value})
    with pytest.raises(CheckpointMismatchError) as e:
        run(cfg, d)
    msg = str(e.value)
    assert f"model.{field}" in msg and str(value) in msg and str(d) in msg
    assert saved_steps(d) == [2, 4, 6]


def test_checkpoint_resumes_under_another_compute_precision(runs, tmp_path):
    """dtype / matmul_dtype say how the model computes, not what it is: a run may resume elsewhere."""
    d = tmp_path / "ck"
    shutil.copytree(runs["root"] / "full", d)
    other = "float32" if runs["cfg"].model.matmul_dtype == "bfloat16" else "bfloat16"
    logs = []
    again = run(make_config(**{"model.matmul_dtype": other}), d, logs=logs)
    assert_same_state(again, runs["full"])  # nothing left to train: the checkpoint as it was
    assert "resumed" in logs[0] and f"step {TOTAL}/{TOTAL}" in logs[0]


def test_checkpoint_of_another_budget(runs, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(runs["root"] / "full", d)
    with pytest.raises(CheckpointMismatchError, match="total_steps"):
        run(runs["cfg"], d, total=TOTAL + 2)
    with pytest.raises(CheckpointMismatchError, match="num_heads_out"):
        train.train(runs["cfg"], model_of(runs["cfg"]), party="server", tokens=good_tokens(),
                    init_params=train.init_student_params(runs["cfg"], model_of(runs["cfg"]), 2), ckpt_dir=str(d),
                    total_steps=TOTAL, num_heads_out=2, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------
def test_nan_tokens_after_good_steps_keep_the_last_checkpoint(runs, tmp_path):
    d = tmp_path / "nan"
    shutil.copytree(runs["root"] / "snapshot_at_stop", d)
    cfg = make_config(**{"train.checkpoint_every": 1, "train.log_every": 100})
    tokens = good_tokens()
    tokens[:, 3, 5] = np.nan
    with pytest.raises(TrainingDivergedError) as e:
        run(cfg, d, tokens=tokens)
    assert f"step {STOP + 1}" in str(e.value) and str(d) in str(e.value)
    assert saved_steps(d) == [STOP]
    # The checkpoint still restores to exactly the state of step STOP ...
    restored = run(cfg, d, stop_at=STOP)
    assert_same_state(restored, runs["stopped"])
    # ... and training can go on from it with good data to the uninterrupted result.
    resumed = run(cfg, d)
    assert_same_state(resumed, runs["full"], atol=1e-6)


def test_nan_tokens_from_the_start(tmp_path):
    cfg = make_config(**{"train.checkpoint_every": 1})
    with pytest.raises(TrainingDivergedError, match="step 1"):
        run(cfg, tmp_path / "c", tokens=np.full((N, T, D), np.nan, np.float32))
    assert saved_steps(tmp_path / "c") == []


def test_huge_learning_rate_diverges(tmp_path):
    cfg = make_config(**{"optim.lr": 1e30, "train.checkpoint_every": 1, "train.log_every": 1})
    d = tmp_path / "lr"
    with pytest.raises(TrainingDivergedError, match="non-finite") as e:
        run(cfg, d, metrics=tmp_path / "m.jsonl")
    bad_step = int(str(e.value).split("at step ")[1].split(":")[0])
    assert 1 <= bad_step <= TOTAL
    steps = saved_steps(d)
    # Every step before the bad one (as many as keep_checkpoints), none after.
    assert steps == list(range(1, bad_step))[-3:]
    if steps:
        restored = run(make_config(**{"train.checkpoint_every": 1}), d, stop_at=0)
        assert int(restored.step) == steps[-1]
        for _, x in leaves(restored):
            assert np.all(np.isfinite(np.asarray(x, np.float64)))
    lines = [json.loads(l) for l in open(tmp_path / "m.jsonl")]
    assert [l["step"] for l in lines] == list(range(1, bad_step))  # the diverged step is not logged


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def test_batch_size_for():
    assert batch_size_for(64, 1000, 1) == 64
    assert batch_size_for(64, 24, 1) == 24
    assert batch_size_for(16, 10, 4) == 8
    assert batch_size_for(8, 8, 8) == 8
    with pytest.raises(ValueError, match="batch_size=6") as e:
        batch_size_for(6, 100, 4)
    assert "4 devices" in str(e.value)
    with pytest.raises(ValueError, match="3 examples"):
        batch_size_for(8, 3, 4)
    with pytest.raises(ValueError):
        batch_size_for(8, 0, 1)


@pytest.mark.parametrize("n,b", [(12, 4), (10, 3), (7, 7)])
def test_batch_order_epochs(n, b):
    order = BatchOrder(jax.random.key(5), n, b)
    spe = n // b
    assert order.steps_per_epoch == spe
    epochs = []
    for e in range(3):
        ids = np.concatenate([order(e * spe + s) for s in range(spe)])
        assert all(len(order(e * spe + s)) == b for s in range(spe))
        assert ids.dtype == np.int32
        assert len(set(ids.tolist())) == spe * b  # no example twice in an epoch
        assert ids.min() >= 0 and ids.max() < n
        if n % b == 0:
            np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # every example once
        epochs.append(ids)
    if n > 3:
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    # Deterministic: a fresh instance, queried out of order, gives the same batches.
    other = BatchOrder(jax.random.key(5), n, b)
    for step in reversed(range(3 * spe)):
        np.testing.assert_array_equal(other(step), np.concatenate(epochs)[step * b:(step + 1) * b])
    # Another key, another order.
    third = BatchOrder(jax.random.key(6), n, b)
    if n > 3:
        assert not np.array_equal(np.concatenate([third(s) for s in range(3 * spe)]),
                                  np.concatenate(epochs))


def old_order(key, n, b, step):
    """The single-stream order every run used before row groups: epoch e is
    permutation(fold_in(key, e), n), cut into batches of b."""
    epoch, pos = divmod(step, n // b)
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))[pos * b:(pos + 1) * b]


@pytest.mark.parametrize("n,b", [(12, 4), (10, 3), (100, 16)])
def test_one_row_group_is_the_single_stream_order(n, b):
    order = BatchOrder(jax.random.key(5), n, b, groups=1)
    assert order.steps_per_epoch == n // b
    for step in range(3 * (n // b) + 1):
        np.testing.assert_array_equal(order(step), old_order(jax.random.key(5), n, b, step))


def test_row_groups_against_a_numpy_reference():
    """14 rows in 3 groups: sizes 5, 5, 4 (array_split: the first 14 % 3 = 2 groups one longer),
    batch 6 = 2 rows from each group, an epoch = 4 // 2 = 2 steps (the smallest group)."""
    key, n, b, g = jax.random.key(7), 14, 6, 3
    order = BatchOrder(key, n, b, groups=g)
    np.testing.assert_array_equal(order.bounds, [0, 5, 10, 14])
    assert order.steps_per_epoch == 2
    starts, sizes = [0, 5, 10], [5, 5, 4]
    for step in range(7):
        epoch, pos = divmod(step, 2)
        want = []
        for grp in range(g):
            perm = np.asarray(jax.random.permutation(
                jax.random.fold_in(jax.random.fold_in(key, grp), epoch), sizes[grp]))
            want += [starts[grp] + int(r) for r in perm[2 * pos:2 * pos + 2]]
        got = order(step)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    # within an epoch no row twice; each group's slots hold that group's rows only
    epoch0 = np.concatenate([order(0), order(1)])
    assert len(set(epoch0.tolist())) == 12
    for grp in range(g):
        block = np.concatenate([order(s)[2 * grp:2 * grp + 2] for s in range(2)])
        assert block.min() >= starts[grp] and block.max() < starts[grp] + sizes[grp]
    # 3 processes: process p's block of every batch is its group's rows; 1 process owns them all
    for p in range(3):
        lo, hi = order.process_rows(p, 3)
        assert (lo, hi) == (starts[p], starts[p] + sizes[p])
        for step in range(4):
            block = np.array_split(order(step), 3)[p]
            assert block.min() >= lo and block.max() < hi
    assert order.process_rows(0, 1) == (0, 14)
    # another group count, another order; a fresh instance, queried backwards, the same
    assert not np.array_equal(order(0), BatchOrder(key, n, b, groups=1)(0))
    again = BatchOrder(key, n, b, groups=g)
    for step in reversed(range(5)):
        np.testing.assert_array_equal(again(step), order(step))


def test_row_groups_of_the_config():
    assert batches.row_groups_for(0, 1) == 1 and batches.row_groups_for(0, 4) == 4
    assert batches.row_groups_for(2, 1) == 2 and batches.row_groups_for(4, 2) == 4
    for requested, procs in ((3, 2), (1, 2), (-1, 1)):
        with pytest.raises(ValueError, match=r"config\.distributed\.row_groups"):
            batches.row_groups_for(requested, procs)
    assert batches.process_rows(10, 4, 1, 2) == (6, 10)      # groups 3, 3, 2, 2: process 1 owns 2, 3
    with pytest.raises(ValueError, match="row_groups"):
        batches.process_rows(10, 3, 0, 2)
    with pytest.raises(ValueError, match="row_groups"):
        batches.group_bounds(3, 4)
    assert batch_size_for(8, 32, 4, 2) == 8
    assert batch_size_for(8, 13, 1, 2) == 8
    assert batch_size_for(8, 5, 1, 2) == 4                       # groups of 3 and 2: 2 rows each
    assert batch_size_for(12, 100, 4, 6) == 12
    assert batch_size_for(12, 20, 4, 6) == 12                    # 20 // 6 * 6 = 18, lcm(4, 6) = 12
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the 4 row groups \(config\.distributed\.row_groups\)"):
        batch_size_for(6, 100, 2, 4)


def test_party_key_differs_by_party_and_seed():
    kd = lambda k: np.asarray(jax.random.key_data(k))
    assert np.array_equal(kd(train.party_key(0, "a")), kd(train.party_key(0, "a")))
    assert not np.array_equal(kd(train.party_key(0, "a")), kd(train.party_key(0, "b")))
    assert not np.array_equal(kd(train.party_key(0, "a")), kd(train.party_key(1, "a")))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "interrupted"])
def test_metrics_jsonl(runs, name):
    lines = [json.loads(l) for l in open(runs["root"] / f"{name}.jsonl")]
    assert [l["step"] for l in lines] == [2, 4, 6]
    for l in lines:
        assert l["party"] == "server"
        for k in ("loss", "teacher_entropy", "images_per_s", "lr"):
            assert isinstance(l[k], float) and math.isfinite(l[k]), k
        assert l["images_per_s"] > 0
        # Teacher entropy of a distribution over out_dim prototypes: 0 <= H <= log(out_dim).
        assert 0.0 <= l["teacher_entropy"] <= math.log(32) + 1e-5
        assert l["loss"] > 0
    # Both runs log the same losses for the same steps (resume replays exactly).
    if name == "interrupted":
        full = [json.loads(l) for l in open(runs["root"] / "full.jsonl")]
        np.testing.assert_allclose([l["loss"] for l in lines], [l["loss"] for l in full], atol=1e-6)
