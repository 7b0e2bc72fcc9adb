"""The training loop every party runs: a step budget over a token set, Orbax checkpoints, resume.

Batches are a pure function of (seed, party, step): epoch e visits the examples in the order of
`jax.random.permutation(fold_in(data_key, e), N)`, so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from msd_jax.training import tensorboard
from msd_jax.models import vit
from msd_jax.msd import step as step_lib


class TrainingDivergedError(FloatingPointError):
    pass


class CheckpointMismatchError(ValueError):
    pass


def party_key(seed: int, party: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(party.encode()) & 0x7FFFFFFF)


def batch_size_for(requested: int, num_examples: int, num_devices: int) -> int:
    """The global batch: the requested size, capped by the data, a multiple of the device count."""
    if requested % num_devices:
        raise ValueError(f"config.train.batch_size={requested} is not divisible by the "
                         f"{num_devices} devices")
    b = min(requested, num_examples) // num_devices * num_devices
    if b == 0:
        raise ValueError(f"{num_examples} examples cannot fill one batch on {num_devices} devices")
    return b


class BatchOrder:
    """Example ids of each step's batch; the last partial batch of an epoch is dropped."""

    def __init__(self, key: jax.Array, num_examples: int, batch_size: int):
        self.key, self.n, self.b = key, num_examples, batch_size
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.n)
            self._epoch, self._perm = epoch, np.asarray(perm)
        return self._perm[pos * self.b:(pos + 1) * self.b].astype(np.int32)


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


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


def read_metrics(path: str) -> list[dict]:
    """Metrics lines of one party's JSONL file in step order; the last line of a step wins (a
    resumed run logs again the steps after its last checkpoint). Unparsable lines (a line cut by a
    killed run) are skipped."""
    by_step = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(m, dict) and "step" in m:
                by_step[int(m["step"])] = m
    return [by_step[s] for s in sorted(by_step)]


def read_collapse_warnings(metrics_path: str) -> list[dict]:
    """The collapse warnings recorded in a metrics JSONL file: [{"party", "step", "teacher_entropy",
    "kind"}], plus "effective_prototypes" where the line has it."""
    out = []
    for m in read_metrics(metrics_path):
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


def check_meta(ckpt_dir: str, saved: dict, expected: dict) -> None:
    for k, v in expected["model"].items():
        if k in vit.COMPUTE_FIELDS:
            continue  # how the model computes (a run may resume on other hardware), not what it is
        if saved.get("model", {}).get(k) != v:
            raise CheckpointMismatchError(
                f"{ckpt_dir}: checkpoint was written for model.{k}={saved.get('model', {}).get(k)!r}, "
                f"but config.model.{k}={v!r} (a checkpoint of another model; use a fresh --workdir)")
    for k in ("num_heads_out", "total_steps"):
        if saved.get(k) != expected[k]:
            raise CheckpointMismatchError(f"{ckpt_dir}: checkpoint has {k}={saved.get(k)!r}, this run "
                                          f"expects {expected[k]!r} (a different training budget or "
                                          "protocol; use a fresh --workdir)")


def train(config, *, party: str, tokens: np.ndarray, init_params: Any, ckpt_dir: str,
          metrics_path: Optional[str] = None, total_steps: int, num_heads_out: int = 1,
          site_params: Any = None, stop_at: Optional[int] = None,
          log: Callable[[str], None] = print, tensorboard_dir: Optional[str] = None,
          init_state: Optional[step_lib.TrainState] = None) -> step_lib.TrainState:
    """Trains `init_params` with the MSD step on `tokens` [N, n, D] for `total_steps` steps.

    Resumes from the latest checkpoint in `ckpt_dir`. With `site_params` (stacked site students),
    the step distils those fixed teachers into `num_heads_out` heads (one-shot merge). `stop_at`
    ends the run early after that step (a deliberate interruption, used by tests). With
    `tensorboard_dir`, the logged steps' scalars also go there as TensorBoard events (unless
    config.train.tensorboard is False). `init_state`
    (a TrainState: step, student, teacher, optimizer state, centre) replaces the fresh state built
    from `init_params` when there is no checkpoint yet; FedAvg starts each round from the global
    student and teacher this way, with `state.step` the global step so schedules run across rounds.
    """
    model_cfg = vit.ViTConfig.from_config(config.model)
    merge = site_params is not None
    mesh = step_lib.make_mesh()
    n_dev = mesh.devices.size
    batch = batch_size_for(config.train.batch_size, len(tokens), n_dev)
    order = BatchOrder(jax.random.fold_in(party_key(config.seed, party), 1), len(tokens), batch)
    sc = step_lib.StepConfig.from_config(config, tokens.shape[1], total_steps, order.steps_per_epoch, batch)
    step_fn = step_lib.jit_train_step(step_lib.make_train_step(model_cfg, sc, num_heads_out, merge, n_dev),
                                      mesh, merge)
    meta = checkpoint_meta(model_cfg, party, num_heads_out, total_steps)

    state = (init_state if init_state is not None
             else step_lib.init_state(init_params, num_heads_out, model_cfg.out_dim, sc))
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
    with ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options) as mngr:
        latest = mngr.latest_step()
        if latest is not None:
            saved_meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            check_meta(ckpt_dir, saved_meta, meta)
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
            state = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
            log(f"[{party}] resumed from {ckpt_dir} at step {latest}/{total_steps}")
        state = step_lib.replicate(mesh, state)
        site_params = step_lib.replicate(mesh, site_params) if merge else None
        key = party_key(config.seed, party)

        def save(step: int):
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

        start = int(state.step)
        end = min(total_steps, stop_at) if stop_at is not None else total_steps
        if start < end:
            log(f"[{party}] training {total_steps} steps on {len(tokens)} images x {tokens.shape[1]} "
                f"tokens, batch {batch} on {n_dev} {jax.default_backend()} device(s), "
                f"views {sc.num_global}x{sc.size_global} + {sc.num_local}x{sc.size_local} tokens")
        metrics_file = open(metrics_path, "a") if metrics_path else None
        tcfg = config.train
        min_ent = float(tcfg.get("collapse_min_entropy", 0.1))
        max_frac = float(tcfg.get("collapse_max_entropy_frac", 0.98))
        min_protos = float(tcfg.get("collapse_min_prototypes", 2.0))
        num_collapse = 0
        board = tensorboard.ScalarWriter(tensorboard_dir if tcfg.get("tensorboard", True) else None)
        t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start
        try:
            for s in range(start, end):
                ids = order(s)
                toks, ids_dev = step_lib.shard_batch(mesh, tokens[ids], ids)
                args = (state, toks, ids_dev, key) + ((site_params,) if merge else ())
                state, metrics = step_fn(*args)
                if s == start:  # compiled by now: hand the compiler's freed heap back to the OS
                    step_lib.release_host_memory()
                done = s + 1
                is_log = done % config.train.log_every == 0 or done == end
                is_ckpt = done % config.train.checkpoint_every == 0 or done == end
                if not (is_log or is_ckpt):
                    continue
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in m.values()):
                    bad = [k for k, v in m.items() if not math.isfinite(v)]
                    raise TrainingDivergedError(
                        f"[{party}] non-finite {', '.join(bad)} at step {done}: training stopped; the "
                        f"last good checkpoint in {ckpt_dir} is kept (try a lower config.optim.lr or "
                        "config.optim.clip_grad)")
                now = time.perf_counter()
                ips = (done - last_step) * batch / max(now - last_t, 1e-9)
                eta = (total_steps - done) * (now - t0) / max(done - start, 1)
                m.update(step=done, images_per_s=ips)
                if is_log:
                    line = {"party": party, **m}
                    warn = ""
                    if s >= sc.teacher_temp_warmup_steps:  # this step used the final teacher temp
                        flagged = collapse_check(m["teacher_entropy"], model_cfg.out_dim, min_ent, max_frac,
                                                 effective_prototypes=m.get("effective_prototypes"),
                                                 min_prototypes=min_protos)
                        if flagged:
                            num_collapse += 1
                            line["collapse"] = {"kind": flagged[0], "reason": flagged[1]}
                            warn = f" COLLAPSE? {flagged[1]}"
                    log(f"[{party}] step {done}/{total_steps} loss {m['loss']:.4f} "
                        f"teacher_entropy {m['teacher_entropy']:.3f} "
                        f"prototypes {m.get('effective_prototypes', math.nan):.1f} lr {m['lr']:.2e} "
                        f"{ips:.1f} img/s ETA {_format_eta(eta)}{warn}")
                    if metrics_file:
                        metrics_file.write(json.dumps(line) + "\n")
                        metrics_file.flush()
                    board.train_metrics(m)
                    last_t, last_step = now, done
                if is_ckpt:
                    save(done)
            if num_collapse:
                log(f"[{party}] COLLAPSE? {num_collapse} logged step(s) flagged by the collapse monitor "
                    f"(config.train.collapse_min_entropy / collapse_max_entropy_frac / "
                    f"collapse_min_prototypes)")
        finally:
            if metrics_file:
                metrics_file.close()
            board.close()
            mngr.wait_until_finished()
    return jax.device_get(state)


def init_student_params(config, num_heads_out: int = 1):
    """The seeded initial student (what the server sends every site in the model-upload protocol)."""
    model_cfg = vit.ViTConfig.from_config(config.model)
    return jax.device_get(vit.init_student(model_cfg, party_key(config.seed, "init"), num_heads_out))

