"""Full fine-tuning of a backbone with a new linear classifier, and the classifier training it shares
with the supervised baseline (msd_jax/baselines/supervised.py).

The classifier reads one feature of the body output (eval.features' kinds: 'cls', 'avgpool',
'cls_avgpool'). Images are normalised with config.data.mean/std (as encrypt.normalize) before the
head; the head's position embedding always stays fixed, its patch embedding is trained when
`train_head`. Training: light augmentation (random resized crop + horizontal flip, keyed per example
as baselines/pixel_views.py), cross-entropy, AdamW (decoupled weight decay on the decayed parameters
only, vit.is_decay_param) with DINO's per-tensor gradient clipping, linear warm-up then cosine
(msd/schedules.py), and layer-wise lr decay (BEiT / MAE fine-tuning: the classifier and final norm at
the full lr, block i at decay^(depth - i), the head and CLS tokens at decay^(depth + 1)).
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

from msd_jax import config as config_lib
from msd_jax import train as train_lib
from msd_jax.baselines import loop
from msd_jax.baselines import pixel_views as pv_lib
from msd_jax.baselines.centralized import embed
from msd_jax.eval import features as features_lib
from msd_jax.eval import linear as linear_lib
from msd_jax.eval.features import KINDS, parse_kinds
from msd_jax.eval.metrics import accuracy, roc_auc
from msd_jax.models import vit
from msd_jax.msd import schedules
from msd_jax.msd import step as step_lib

# config.eval keys this module reads, with their defaults (msd_jax/config.py; on Br35H with
# demo:quick and 30-100 steps, finetune_init 'random' and 'linear_probe' scored alike, 0.60-0.67)
FINETUNE_DEFAULTS = {k: v for k, v in config_lib.base_config().eval.items() if k.startswith("finetune_")}


def _eval_setting(config, key):
    return config.eval.get(key, FINETUNE_DEFAULTS[key])


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
    layer_decay: float = 1.0
    clip_grad: float = 3.0
    crop_scale: Tuple[float, float] = (0.6, 1.0)
    feature_kind: str = "cls"
    train_head: bool = True
    b1: float = 0.9
    b2: float = 0.999


def pool_features(out: jax.Array, kind: str) -> jax.Array:
    """Body output [B, 1 + n, D] -> the feature of `kind` (as eval/features.py)."""
    cls, avg = out[:, 0], out[:, 1:].mean(axis=1)
    if kind == "cls":
        return cls
    if kind == "avgpool":
        return avg
    if kind == "cls_avgpool":
        return jnp.concatenate([cls, avg], axis=-1)
    raise ValueError(f"feature kind: expected one of {list(KINDS)}, got {kind!r}")


def feature_dim(model_cfg: vit.ViTConfig, kind: str) -> int:
    return 2 * model_cfg.embed_dim if kind == "cls_avgpool" else model_cfg.embed_dim


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
    """forward(params, images [B, S, S, C] in [0, 1]) -> logits [B, num_classes] (float32)."""
    pos_embed = jnp.asarray(pos_embed)

    def forward(params, images):
        patch_embed = params["patch_embed"] if s.train_head else fixed_patch_embed
        tokens = embed(model_cfg, patch_embed, pos_embed, images, mean, std)
        out = vit.Body(model_cfg).apply({"params": params["body"]}, tokens)
        f = pool_features(out, s.feature_kind).astype(jnp.float32)
        c = params["classifier"]
        return f @ c["kernel"] + c["bias"]

    return forward


def make_classifier_step(model_cfg: vit.ViTConfig, s: ClassifierSettings, forward: Callable,
                         pc: pv_lib.PixelViewConfig, scales) -> Callable:
    adam = optax.scale_by_adam(b1=s.b1, b2=s.b2, eps=1e-8)

    def step_fn(state: ClassifierState, images, labels, example_ids, key):
        lr = schedules.warmup_cosine(state.step, s.lr, s.min_lr, s.total_steps, s.warmup_steps)
        views = pv_lib.light_views(jax.random.fold_in(key, state.step), images, example_ids,
                                   model_cfg.image_size, s.crop_scale, pc)

        def loss_fn(params):
            logits = forward(params, views)
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


def train_classifier(config, head_params, body_params, images, labels, s: ClassifierSettings, *,
                     batch_size: int, key: jax.Array, party: str, log: Callable[[str], None] = print,
                     log_every: Optional[int] = None, classifier: Optional[dict] = None):
    """Trains {patch_embed (if s.train_head), body, classifier} on labelled images, the classifier
    from `classifier` ({"kernel", "bias"}) or N(0, 0.01^2). Returns (params, forward, history) where
    history lists the logged metrics dicts."""
    model_cfg = vit.ViTConfig.from_config(config.model)
    images = loop.check_images(images, model_cfg)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape ({len(images)},), got {labels.shape}")
    if labels.min() < 0 or labels.max() >= s.num_classes:
        raise ValueError(f"labels: expected class ids in [0, {s.num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    if s.total_steps < 1:
        raise ValueError(f"steps: expected >= 1, got {s.total_steps}")
    mesh = step_lib.make_mesh()
    batch = train_lib.batch_size_for(batch_size, len(images), mesh.devices.size)
    order = train_lib.BatchOrder(jax.random.fold_in(key, 1), len(images), batch)
    fdim = feature_dim(model_cfg, s.feature_kind)
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
    forward = make_forward(model_cfg, s, head_params["pos_embed"],
                           jax.tree_util.tree_map(jnp.asarray, head_params["patch_embed"]),
                           config.data.mean, config.data.std)
    pc = pv_lib.PixelViewConfig.from_config(config)
    scales = layer_scales(params, model_cfg.depth, s.layer_decay)
    step_fn = make_classifier_step(model_cfg, s, forward, pc, scales)
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step_fn = jax.jit(step_fn, in_shardings=(rep, bat, bat, bat, rep), out_shardings=(rep, rep),
                      donate_argnums=(0,))
    state = ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optax.scale_by_adam(b1=s.b1, b2=s.b2).init(params))
    history = []
    state = loop.run(config, party=party, state=state, step_fn=step_fn, arrays=(images, labels),
                     order=order, mesh=mesh, key=jax.random.fold_in(key, 3), total_steps=s.total_steps,
                     batch=batch, ckpt_dir=None, metrics_path=None, log=log, log_every=log_every,
                     describe=f", {s.feature_kind} feature -> {s.num_classes} classes",
                     on_log=lambda step, m: history.append(m))
    return state.params, forward, history


def fit_linear_classifier(train_features, labels, num_classes: int, *, steps: int, weight_decay: float,
                          seed: int = 0) -> dict:
    """The project's linear probe (eval/linear.py: train-standardised features, L-BFGS on mean
    cross-entropy + weight_decay / 2 ||W||^2, W0 ~ N(0, 0.01^2) from `seed`) expressed on the raw
    features: {"kernel": W / std, "bias": b - (mean / std) W}, so that
    softmax(features @ kernel + bias) equals linear_probe's probabilities."""
    x = np.asarray(train_features, np.float64)
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), linear_lib._STD_FLOOR)
    y = jax.nn.one_hot(jnp.asarray(labels, jnp.int32), num_classes, dtype=jnp.float32)
    w0 = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], num_classes), jnp.float32)
    w, b = linear_lib._fit((w0, jnp.zeros((num_classes,), jnp.float32)),
                           jnp.asarray((x - mean) / std, jnp.float32), y, jnp.float32(weight_decay),
                           jnp.float32(0.1), steps=int(steps), optimizer="lbfgs")
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    kernel = w / std[:, None]
    return {"kernel": kernel.astype(np.float32), "bias": (b - mean @ kernel).astype(np.float32)}


def predict(forward: Callable, params, images, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities [N, num_classes] (no augmentation), batched, last batch padded."""
    images = np.asarray(images, np.float32)
    fn = jax.jit(lambda p, x: jax.nn.softmax(forward(p, x), axis=-1))
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size and start > 0:
            batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
        out.append(np.asarray(fn(params, batch))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune(config, head_params, body_params, train_set, test_set, *, steps: int,
             train_head: bool = False, seed: int = 0, log: Callable[[str], None] = print,
             log_every: Optional[int] = None) -> dict:
    """`finetune_eval` plus the trained params and the logged training metrics ("history")."""
    model_cfg = vit.ViTConfig.from_config(config.model)
    kind = _eval_setting(config, "finetune_features") or parse_kinds(config.eval.features)[0]
    parse_kinds(kind)
    num_classes = len(train_set.class_names)
    if num_classes < 2:
        raise ValueError(f"train_set: expected >= 2 classes, got class_names {train_set.class_names}")
    if tuple(test_set.class_names) != tuple(train_set.class_names):
        raise ValueError(f"test_set.class_names {test_set.class_names} differ from train_set's "
                         f"{train_set.class_names}")
    batch_size = int(_eval_setting(config, "finetune_batch_size"))
    batch = min(batch_size, len(train_set))
    s = ClassifierSettings(
        num_classes=num_classes, total_steps=int(steps),
        lr=float(_eval_setting(config, "finetune_lr")) * batch / 256.0,
        min_lr=float(_eval_setting(config, "finetune_min_lr")),
        warmup_steps=int(round(float(_eval_setting(config, "finetune_warmup_frac")) * steps)),
        weight_decay=float(_eval_setting(config, "finetune_weight_decay")),
        layer_decay=float(_eval_setting(config, "finetune_layer_decay")),
        clip_grad=float(config.optim.clip_grad),
        crop_scale=tuple(float(v) for v in _eval_setting(config, "finetune_crop_scale")),
        feature_kind=kind, train_head=bool(train_head), b1=config.optim.b1, b2=config.optim.b2)
    if not 0 < s.layer_decay <= 1:
        raise ValueError(f"config.eval.finetune_layer_decay: expected in (0, 1], got {s.layer_decay}")
    key = jax.random.fold_in(train_lib.party_key(seed, "finetune"), 0)
    init = _eval_setting(config, "finetune_init")
    if init not in ("linear_probe", "random"):
        raise ValueError(f"config.eval.finetune_init: expected 'linear_probe' or 'random', got {init!r}")
    classifier = None
    if init == "linear_probe":
        feats = features_lib.extract_features(head_params, body_params, model_cfg, train_set.images,
                                              mean=config.data.mean, std=config.data.std,
                                              batch_size=int(config.eval.get("batch_size", 256)))[kind]
        classifier = fit_linear_classifier(feats, train_set.labels, num_classes,
                                           steps=int(config.eval.get("linear_steps", 500)),
                                           weight_decay=float(config.eval.get("linear_weight_decay", 1e-4)),
                                           seed=seed)
    params, forward, history = train_classifier(
        config, head_params, body_params, train_set.images, train_set.labels, s, batch_size=batch_size,
        key=key, party="finetune", log=log, log_every=log_every, classifier=classifier)
    probs = predict(forward, params, test_set.images, int(config.eval.get("batch_size", 256)))
    result = {"accuracy": accuracy(probs, test_set.labels), "auc": roc_auc(probs, test_set.labels)}
    log(f"[finetune] {steps} steps ({'head + ' if train_head else ''}body, {kind}, {init} init): test accuracy "
        f"{result['accuracy']:.4f} auc {result['auc']:.4f}")
    return {**result, "params": params, "history": history, "probs": probs}


def finetune_eval(config, head_params, body_params, train_set, test_set, *, steps: int,
                  train_head: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Fine-tunes the backbone (the body, and the patch embedding if `train_head`) with a new linear
    classifier on train_set for `steps` steps; returns {"accuracy", "auc"} on test_set."""
    r = finetune(config, head_params, body_params, train_set, test_set, steps=steps,
                 train_head=train_head, seed=seed, log=log)
    return {"accuracy": r["accuracy"], "auc": r["auc"]}
