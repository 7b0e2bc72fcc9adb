"""The one masked-sampling-distillation step that every protocol trains with.

State is a plain pytree. The step is one `jax.jit` over a 1-D device mesh: the batch is sharded
along the mesh axis 'data', the state is replicated, and XLA inserts the gradient all-reduce. The
same function therefore runs unchanged on one CPU and on N devices.

Two sources of teachers share the step:
- self-distillation (site training, token-upload server): the teacher is the EMA of the student;
- one-shot merging (model upload): the teachers are the fixed site models, one student head each,
  over one shared student body; the EMA of the student is kept as the output model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msd_jax.models import vit
from msd_jax.msd import loss as loss_lib
from msd_jax.msd import schedules
from msd_jax.msd import views as views_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer steps taken
    params: Any            # student: {'body', 'heads_0', ...}
    ema_params: Any        # EMA of the student (the teacher in self-distillation)
    opt_state: Any         # Adam moments
    center: jax.Array      # [num_heads_out, out_dim] teacher centre per head


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Every number the step needs, resolved to steps (see `from_config`)."""
    total_steps: int
    num_global: int
    size_global: int
    num_local: int
    size_local: int
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    center_momentum: float
    momentum_teacher: float
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    clip_grad: float
    freeze_last_layer_steps: int
    b1: float
    b2: float
    drop_path_rate: float  # the student's stochastic depth (the teacher never drops)

    @classmethod
    def from_config(cls, config, num_tokens: int, total_steps: int, steps_per_epoch: int,
                    batch_size: int) -> "StepConfig":
        m, o = config.msd, config.optim
        if m.num_global < 1:
            raise ValueError(f"config.msd.num_global: expected >= 1, got {m.num_global}")
        if m.num_local < 0:
            raise ValueError(f"config.msd.num_local: expected >= 0, got {m.num_local}")
        if m.num_global + m.num_local < 2:
            raise ValueError("config.msd: need at least two views in all (num_global + num_local >= 2)")
        if total_steps < 1:
            raise ValueError(f"training budget: expected >= 1 step, got {total_steps}")
        return cls(
            total_steps=total_steps,
            num_global=m.num_global,
            size_global=views_lib.view_size(num_tokens, m.ratio_global, "ratio_global"),
            num_local=m.num_local,
            size_local=views_lib.view_size(num_tokens, m.ratio_local, "ratio_local"),
            student_temp=m.student_temp,
            teacher_temp=m.teacher_temp,
            warmup_teacher_temp=m.warmup_teacher_temp,
            teacher_temp_warmup_steps=int(round(m.teacher_temp_warmup_frac * total_steps)),
            center_momentum=m.center_momentum,
            momentum_teacher=m.momentum_teacher,
            lr=o.lr * batch_size / 256.0,  # DINO's linear scaling rule
            min_lr=o.min_lr,
            warmup_steps=int(round(o.warmup_frac * total_steps)),
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            clip_grad=o.clip_grad,
            freeze_last_layer_steps=int(round(o.freeze_last_layer_epochs * steps_per_epoch)),
            b1=o.b1,
            b2=o.b2,
            drop_path_rate=float(config.model.drop_path_rate),
        )


def _adam(sc: StepConfig) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=sc.b1, b2=sc.b2, eps=1e-8)


def init_state(params, center_heads: int, out_dim: int, sc: StepConfig) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.array, params),
                      opt_state=_adam(sc).init(params),
                      center=jnp.zeros((center_heads, out_dim), jnp.float32))


def clip_per_tensor(grads, max_norm: float):
    """DINO's clip_gradients: each parameter tensor's gradient norm is clipped to `max_norm`."""
    if max_norm <= 0:
        return grads
    def clip(g):
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
        return g * jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(clip, grads)


def _is_last_layer(path) -> bool:
    return getattr(path[-1], "key", None) == "last_layer"


def schedule_values(sc: StepConfig, step) -> dict:
    return dict(
        lr=schedules.warmup_cosine(step, sc.lr, sc.min_lr, sc.total_steps, sc.warmup_steps),
        weight_decay=schedules.warmup_cosine(step, sc.weight_decay, sc.weight_decay_end, sc.total_steps),
        momentum=schedules.warmup_cosine(step, sc.momentum_teacher, 1.0, sc.total_steps),
        teacher_temp=schedules.linear_warmup(step, sc.warmup_teacher_temp, sc.teacher_temp,
                                             sc.teacher_temp_warmup_steps),
    )


def optimizer_update(sc: StepConfig, hp: dict, state: TrainState, grads):
    """DINO's update of `state.params` (any pytree): last layer frozen while
    step < freeze_last_layer_steps, per-tensor clipping, Adam, decoupled weight decay (AdamW) on
    the decayed parameters only, at `hp`'s lr and weight decay. Returns (params, opt_state,
    grad_norm)."""
    frozen = state.step < sc.freeze_last_layer_steps
    # DINO drops the last layer's gradient while it is frozen: its Adam moments see zeros.
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.where(frozen, 0.0, g) if _is_last_layer(path) else g, grads)
    grads = clip_per_tensor(grads, sc.clip_grad)
    grad_norm = optax.tree.norm(grads)
    adam_updates, opt_state = _adam(sc).update(grads, state.opt_state, state.params)

    def apply_update(path, p, u):  # decoupled weight decay as in AdamW: p -= lr (u + wd p)
        wd = hp["weight_decay"] if vit.is_decay_param(path) else 0.0
        new = p - hp["lr"] * (u + wd * p)
        return jnp.where(frozen, p, new) if _is_last_layer(path) else new

    params = jax.tree_util.tree_map_with_path(apply_update, state.params, adam_updates)
    return params, opt_state, grad_norm


def ema_update(ema_params, params, momentum):
    """Teacher EMA: e <- m e + (1 - m) p."""
    return jax.tree_util.tree_map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)


def effective_prototypes(t_probs: jax.Array) -> jax.Array:
    """exp(entropy) of the batch-mean teacher distribution of the first head (t_probs [H, G, B, K]):
    how many prototypes the batch uses. ~1 when every image goes to the same prototype, even when
    each image's own distribution is not one-hot (a collapse the per-image entropy cannot see)."""
    mean = jnp.mean(t_probs[0].reshape(-1, t_probs.shape[-1]).astype(jnp.float32), axis=0)
    return jnp.exp(-jnp.sum(mean * jnp.log(jnp.clip(mean, 1e-12))))


def after(x: jax.Array, tree) -> jax.Array:
    """x, made to depend on every leaf of `tree` (one element of each, times zero), so XLA
    schedules whatever consumes it after the whole tree is computed. (XLA CPU ignores
    `optimization_barrier` for scheduling.) A non-finite element read makes it NaN; the step's
    update is non-finite then anyway."""
    dep = sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree))
    return x + (0.0 * dep).astype(x.dtype)


# Fewest tokens (batch x view size) worth a backward pass of their own: below this, one pass per
# view costs more in per-pass overhead than it saves (ViT-B/16 at batch 2 on CPU, NOTES.md change 7).
MIN_PASS_TOKENS = 512


def backward_passes(sc: StepConfig, g_views, l_views, batch: int):
    """The student views in the groups that are backpropagated one after the other, as
    [(views [B, n, k, D], n, index of the group's first view)] from views [B, V, k, D]. A group
    holds about one global view's tokens per device (at least MIN_PASS_TOKENS): each global view
    alone, the local views a few together. The DINO loss is a sum over student views, so the
    groups' gradients add up to the loss's, and only one group's saved activations are alive at a
    time. Against one pass for the global and one for the local views: XLA's temporary buffer
    436 -> 212 MB and the step 12 % faster (demo, CPU; benchmarks/NOTES.md, change 7).
    `batch` is the batch per device."""
    budget = max(batch * sc.size_global, MIN_PASS_TOKENS)
    passes = []

    def group(views, num_views, size, first):
        per = max(1, budget // (batch * size))
        for j in range(0, num_views, per):
            n = min(per, num_views - j)
            passes.append((views[:, j:j + n], n, first + j))

    group(g_views, sc.num_global, sc.size_global, 0)
    if l_views is not None:
        group(l_views, sc.num_local, sc.size_local, sc.num_global)
    return passes


def make_train_step(model_cfg: vit.ViTConfig, sc: StepConfig, num_heads_out: int = 1,
                    merge: bool = False, num_devices: int = 1) -> Callable:
    """Returns the un-jitted step(state, tokens, example_ids, key[, site_params]) -> (state, metrics).

    tokens [B, N, D] (any float dtype), example_ids [B] int32 global ids, key: the run's base key
    (folded with the step inside, so a resumed run draws the same views). With `merge`, site_params
    is the stacked pytree of the site students (leading axis = site) that act as fixed teachers.
    `num_devices` (the mesh size the batch is split over) only sizes the backward passes.
    """
    student = vit.Student(model_cfg, num_heads_out, sc.drop_path_rate)
    site_model = vit.Student(model_cfg, 1)

    def apply(model, params, views, drop_key=None):  # views [B, V, k, D] -> logits [H, V, B, K]
        b, v, k, d = views.shape
        x = views.reshape(b * v, k, d)  # batch-major rows
        if drop_key is None or sc.drop_path_rate == 0.0:
            logits = model.apply({"params": params}, x)
        else:
            logits = model.apply({"params": params}, x, deterministic=False,
                                 rngs={vit.DROP_PATH_RNG: drop_key})
        return logits.reshape(logits.shape[0], b, v, logits.shape[-1]).swapaxes(1, 2)

    def step_fn(state: TrainState, tokens, example_ids, key, site_params=None):
        hp = schedule_values(sc, state.step)
        step_key = jax.random.fold_in(key, state.step)
        # Views as [B, V, k, D]: the batch axis stays leading through every reshape, so with the
        # batch sharded across devices the model runs on each device's share (a view-major
        # [V*B] layout made XLA all-gather the views and run the whole step on every device).
        g_views, l_views = views_lib.make_views(step_key, tokens, example_ids, sc.num_global,
                                                sc.size_global, sc.num_local, sc.size_local,
                                                view_major=False)
        if merge:  # every site model scores the global views: [S, G, B, K]
            t_logits = jax.vmap(lambda p: apply(site_model, p, g_views)[0])(site_params)
        else:
            t_logits = apply(student, state.ema_params, g_views)
        t_logits = jax.lax.stop_gradient(t_logits)

        t_probs = jax.lax.stop_gradient(
            loss_lib.teacher_probs(t_logits, state.center, hp["teacher_temp"]))
        norm = t_logits.shape[0] * loss_lib.num_pairs(sc.num_global, sc.num_global + sc.num_local)

        drop_key = jax.random.fold_in(step_key, 0xD409)  # apart from the views' keys

        def views_loss(params, views, num_views, first_view):
            s_logits = apply(student, params, views, jax.random.fold_in(drop_key, first_view))
            return loss_lib.pair_cross_entropy(s_logits, t_probs, sc.student_temp, first_view) / norm

        # Backpropagated in groups of views, one after the other (see `backward_passes`); `after`
        # makes each group wait for the gradients so far.
        per_device = max(1, tokens.shape[0] // num_devices)
        loss, grads = 0.0, None
        for views, num_views, first_view in backward_passes(sc, g_views, l_views, per_device):
            if grads is not None:
                views = after(views, grads)
            part, part_grads = jax.value_and_grad(views_loss)(state.params, views, num_views, first_view)
            loss = loss + part
            grads = part_grads if grads is None else jax.tree_util.tree_map(jnp.add, grads, part_grads)
        return finish_step(sc, hp, state, grads, loss, t_logits, t_probs)

    return step_fn


def finish_step(sc: StepConfig, hp: dict, state: TrainState, grads, loss, t_logits, t_probs):
    """The end every DINO-style step shares, from the student's gradients: the optimizer update,
    the teacher EMA, the centre update from the teacher logits [H, G, B, K], and the step's metrics.
    Returns (new state, metrics)."""
    params, opt_state, grad_norm = optimizer_update(sc, hp, state, grads)
    ema = ema_update(state.ema_params, params, hp["momentum"])
    center = loss_lib.update_center(state.center, t_logits, sc.center_momentum)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema,
                           opt_state=opt_state, center=center)
    # param_norm turns inf/nan as soon as an update diverges, so the loop's finiteness check
    # never keeps a diverged state as the "last good" checkpoint.
    metrics = dict(loss=loss, teacher_entropy=loss_lib.mean_entropy(t_probs),
                   effective_prototypes=effective_prototypes(t_probs),
                   grad_norm=grad_norm, param_norm=optax.tree.norm(params), **hp)
    return new_state, metrics


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """The 1-D mesh 'data' over `devices` (default: every process's devices), ordered by process,
    then device id: each process holds one contiguous block of the batch axis (`shard_batch`)."""
    devices = devices if devices is not None else sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def jit_train_step(step_fn: Callable, mesh: Mesh, merge: bool = False) -> Callable:
    """jit over the mesh: state (and site teachers) replicated, batch sharded on 'data'."""
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    in_shardings = (replicated, batch, batch, replicated) + ((replicated,) if merge else ())
    return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(replicated, replicated),
                   donate_argnums=(0,), compiler_options=compiler_options(mesh))


def compiler_options(mesh: Mesh) -> Optional[dict]:
    """XLA options for the step. On CPU, the memory-minimising scheduler: the demo step's temporary
    buffer shrinks from 1003 to 852 MB at equal speed (benchmarks/NOTES.md)."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None


def release_host_memory() -> None:
    """Return the host heap that XLA's compiler freed to the OS (glibc keeps it otherwise: ~300 MB
    of RSS after compiling the demo step). Call after the step's first (compiling) call."""
    try:
        import ctypes  # noqa: PLC0415
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def process_block(batch: np.ndarray) -> np.ndarray:
    """This process's block of a global batch (all of it with one process): with P processes and a
    global batch of B rows (a multiple of P), process p's block is rows [p * B / P, (p + 1) * B / P)."""
    return np.array_split(batch, jax.process_count())[jax.process_index()]


def shard_batch(mesh: Mesh, *blocks):
    """Place a global batch on the mesh, split along the batch axis, from this process's block of
    it (`process_block`; the whole batch with one process). With P processes of D devices each and
    a global batch of B rows (a multiple of P * D), process p holds rows [p * B / P, (p + 1) * B / P),
    its d-th device rows [(p * D + d) * B / (P * D), ...) (the mesh orders devices by process). One
    global step is therefore the same sum over the same rows on any process count; only the order
    of the gradient all-reduce differs."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return tuple(jax.device_put(a, sharding) for a in blocks)
    n = jax.process_count()
    return tuple(jax.make_array_from_process_local_data(sharding, a, (len(a) * n,) + a.shape[1:])
                 for a in blocks)


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))
