"""Tests for msd_jax.training.loop, the one loop every trainer runs.

A toy step (no model) whose state is the running sum of every example value it saw, times a
replicated step argument: with 8 examples in batches of 4 an epoch sums 0 + ... + 7 = 28, so the
expected state and losses follow from arithmetic, not from the loop. The last test runs a real
trainer (the centralized MSD baseline) through the loop for its TensorBoard events and resume.
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from msd_jax.config import base_config
from msd_jax.models import vit
from msd_jax.msd import step as step_lib
from msd_jax.protocols import centralized
from msd_jax.training import batches, checkpoints, loop, metrics, tensorboard
from conftest import SHORT_MSD, model_of, tiny_config
from test_baselines import BASELINES, _images
from test_tensorboard import read_scalars

N, B, TOTAL, SCALE = 8, 4, 6, 2.0
EPOCH_SUM = sum(range(N))  # 28


@flax.struct.dataclass
class Counter:
    step: jax.Array
    total: jax.Array


def toy_config(**train):
    c = base_config()
    c.train.update({**dict(log_every=1, checkpoint_every=2, keep_checkpoints=5), **train})
    return c


def toy_step(mesh, nan_from: int = 10 ** 9):
    """Adds scale * sum(batch values); the loss is the batch's sum, NaN from step `nan_from` on."""
    def step_fn(state, values, ids, key, scale):
        loss = jnp.where(state.step + 1 >= nan_from, jnp.nan, jnp.sum(values))
        return (Counter(step=state.step + 1, total=state.total + scale * jnp.sum(values)),
                {"loss": loss, "lr": jnp.float32(0.5)})
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step_fn, in_shardings=(rep, bat, bat, rep, rep), out_shardings=(rep, rep))


def run_toy(config, ckpt_dir=None, meta=None, logs=None, nan_from=10 ** 9, order=None, **kw):
    mesh = step_lib.make_mesh()
    state = Counter(step=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.float32))
    return loop.run(config, party="toy", step_fn=toy_step(mesh, nan_from), state=state,
                    arrays=(np.arange(N, dtype=np.float32),),
                    order=order or batches.BatchOrder(jax.random.key(0), N, B), mesh=mesh,
                    key=jax.random.key(1), total_steps=TOTAL,
                    ckpt_dir=None if ckpt_dir is None else str(ckpt_dir),
                    meta={"party": "toy", "total_steps": TOTAL} if meta is None else meta,
                    step_args=(jnp.float32(SCALE),),
                    log=logs.append if logs is not None else (lambda _: None), **kw)


def saved_steps(ckpt_dir):
    with ocp.CheckpointManager(os.path.abspath(str(ckpt_dir))) as m:
        return list(m.all_steps())


def test_run_sums_every_batch_and_logs_each_step(tmp_path):
    logs = []
    out = run_toy(toy_config(), tmp_path / "ck", logs=logs, metrics_path=str(tmp_path / "m.jsonl"))
    assert int(out.step) == TOTAL
    assert float(out.total) == SCALE * EPOCH_SUM * TOTAL // 2       # 3 epochs, every example once each
    assert saved_steps(tmp_path / "ck") == [2, 4, 6]
    lines = [json.loads(l) for l in open(tmp_path / "m.jsonl")]
    assert [l["step"] for l in lines] == list(range(1, TOTAL + 1))
    assert all(l["party"] == "toy" and l["images_per_s"] > 0 and l["lr"] == 0.5 for l in lines)
    for first, second in zip(lines[::2], lines[1::2]):             # the two batches of one epoch
        assert first["loss"] + second["loss"] == EPOCH_SUM
    step_lines = [l for l in logs if "] step " in l]
    assert len(step_lines) == TOTAL and all("img/s ETA " in l and "lr 5.00e-01" in l for l in step_lines)
    assert "training 6 steps on 8 images, batch 4 on" in logs[0]


def test_row_groups_sum_every_row_and_held_rows_must_cover_the_process(tmp_path):
    """Batches from 2 row groups of 4 rows (2 from each): an epoch still sums every example once.
    Arrays that miss some of this process's rows are refused before any step."""
    grouped = batches.BatchOrder(jax.random.key(0), N, B, groups=2)
    out = run_toy(toy_config(), order=grouped)
    assert float(out.total) == SCALE * EPOCH_SUM * TOTAL // 2
    mesh = step_lib.make_mesh()
    state = Counter(step=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.float32))
    with pytest.raises(ValueError, match=r"rows \[0, 8\) of 8 \(2 row groups.*holds rows \[2, 8\)"):
        loop.run(toy_config(), party="toy", step_fn=toy_step(mesh), state=state,
                 arrays=(np.arange(2, N, dtype=np.float32),), order=grouped, mesh=mesh,
                 key=jax.random.key(1), total_steps=TOTAL, step_args=(jnp.float32(SCALE),),
                 log=lambda _: None, row_start=2)


def test_stop_then_resume_equals_uninterrupted(tmp_path):
    stopped = run_toy(toy_config(), tmp_path / "ck", stop_at=3)
    assert int(stopped.step) == 3 and saved_steps(tmp_path / "ck") == [2, 3]
    logs = []
    resumed = run_toy(toy_config(), tmp_path / "ck", logs=logs)
    assert any("resumed from" in l and "step 3/6" in l for l in logs)
    assert float(resumed.total) == SCALE * EPOCH_SUM * 3


def test_checkpoint_meta_mismatch_names_the_key(tmp_path):
    model = vit.ViTConfig.from_config(base_config().model).to_dict()
    meta = {"party": "toy", "total_steps": TOTAL, "model": model}
    run_toy(toy_config(), tmp_path / "ck", meta=meta, stop_at=2)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="party"):
        run_toy(toy_config(), tmp_path / "ck", meta={**meta, "party": "other"})
    with pytest.raises(checkpoints.CheckpointMismatchError, match="model.depth"):
        run_toy(toy_config(), tmp_path / "ck", meta={**meta, "model": {**model, "depth": 99}})
    # how the model computes is not what it is: a run may resume on other hardware
    other = {k: "bfloat16" if model[k] == "float32" else "float32" for k in vit.COMPUTE_FIELDS}
    out = run_toy(toy_config(), tmp_path / "ck", meta={**meta, "model": {**model, **other}})
    assert float(out.total) == SCALE * EPOCH_SUM * 3


def test_non_finite_metric_stops_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(metrics.TrainingDivergedError, match="non-finite loss at step 3") as e:
        run_toy(toy_config(checkpoint_every=1), tmp_path / "ck", nan_from=3,
                metrics_path=str(tmp_path / "m.jsonl"))
    assert str(tmp_path / "ck") in str(e.value) and "config.optim.lr" in str(e.value)
    assert saved_steps(tmp_path / "ck") == [1, 2]
    assert [json.loads(l)["step"] for l in open(tmp_path / "m.jsonl")] == [1, 2]


def test_hook_note_goes_to_the_metrics_and_progress_lines(tmp_path):
    seen, logs = [], []

    def on_log(step, m):
        seen.append((step, m["loss"]))
        return loop.LogNote(fields={"odd": True}, remark=" ODD") if step % 2 else None

    run_toy(toy_config(log_every=2), logs=logs, on_log=on_log, metrics_path=str(tmp_path / "m.jsonl"),
            stop_at=5)
    assert [s for s, _ in seen] == [2, 4, 5]                       # logged steps, and the last one
    lines = [json.loads(l) for l in open(tmp_path / "m.jsonl")]
    assert [("odd" in l) for l in lines] == [False, False, True]
    step_lines = [l for l in logs if "] step " in l]
    assert [l.endswith(" ODD") for l in step_lines] == [False, False, True]


def test_tensorboard_follows_the_off_switch(tmp_path):
    run_toy(toy_config(tensorboard=False), tensorboard_dir=str(tmp_path / "off"))
    assert not os.path.exists(tmp_path / "off")
    run_toy(toy_config(log_every=2), tensorboard_dir=str(tmp_path / "on"))
    assert set(read_scalars(str(tmp_path / "on"))) == {"train/loss", "train/lr", "train/images_per_s"}


def test_centralized_baseline_writes_tensorboard_and_resumes(tmp_path):
    """The centralized MSD baseline, through the one loop: TensorBoard scalars equal to its metrics
    lines, and a run stopped by a checkpoint resumes to the uninterrupted teacher."""
    c = tiny_config(SHORT_MSD, BASELINES, train=dict(log_every=1, checkpoint_every=1))
    imgs = _images(16, 4)
    quiet = lambda _: None  # noqa: E731
    full = centralized.train_centralized_msd(c, model_of(c), imgs, total_steps=3, ckpt_dir=str(tmp_path / "full"),
                                             metrics_path=str(tmp_path / "m.jsonl"),
                                             tensorboard_dir=str(tmp_path / "tb"), log=quiet)
    rows = metrics.read_metrics(str(tmp_path / "m.jsonl"))
    scalars = read_scalars(str(tmp_path / "tb"))
    assert set(scalars) == {f"train/{k}" for k in tensorboard.TRAIN_SCALARS}
    for name in tensorboard.TRAIN_SCALARS:
        assert sorted(scalars[f"train/{name}"]) == [1, 2, 3], name
        for r in rows:  # events hold float32
            assert scalars[f"train/{name}"][r["step"]] == pytest.approx(r[name], rel=1e-6, abs=1e-30)
    # the same budget in two runs: the first leaves a checkpoint at step 2 only
    c2 = tiny_config(SHORT_MSD, BASELINES, train=dict(log_every=1, checkpoint_every=2))
    part = str(tmp_path / "part")
    centralized.train_centralized_msd(c2, model_of(c2), imgs, total_steps=3, ckpt_dir=part, log=quiet)
    with ocp.CheckpointManager(os.path.abspath(part)) as m:
        m.delete(3)
    logs = []
    again = centralized.train_centralized_msd(c2, model_of(c2), imgs, total_steps=3, ckpt_dir=part, log=logs.append)
    assert any("resumed from" in l and "step 2/3" in l for l in logs)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
