"""The MSD trainer every party runs (site, token-upload server, one-shot merge, FedAvg's local
rounds): the MSD step of msd/step.py in the one training loop (training/loop.py) over a token set,
with a collapse monitor on the logged steps.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np

from msd_jax.models import vit
from msd_jax.msd import step as step_lib
from msd_jax.training import batches, loop, metrics as metrics_lib


def party_key(seed: int, party: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(party.encode()) & 0x7FFFFFFF)


def row_groups(config) -> int:
    """The MSD trainers' number of row groups on this run's processes (config.distributed.row_groups,
    0: one per process; training/batches.py)."""
    return batches.row_groups_for(int(config.distributed.row_groups), jax.process_count())


def collapse_check(teacher_entropy: float, out_dim: int, min_entropy: float,
                   max_entropy_frac: float, *, effective_prototypes: Optional[float] = None,
                   min_prototypes: float = 0.0) -> Optional[tuple[str, str]]:
    """(kind, reason) when the teacher statistics signal a collapse, else None.

    'one_hot': the teacher entropy (nats) is below `min_entropy` (every image goes to one
    prototype); 'uniform': above `max_entropy_frac * log(out_dim)` (the teacher output carries no
    information); 'prototypes': the batch uses fewer than `min_prototypes` prototypes
    (`effective_prototypes`, the perplexity of the batch-mean teacher distribution), i.e. every
    image goes to the same few prototypes. The first that applies, in that order.
    """
    if math.isfinite(teacher_entropy):
        if teacher_entropy < min_entropy:
            return "one_hot", f"one-hot collapse: teacher_entropy {teacher_entropy:.3f} < {min_entropy:g}"
        top = max_entropy_frac * math.log(out_dim)
        if teacher_entropy > top:
            return "uniform", (f"uniform collapse: teacher_entropy {teacher_entropy:.3f} > "
                               f"{max_entropy_frac:g} * log({out_dim}) = {top:.3f}")
    if effective_prototypes is not None and math.isfinite(effective_prototypes) \
            and effective_prototypes < min_prototypes:
        return "prototypes", (f"prototype collapse: effective_prototypes {effective_prototypes:.2f} "
                              f"< {min_prototypes:g}")
    return None


def read_collapse_warnings(metrics_path: str) -> list[dict]:
    """The collapse warnings recorded in a metrics JSONL file: [{"party", "step", "teacher_entropy",
    "kind"}], plus "effective_prototypes" where the line has it."""
    out = []
    for m in metrics_lib.read_metrics(metrics_path):
        if isinstance(m.get("collapse"), dict):
            w = {"party": m.get("party"), "step": m["step"], "teacher_entropy": m.get("teacher_entropy"),
                 "kind": m["collapse"]["kind"]}
            if "effective_prototypes" in m:
                w["effective_prototypes"] = m["effective_prototypes"]
            out.append(w)
    return out


def checkpoint_meta(model_cfg: vit.ViTConfig, party: str, num_heads_out: int, total_steps: int) -> dict:
    return {"model": model_cfg.to_dict(), "party": party, "num_heads_out": num_heads_out,
            "total_steps": total_steps}


def train(config, model: vit.ViTConfig, *, party: str, tokens: np.ndarray, init_params: Any, ckpt_dir: str,
          metrics_path: Optional[str] = None, total_steps: int, num_heads_out: int = 1,
          site_params: Any = None, stop_at: Optional[int] = None,
          log: Callable[[str], None] = print, tensorboard_dir: Optional[str] = None,
          init_state: Optional[step_lib.TrainState] = None, row_start: int = 0,
          num_rows: Optional[int] = None) -> step_lib.TrainState:
    """Trains `init_params` with the MSD step on a token set of `num_rows` rows (default
    len(tokens)) for `total_steps` steps. `tokens` [M, n, D] holds its rows [row_start,
    row_start + M), at least this process's (`row_groups`, training/batches.py).

    Resumes from the latest checkpoint in `ckpt_dir`. With `site_params` (stacked site students),
    the step distils those fixed teachers into `num_heads_out` heads (one-shot merge). `stop_at`
    ends the run early after that step (a deliberate interruption, used by tests). With
    `tensorboard_dir`, the logged steps' scalars also go there as TensorBoard events (unless
    config.train.tensorboard is False). `init_state`
    (a TrainState: step, student, teacher, optimizer state, centre) replaces the fresh state built
    from `init_params` when there is no checkpoint yet; FedAvg starts each round from the global
    student and teacher this way, with `state.step` the global step so schedules run across rounds.
    """
    merge = site_params is not None
    mesh = step_lib.make_mesh()
    n_dev = mesh.devices.size
    num_rows = len(tokens) if num_rows is None else num_rows
    groups = row_groups(config)
    batch = batches.batch_size_for(config.train.batch_size, num_rows, n_dev, groups)
    order = batches.BatchOrder(jax.random.fold_in(party_key(config.seed, party), 1), num_rows, batch, groups)
    sc = step_lib.StepConfig.from_config(config, tokens.shape[1], total_steps, order.steps_per_epoch, batch)
    step_fn = step_lib.jit_train_step(step_lib.make_train_step(model, sc, num_heads_out, merge, n_dev),
                                      mesh, merge)
    state = (init_state if init_state is not None
             else step_lib.init_state(init_params, num_heads_out, model.out_dim, sc))
    monitor = CollapseMonitor(config.train, model.out_dim, sc.teacher_temp_warmup_steps)
    state = loop.run(config, party=party, step_fn=step_fn, state=state, arrays=(tokens,), order=order,
                     mesh=mesh, key=party_key(config.seed, party), total_steps=total_steps,
                     ckpt_dir=ckpt_dir, meta=checkpoint_meta(model, party, num_heads_out, total_steps),
                     step_args=(site_params,) if merge else (), metrics_path=metrics_path,
                     tensorboard_dir=tensorboard_dir, log=log, stop_at=stop_at, on_log=monitor,
                     row_start=row_start,
                     describe=f", {tokens.shape[1]} tokens each, views {sc.num_global}x{sc.size_global} + "
                              f"{sc.num_local}x{sc.size_local} tokens")
    if monitor.num_flagged:
        log(f"[{party}] {monitor.summary()}")
    return state


class CollapseMonitor:
    """The MSD trainer's per-logged-step hook: flags a step whose teacher statistics signal a
    collapse (`collapse_check`, thresholds from config.train), once the step ran at the final
    teacher temperature (after `warmup_steps`)."""

    def __init__(self, train_config, out_dim: int, warmup_steps: int):
        self.out_dim, self.warmup_steps = out_dim, warmup_steps
        self.min_entropy = float(train_config.collapse_min_entropy)
        self.max_entropy_frac = float(train_config.collapse_max_entropy_frac)
        self.min_prototypes = float(train_config.collapse_min_prototypes)
        self.num_flagged = 0

    def __call__(self, step: int, m: dict) -> Optional[loop.LogNote]:
        if step - 1 < self.warmup_steps:  # step `step` is the one at index step - 1
            return None
        flagged = collapse_check(m["teacher_entropy"], self.out_dim, self.min_entropy,
                                 self.max_entropy_frac, effective_prototypes=m.get("effective_prototypes"),
                                 min_prototypes=self.min_prototypes)
        if not flagged:
            return None
        self.num_flagged += 1
        kind, reason = flagged
        return loop.LogNote(fields={"collapse": {"kind": kind, "reason": reason}},
                            remark=f" COLLAPSE? {reason}")

    def summary(self) -> str:
        return (f"COLLAPSE? {self.num_flagged} logged step(s) flagged by the collapse monitor "
                "(config.train.collapse_min_entropy / collapse_max_entropy_frac / collapse_min_prototypes)")


def init_student_params(config, model: vit.ViTConfig, num_heads_out: int = 1):
    """The seeded initial student (what the server sends every site in the model-upload protocol)."""
    return jax.device_get(vit.init_student(model, party_key(config.seed, "init"), num_heads_out))

