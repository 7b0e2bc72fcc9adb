"""Training a classifier on a backbone (head + body) from labelled images: the supervised baseline
(protocols/supervised.py) trains one from scratch, fine-tuning (evaluation/finetune.py) from a
pretrained backbone.

The classifier reads one feature of the body output (vit.pool_features). Images are normalised with
config.data.mean/std (as the sites do) before the head; the head's position embedding always stays
fixed, its patch embedding is trained when `train_head`. Training: light augmentation (random
resized crop + horizontal flip, keyed per example as data/pixel_views.py), cross-entropy, AdamW
(decoupled weight decay on the decayed parameters only, vit.is_decay_param) with DINO's per-tensor
gradient clipping, linear warm-up then cosine (msd/schedules.py), and layer-wise lr decay (BEiT /
MAE fine-tuning: the classifier and final norm at the full lr, block i at decay^(depth - i), the
head and CLS tokens at decay^(depth + 1)).

Model selection: given a validation set (held out of the labelled train data by the caller), the
parameters are scored on it at the start and every `select_every` steps (default: once per epoch,
at most MAX_SCORES times), and the best ones (highest validation accuracy, then lowest validation
cross-entropy, then the earliest) are returned.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from msd_jax.data import pixel_views as pv_lib
from msd_jax.models import vit
from msd_jax.msd import schedules
from msd_jax.msd import step as step_lib
from msd_jax.training import batches, loop


@flax.struct.dataclass
class ClassifierState:
    step: jax.Array
    params: Any          # {"patch_embed"? , "body", "classifier": {"kernel", "bias"}}
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    num_classes: int
    total_steps: int
    lr: float                      # absolute (already scaled by the batch)
    min_lr: float
    warmup_steps: int
    weight_decay: float
    layer_decay: float
    clip_grad: float
    crop_scale: Tuple[float, float]
    feature_kind: str
    train_head: bool
    b1: float
    b2: float
    drop_path_rate: float          # stochastic depth of the body while training (vit.Body)


def layer_id(path, depth: int) -> int:
    """0: patch embedding, CLS token and CLS position; i + 1: body block i; depth + 1: final norm and
    the classifier."""
    keys = [getattr(p, "key", str(p)) for p in path]
    if keys[0] == "patch_embed":
        return 0
    if keys[0] == "classifier":
        return depth + 1
    for k in keys[1:]:
        m = re.fullmatch(r"block(\d+)", str(k))
        if m:
            return int(m.group(1)) + 1
        if k in ("cls_token", "cls_pos_embed"):
            return 0
    return depth + 1


def layer_scales(params, depth: int, layer_decay: float):
    """Per-leaf lr multipliers layer_decay ** (depth + 1 - layer_id)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: float(layer_decay) ** (depth + 1 - layer_id(path, depth)), params)


def make_forward(model_cfg: vit.ViTConfig, s: ClassifierSettings, pos_embed, fixed_patch_embed,
                 mean: float, std: float) -> Callable:
    """forward(params, images [B, S, S, C] in [0, 1], drop_key=None) -> logits [B, num_classes]
    (float32); with `drop_key`, the training forward (stochastic depth at s.drop_path_rate)."""
    pos_embed = jnp.asarray(pos_embed)
    body = vit.Body(model_cfg, s.drop_path_rate)

    def forward(params, images, drop_key=None):
        patch_embed = params["patch_embed"] if s.train_head else fixed_patch_embed
        tokens = vit.embed_images(model_cfg, patch_embed, pos_embed, images, mean, std)
        if drop_key is None or s.drop_path_rate == 0.0:
            out = body.apply({"params": params["body"]}, tokens)
        else:
            out = body.apply({"params": params["body"]}, tokens, deterministic=False,
                             rngs={vit.DROP_PATH_RNG: drop_key})
        f = vit.pool_features(out, s.feature_kind).astype(jnp.float32)
        c = params["classifier"]
        return f @ c["kernel"] + c["bias"]

    return forward


def make_classifier_step(model_cfg: vit.ViTConfig, s: ClassifierSettings, forward: Callable,
                         pc: pv_lib.PixelViewConfig, scales) -> Callable:
    adam = optax.scale_by_adam(b1=s.b1, b2=s.b2, eps=1e-8)

    def step_fn(state: ClassifierState, images, labels, example_ids, key):
        lr = schedules.warmup_cosine(state.step, s.lr, s.min_lr, s.total_steps, s.warmup_steps)
        step_key = jax.random.fold_in(key, state.step)
        views = pv_lib.light_views(step_key, images, example_ids, model_cfg.image_size, s.crop_scale, pc)
        drop_key = jax.random.fold_in(step_key, 0xD409)  # apart from the views' keys

        def loss_fn(params):
            logits = forward(params, views, drop_key)
            logp = jax.nn.log_softmax(logits, axis=-1)
            ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))
            return ce, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = step_lib.clip_per_tensor(grads, s.clip_grad)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = adam.update(grads, state.opt_state, state.params)

        def apply(path, p, u, scale):  # AdamW, decoupled decay, layer-wise lr
            wd = s.weight_decay if vit.is_decay_param(path) else 0.0
            return p - lr * scale * (u + wd * p)

        params = jax.tree_util.tree_map_with_path(apply, state.params, updates, scales)
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        metrics = dict(loss=loss, accuracy=acc, grad_norm=grad_norm, lr=lr)
        return ClassifierState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


MAX_SCORES = 20  # validation scores of a run at most, when scored once per epoch


def validation_score(probs_fn: Callable, params, images, labels, batch_size: int) -> dict:
    """{"accuracy", "loss"} (mean cross-entropy) of `params` on a labelled validation set;
    `probs_fn`: softmax_fn(forward)."""
    probs = np.asarray(predict_with(probs_fn, params, images, batch_size), np.float64)
    labels = np.asarray(labels).astype(np.int64)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == labels)), "loss": float(-np.mean(np.log(p_true)))}


def _better(a: dict, b: Optional[dict]) -> bool:
    """Whether validation score `a` beats `b`: higher accuracy, then lower loss (ties keep `b`)."""
    if b is None:
        return True
    return (a["accuracy"], -a["loss"]) > (b["accuracy"], -b["loss"])


def selection_points(total_steps: int, every: int) -> list[int]:
    """The steps after which the parameters are scored: every `every`-th one and the last."""
    every = max(1, int(every))
    return sorted(set(range(every, total_steps, every)) | {total_steps})


def train_classifier(config, model: vit.ViTConfig, head_params, body_params, images, labels,
                     s: ClassifierSettings, *, batch_size: int, key: jax.Array, party: str,
                     log: Callable[[str], None] = print, log_every: Optional[int] = None,
                     classifier: Optional[dict] = None, val: Optional[tuple] = None,
                     select_every: Optional[int] = None, selection: Optional[list] = None):
    """Trains {patch_embed (if s.train_head), body, classifier} on labelled images, the classifier
    from `classifier` ({"kernel", "bias"}) or N(0, 0.01^2). `val`: (images, labels) to select the
    returned parameters on, scored at step 0 and every `select_every` steps (default: once per epoch
    of the train images); None: the last parameters. `selection`, with `val`: a list that receives
    one {"step", "val_accuracy", "val_loss", "selected"} dict per scored step. Returns (params,
    forward, history) where history lists the logged metrics dicts."""
    images = batches.check_images(images, model)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape ({len(images)},), got {labels.shape}")
    if labels.min() < 0 or labels.max() >= s.num_classes:
        raise ValueError(f"labels: expected class ids in [0, {s.num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    if s.total_steps < 1:
        raise ValueError(f"steps: expected >= 1, got {s.total_steps}")
    mesh = step_lib.make_mesh()
    batch = batches.batch_size_for(batch_size, len(images), mesh.devices.size)
    order = batches.BatchOrder(jax.random.fold_in(key, 1), len(images), batch)
    fdim = vit.feature_dim(model, s.feature_kind)
    if classifier is None:
        classifier = {"kernel": 0.01 * jax.random.normal(jax.random.fold_in(key, 2),
                                                         (fdim, s.num_classes), jnp.float32),
                      "bias": jnp.zeros((s.num_classes,), jnp.float32)}
    if tuple(np.shape(classifier["kernel"])) != (fdim, s.num_classes):
        raise ValueError(f"classifier kernel: expected shape {(fdim, s.num_classes)}, got "
                         f"{np.shape(classifier['kernel'])}")
    params = {"body": jax.tree_util.tree_map(jnp.asarray, body_params),
              "classifier": {k: jnp.asarray(v, jnp.float32) for k, v in classifier.items()}}
    if s.train_head:
        params["patch_embed"] = jax.tree_util.tree_map(jnp.asarray, head_params["patch_embed"])
    params = jax.device_get(params)
    forward = make_forward(model, s, head_params["pos_embed"],
                           jax.tree_util.tree_map(jnp.asarray, head_params["patch_embed"]),
                           config.data.mean, config.data.std)
    pc = pv_lib.PixelViewConfig.from_config(config)
    scales = layer_scales(params, model.depth, s.layer_decay)
    step_fn = make_classifier_step(model, s, forward, pc, scales)
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step_fn = jax.jit(step_fn, in_shardings=(rep, bat, bat, bat, rep), out_shardings=(rep, rep),
                      donate_argnums=(0,))
    state = ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optax.scale_by_adam(b1=s.b1, b2=s.b2).init(params))
    history = []

    def run_to(state, stop_at):
        # the opening line once, not again when training resumes after a validation score
        quiet = int(state.step) > 0
        chunk_log = (lambda m: None if m.startswith(f"[{party}] training ") else log(m)) if quiet else log
        return loop.run(config, party=party, step_fn=step_fn, state=state, arrays=(images, labels),
                        order=order, mesh=mesh, key=jax.random.fold_in(key, 3), total_steps=s.total_steps,
                        log=chunk_log, log_every=log_every, on_log=lambda step, m: history.append(m),
                        stop_at=stop_at, describe=f", {s.feature_kind} feature -> {s.num_classes} classes")

    if val is None:
        return run_to(state, None).params, forward, history
    val_images = batches.check_images(val[0], model, "val images")
    val_labels = np.asarray(val[1]).astype(np.int32)
    # once per epoch, but at most MAX_SCORES times: a small set's epoch is a few steps
    every = select_every or max(order.steps_per_epoch, -(-s.total_steps // MAX_SCORES))
    probs_fn = softmax_fn(forward)
    best_params, best_score, best_step, scores = state.params, None, 0, []
    for stop in [0] + selection_points(s.total_steps, every):
        if stop:
            state = run_to(state, stop)
        score = validation_score(probs_fn, state.params, val_images, val_labels, config.eval.batch_size)
        scores.append({"step": stop, "val_accuracy": score["accuracy"], "val_loss": score["loss"]})
        if _better(score, best_score):
            # a copy: the next steps may reuse the buffers of donated state
            best_params, best_score, best_step = jax.tree_util.tree_map(np.array, state.params), score, stop
    for entry in scores:
        entry["selected"] = entry["step"] == best_step
    if selection is not None:
        selection.extend(scores)
    log(f"[{party}] selected step {best_step}/{s.total_steps} on {len(val_labels)} validation images: "
        f"accuracy {best_score['accuracy']:.4f} loss {best_score['loss']:.4f}")
    return best_params, forward, history


def softmax_fn(forward: Callable) -> Callable:
    """jit(params, images -> softmax probabilities), compiled once per batch shape."""
    return jax.jit(lambda p, x: jax.nn.softmax(forward(p, x), axis=-1))


def predict(forward: Callable, params, images, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities [N, num_classes] (no augmentation), batched, last batch padded."""
    return predict_with(softmax_fn(forward), params, images, batch_size)


def predict_with(fn: Callable, params, images, batch_size: int = 256) -> np.ndarray:
    """predict with a prebuilt softmax_fn."""
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size and start > 0:
            batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
        out.append(np.asarray(fn(params, batch))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
