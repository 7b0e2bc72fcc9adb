"""Tests for msd_jax.training.checkpoints: a checkpoint that cannot be read is moved aside and the
run falls back to the one before it, with the real Orbax on disk.

Steps 10 and 20 of a small state are saved, then step 20 is damaged the ways a disk filling up or a
machine lost mid-write leave it; the last test drives the training loop (test_loop's toy step)
through such a damaged checkpoint to the state of an uninterrupted run.
"""
import os
import shutil

import numpy as np
import pytest

from msd_jax.training.checkpoints import CheckpointMismatchError, Checkpoints
from test_loop import EPOCH_SUM, SCALE, TOTAL, run_toy, saved_steps, toy_config

# A failed TensorStore read calls back into Orbax's event loop after it closed: noise, not a fault
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

META = {"party": "server", "total_steps": 20}


def state_of(value: int) -> dict:
    """A state that tells the steps apart; "w" is too large (and too random to compress) to lie
    inline in the OCDBT tree, so that its chunk has a data file of its own."""
    w = np.random.default_rng(value + 1000).standard_normal((64, 64)).astype(np.float32)
    return {"w": w, "b": np.arange(5, dtype=np.int32) + value}


def save_steps(ckpt_dir, steps=(10, 20)) -> None:
    ckpts = Checkpoints(str(ckpt_dir), META, max_to_keep=3)
    for step in steps:
        ckpts.save(step, state_of(step))
    ckpts.close()


def restore(ckpt_dir, meta=META, state=None, then_save=()):
    """(restored state, step, log lines) of a fresh Checkpoints on `ckpt_dir`, which then saves
    the steps `then_save` as a resumed run would."""
    logs = []
    ckpts = Checkpoints(str(ckpt_dir), meta, max_to_keep=3)
    try:
        restored, step = ckpts.restore_latest(state_of(0) if state is None else state, log=logs.append)
        for s in then_save:
            ckpts.save(s, state_of(s))
    finally:
        ckpts.close()
    return restored, step, logs


def assert_state(restored, value: int) -> None:
    expected = state_of(value)
    assert set(restored) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(restored[k], expected[k])
        assert restored[k].dtype == expected[k].dtype


def truncate(path, size=None) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def data_files(step_dir) -> list:
    """The files of the state's arrays (OCDBT data files, in folders named `d`)."""
    found = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             if os.path.basename(root) == "d" for name in names]
    assert found, f"no array data files under {step_dir}"
    return found


def truncate_data(step_dir) -> None:
    for path in data_files(step_dir):
        truncate(path)


def truncate_largest_data_file(step_dir) -> None:
    """Cuts the chunk of "w" short: its tree and metadata still read, its values do not."""
    truncate(max(data_files(step_dir), key=os.path.getsize))


# name: (how step 20 is damaged, the part the log names)
CORRUPTIONS = {
    "truncated_array_data": (truncate_largest_data_file, "state arrays"),
    "truncated_tree_data": (truncate_data, "state metadata"),
    "truncated_state_metadata": (lambda d: truncate(os.path.join(d, "state", "_METADATA")), "state metadata"),
    "empty_meta_json": (lambda d: truncate(os.path.join(d, "meta", "metadata"), 0), "meta"),
    "missing_state_item": (lambda d: shutil.rmtree(os.path.join(d, "state")), "state metadata"),
}


@pytest.mark.parametrize("corrupt,part", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_unreadable_latest_falls_back_and_is_moved_aside(tmp_path, corrupt, part):
    ck = tmp_path / "checkpoints" / "server"
    save_steps(ck)
    corrupt(str(ck / "20"))
    restored, step, logs = restore(ck, then_save=(20,))
    assert step == 10
    assert_state(restored, 10)
    moved = tmp_path / "checkpoints" / "server.unreadable" / "20"
    assert len(logs) == 1
    assert logs[0].startswith(f"checkpoint step 20 in {ck} cannot be read ({part}: ")
    assert logs[0].endswith(f"); moved to {moved}: falling back to step 10")
    assert moved.is_dir() and os.listdir(moved)  # moved, not deleted
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["server", "server.unreadable"]
    # the run saved step 20 again, and that one is what the next run resumes from
    restored, step, logs = restore(ck)
    assert (step, logs) == (20, [])
    assert_state(restored, 20)


def test_every_checkpoint_unreadable_starts_from_the_initial_state(tmp_path):
    ck = tmp_path / "ck"
    save_steps(ck)
    truncate_data(str(ck / "20"))
    truncate(os.path.join(ck, "10", "state", "_METADATA"))
    initial = state_of(-1)
    restored, step, logs = restore(ck, state=initial)
    assert step is None and restored is initial
    assert len(logs) == 2
    assert "checkpoint step 20" in logs[0] and logs[0].endswith("falling back to step 10")
    assert "checkpoint step 10" in logs[1]
    assert logs[1].endswith(f"moved to {tmp_path / 'ck.unreadable' / '10'}: no other checkpoint: "
                            "starting from the initial state")
    assert sorted(os.listdir(tmp_path / "ck.unreadable")) == ["10", "20"]
    assert os.listdir(ck) == []


def test_a_step_set_aside_twice_keeps_both(tmp_path):
    ck = tmp_path / "ck"
    save_steps(ck)
    truncate_data(str(ck / "20"))
    restore(ck, then_save=(20,))
    truncate_data(str(ck / "20"))
    restored, step, logs = restore(ck)
    assert step == 10
    assert_state(restored, 10)
    assert f"moved to {tmp_path / 'ck.unreadable' / '20.1'}:" in logs[0]
    assert sorted(os.listdir(tmp_path / "ck.unreadable")) == ["20", "20.1"]


def test_meta_mismatch_still_raises_and_moves_nothing(tmp_path):
    ck = tmp_path / "ck"
    save_steps(ck)
    with pytest.raises(CheckpointMismatchError, match="party"):
        restore(ck, meta={**META, "party": "site1"})
    assert saved_steps(ck) == [10, 20] and not (tmp_path / "ck.unreadable").exists()


@pytest.mark.parametrize("state,leaf", [
    ({"w": np.zeros((64, 65), np.float32), "b": np.zeros(5, np.int32)}, "state.w"),
    ({"w": np.zeros((64, 64), np.float16), "b": np.zeros(5, np.int32)}, "state.w"),
    ({"w": np.zeros((64, 64), np.float32)}, "state.b"),
], ids=["shape", "dtype", "tree"])
def test_state_of_another_tree_raises_and_moves_nothing(tmp_path, state, leaf):
    """A readable checkpoint whose arrays differ from the run's is not corruption: Orbax alone would
    restore another shape into a NumPy target and cast any dtype."""
    ck = tmp_path / "ck"
    save_steps(ck)
    with pytest.raises(CheckpointMismatchError) as e:
        restore(ck, state=state)
    assert f"{ck} (step 20)" in str(e.value) and leaf in str(e.value)
    assert saved_steps(ck) == [10, 20] and not (tmp_path / "ck.unreadable").exists()


def test_loop_resumes_from_the_checkpoint_before_an_unreadable_one(tmp_path):
    """A run stopped at step 4 whose step-4 checkpoint was cut short resumes from step 2 and ends
    where an uninterrupted run does."""
    uninterrupted = run_toy(toy_config(), tmp_path / "full")
    ck = tmp_path / "ck"
    run_toy(toy_config(), ck, stop_at=4)
    assert saved_steps(ck) == [2, 4]
    truncate_data(str(ck / "4"))  # the toy state's scalars lie inline in the OCDBT tree
    logs = []
    resumed = run_toy(toy_config(), ck, logs=logs)
    assert any(l.startswith(f"[toy] checkpoint step 4 in {ck} cannot be read (")
               and l.endswith(f"moved to {tmp_path / 'ck.unreadable' / '4'}: falling back to step 2")
               for l in logs), logs
    assert any("resumed from" in l and "step 2/6" in l for l in logs)
    assert int(resumed.step) == int(uninterrupted.step) == TOTAL
    assert float(resumed.total) == float(uninterrupted.total) == SCALE * EPOCH_SUM * TOTAL // 2
    assert saved_steps(ck) == [2, 4, 6]
