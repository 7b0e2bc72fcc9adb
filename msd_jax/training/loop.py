"""The one training loop every trainer runs: the MSD sites, server and merge, FedAvg's rounds, the
centralized baselines and the classifier trainer (supervised baseline, fine-tuning).

It steps a jitted `step_fn(state, *batch, example_ids, key, *step_args) -> (state, metrics)` from
`state.step` to the end of the budget, with the batches of a BatchOrder (training/batches.py), and
on every config.train.log_every-th step (and the last) checks the metrics are finite, prints the
progress line, appends the metrics line and writes the TensorBoard scalars; on every
config.train.checkpoint_every-th step (and the last) it saves an Orbax checkpoint, from which a
later run resumes (from the newest one it can read: training/checkpoints.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax

from msd_jax import distributed
from msd_jax.msd import step as step_lib
from msd_jax.training import batches, checkpoints, metrics as metrics_lib, progress, tensorboard


@dataclasses.dataclass(frozen=True)
class LogNote:
    """What a trainer's per-logged-step hook adds: fields of that step's metrics line and a remark
    at the end of its progress line."""
    fields: dict = dataclasses.field(default_factory=dict)
    remark: str = ""


# on_log(step, metrics) -> a LogNote or None, called on every logged step
LogHook = Callable[[int, dict], Optional[LogNote]]


def run(config, *, party: str, step_fn: Callable, state: Any, arrays: tuple,
        order: batches.BatchOrder, mesh, key: jax.Array, total_steps: int,
        ckpt_dir: Optional[str] = None, meta: Optional[dict] = None, step_args: tuple = (),
        metrics_path: Optional[str] = None, tensorboard_dir: Optional[str] = None,
        log: Callable[[str], None] = print, log_every: Optional[int] = None,
        stop_at: Optional[int] = None, on_log: Optional[LogHook] = None, describe: str = "",
        row_start: int = 0):
    """Trains `state` to `total_steps` (or `stop_at`, a deliberate interruption) and returns it on
    the host.

    `arrays`: host arrays holding the rows [row_start, row_start + len) of the order's examples,
    at least this process's rows (`order.process_rows`); each step gathers this process's block of
    the global batch from them (msd/step.py `process_block`). `ckpt_dir`: checkpoints with `meta`
    (JSON; a checkpoint of another `meta` raises CheckpointMismatchError), resumed from the newest
    readable one (unreadable ones are moved aside and logged); None: no checkpoints. `step_args`:
    further step arguments, replicated on the mesh (the merge's site teachers). `tensorboard_dir`
    is skipped when config.train.tensorboard is False. `log_every` overrides
    config.train.log_every. `describe` ends the opening line."""
    log_every = log_every or config.train.log_every
    check_rows(order, len(arrays[0]), row_start)
    end = total_steps if stop_at is None else min(total_steps, stop_at)
    with contextlib.ExitStack() as closing:
        ckpts = None
        # placed on the mesh first: a checkpoint is restored straight into these shardings, whatever
        # process and device count wrote it
        state = step_lib.replicate(mesh, state)
        if ckpt_dir:
            ckpts = checkpoints.Checkpoints(ckpt_dir, meta or {}, config.train.keep_checkpoints)
            closing.callback(ckpts.close)
            state = resume(ckpts, state, party, total_steps, log)
        step_args = step_lib.replicate(mesh, tuple(step_args))
        start = int(state.step)
        if start < end:
            log(f"[{party}] training {total_steps} steps on {order.n} images, batch {order.b} on "
                f"{mesh.devices.size} {jax.default_backend()} device(s){describe}")
        if start < end and jax.process_count() > 1:
            batch = step_lib.shard_batch(mesh, *process_batch(order, start, arrays, row_start))
            step_fn = compiled_together(step_fn, state, batch, key, step_args)
        step_log = StepLog(party, total_steps, log, metrics_path,
                           tensorboard_dir if config.train.tensorboard else None, on_log)
        closing.callback(step_log.close)
        clock = progress.Clock(start, total_steps, order.b)
        for s in range(start, end):
            batch = step_lib.shard_batch(mesh, *process_batch(order, s, arrays, row_start))
            state, metrics = step_fn(state, *batch, key, *step_args)
            if s == start:  # compiled by now: hand the compiler's freed heap back to the OS
                step_lib.release_host_memory()
            done = s + 1
            is_log = done % log_every == 0 or done == end
            is_ckpt = ckpts is not None and (done % config.train.checkpoint_every == 0 or done == end)
            if not (is_log or is_ckpt):
                continue
            m = metrics_lib.finite_metrics(metrics, party, done, ckpt_dir)
            images_per_s, eta = clock.read(done)
            m.update(step=done, images_per_s=images_per_s)
            if is_log:
                step_log.write(m, eta)
                clock.logged(done)
            if is_ckpt:
                ckpts.save(done, state)
    return jax.device_get(state)


def check_rows(order: batches.BatchOrder, num_held: int, row_start: int) -> None:
    """The held rows [row_start, row_start + num_held) must include this process's rows."""
    lo, hi = order.process_rows(jax.process_index(), jax.process_count())
    if lo < row_start or hi > row_start + num_held:
        raise ValueError(f"process {jax.process_index()} of {jax.process_count()} trains on rows "
                         f"[{lo}, {hi}) of {order.n} ({order.groups} row groups, "
                         f"{batches.ROW_GROUPS_KEY}) but holds rows [{row_start}, {row_start + num_held})")


def process_batch(order: batches.BatchOrder, step: int, arrays: tuple, row_start: int) -> tuple:
    """This process's block of step `step`'s global batch: its rows of each array (which hold the
    rows from `row_start` on), then their example ids."""
    ids = step_lib.process_block(order(step))
    return tuple(a[ids - row_start] for a in arrays) + (ids,)


def compiled_together(step_fn: Callable, state: Any, batch: tuple, key: jax.Array,
                      step_args: tuple) -> Callable:
    """`step_fn` compiled for these arguments, once every process has compiled it: the processes
    then start the first step (whose collectives open the CPU collectives' connections, with a
    fixed 30 s deadline) together, however long each took to compile."""
    compiled = step_fn.lower(state, *batch, key, *step_args).compile()
    distributed.barrier("msd_jax_step_compiled")
    return compiled


class StepLog:
    """Where a logged step's metrics go: the trainer's hook, the progress line, the metrics JSON
    line and the TensorBoard scalars."""

    def __init__(self, party: str, total_steps: int, log: Callable[[str], None],
                 metrics_path: Optional[str], tensorboard_dir: Optional[str], on_log: Optional[LogHook]):
        self.party, self.total_steps, self.log, self.on_log = party, total_steps, log, on_log
        writer = distributed.is_writer()  # the files are shared: one process writes them
        self.metrics_file = metrics_lib.MetricsFile(metrics_path if writer else None)
        self.board = tensorboard.ScalarWriter(tensorboard_dir if writer else None)

    def write(self, m: dict, eta: float) -> None:
        """`m`: the step's finite metrics with its 'step' and 'images_per_s'."""
        note = (self.on_log(m["step"], m) if self.on_log else None) or LogNote()
        self.log(progress.progress_line(self.party, m["step"], self.total_steps, m, eta) + note.remark)
        self.metrics_file.write({"party": self.party, **m, **note.fields})
        self.board.train_metrics(m)

    def close(self) -> None:
        self.metrics_file.close()
        self.board.close()


def resume(ckpts: checkpoints.Checkpoints, state: Any, party: str, total_steps: int,
           log: Callable[[str], None]) -> Any:
    """The state of the newest readable checkpoint, else `state`."""
    state, step = ckpts.restore_latest(state, log=lambda line: log(f"[{party}] {line}"))
    if step is not None:
        log(f"[{party}] resumed from {ckpts.dir} at step {step}/{total_steps}")
    return state
