"""Linear (multinomial logistic regression) probe on frozen features, and the combined
kNN + linear evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from msd_jax.evaluation.intervals import scores_with_intervals
from msd_jax.evaluation.knn import knn_predict
from msd_jax.evaluation.metrics import _check_features, _check_labels, _check_num_classes, check_probe_inputs

__all__ = ["linear_probe", "evaluate_features"]

_STD_FLOOR = 1e-6     # features with (near-)zero train std are only centred, not blown up
_GRAD_TOL = 1e-6      # stop L-BFGS once ||grad||_2 falls below this (float32 noise level)


def _loss_fn(params, x, y_onehot, weight_decay):
    """Mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not regularised)."""
    w, b = params
    logits = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b
    ce = -jnp.mean(jnp.sum(y_onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return ce + 0.5 * weight_decay * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("steps", "optimizer"))
def _fit(params, x, y_onehot, weight_decay, learning_rate, *, steps: int, optimizer: str):
    fun = functools.partial(_loss_fn, x=x, y_onehot=y_onehot, weight_decay=weight_decay)

    if optimizer == "lbfgs":
        # Default: L-BFGS with optax's zoom line search. The objective is smooth and strongly
        # convex (weight_decay > 0) and the problem is small and full-batch, so a quasi-Newton
        # method reaches the actual optimum in tens of iterations, independently of any learning
        # rate; a first-order method (adam) with a fixed step only hovers near it after 500 steps,
        # which makes the probe's result depend on the step size / step count. The step length
        # comes from the line search, so `learning_rate` is not used here.
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(fun)

        def step(carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(p, updates), state

        def keep_going(carry):
            _, state = carry
            count = otu.tree_get(state, "count")
            grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
            # count == 0: the state's grad is still the zero placeholder, so always step once
            # (unless steps == 0).
            return (count < steps) & ((count == 0) | ((grad_norm >= _GRAD_TOL)
                                                     & jnp.isfinite(grad_norm)))

        params, _ = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
        return params

    # optimizer == "adam": plain full-batch adam with a fixed number of steps.
    opt = optax.adam(learning_rate)
    grad_fn = jax.grad(fun)

    def body(_, carry):
        p, state = carry
        updates, state = opt.update(grad_fn(p), state, p)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return params


@jax.jit
def _predict(params, x):
    w, b = params
    return jax.nn.softmax(jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b, axis=-1)


def linear_probe(train_features, train_labels, test_features, num_classes: int, *,
                 steps: int = 500, learning_rate: float = 0.1, weight_decay: float = 1e-4,
                 seed: int = 0, optimizer: str = "lbfgs") -> np.ndarray:
    """Multinomial logistic regression on frozen features.

    Features are standardised with the train mean / std (std floored at 1e-6); the objective
    mean cross-entropy + weight_decay / 2 * ||W||^2 (bias unregularised) is minimised full-batch
    inside one jitted loop. ``optimizer="lbfgs"`` (default): optax L-BFGS with zoom line search,
    at most ``steps`` iterations, stopping early once ||grad|| < 1e-6; ``learning_rate`` is unused
    (the line search picks the step). ``optimizer="adam"``: ``steps`` adam steps at
    ``learning_rate``. W is initialised with N(0, 0.01^2) from ``seed``, b with zeros, so the
    result is deterministic for a fixed seed.

    Returns test class probabilities [M, num_classes] as float32 numpy.
    """
    train_features, train_labels, test_features, num_classes = check_probe_inputs(
        train_features, train_labels, test_features, num_classes)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not np.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")

    train = np.asarray(train_features, np.float64)
    mean = train.mean(axis=0)
    std = np.maximum(train.std(axis=0), _STD_FLOOR)
    x_train = jnp.asarray((train - mean) / std, jnp.float32)
    x_test = jnp.asarray((np.asarray(test_features, np.float64) - mean) / std, jnp.float32)
    y_onehot = jax.nn.one_hot(jnp.asarray(train_labels, jnp.int32), num_classes,
                              dtype=jnp.float32)

    key = jax.random.PRNGKey(seed)
    params = (0.01 * jax.random.normal(key, (train_features.shape[1], num_classes), jnp.float32),
              jnp.zeros((num_classes,), jnp.float32))
    params = _fit(params, x_train, y_onehot, jnp.float32(weight_decay),
                  jnp.float32(learning_rate), steps=int(steps), optimizer=optimizer)
    return np.asarray(_predict(params, x_test), dtype=np.float32)


def evaluate_features(train_features, train_labels, test_features, test_labels, num_classes, *,
                      knn_k: int, knn_temperature: float, linear_steps: int, linear_optimizer: str,
                      linear_lr: float, linear_weight_decay: float, seed: int,
                      bootstrap_resamples: int = 0, probs_out: dict | None = None) -> dict:
    """Run both probes and score them on the test set.

    Returns {"knn": {"accuracy": float, "auc": float}, "linear": {"accuracy": float,
    "auc": float}}; auc is nan where undefined (a single class in test_labels). With
    bootstrap_resamples > 0 each also holds "accuracy_ci95" and "auc_ci95" [low, high]
    (intervals.scores_with_intervals, resampled from `seed`: both probes on the same resamples).
    `probs_out`, when given, receives each probe's test probabilities under the same names (for
    paired comparisons of two backbones on the same test images).
    """
    num_classes = _check_num_classes(num_classes)
    test_features = _check_features(test_features, "test_features")
    test_labels = _check_labels(test_labels, "test_labels", test_features.shape[0], num_classes)
    knn_probs = knn_predict(train_features, train_labels, test_features, num_classes,
                            k=knn_k, temperature=knn_temperature)
    lin_probs = linear_probe(train_features, train_labels, test_features, num_classes,
                             steps=linear_steps, learning_rate=linear_lr,
                             weight_decay=linear_weight_decay, seed=seed, optimizer=linear_optimizer)
    if probs_out is not None:
        probs_out.update(knn=knn_probs, linear=lin_probs)
    return {name: scores_with_intervals(probs, test_labels, resamples=bootstrap_resamples, seed=seed)
            for name, probs in (("knn", knn_probs), ("linear", lin_probs))}


def evaluate_with_config(config, f_train, y_train, f_test, y_test, num_classes: int, *,
                         probs_out: dict | None = None) -> dict:
    """`evaluate_features` with the probe settings of config.eval and the config seed: the one
    evaluation every report (report.json, eval_by_site, the comparison) uses."""
    ev = config.eval
    return evaluate_features(f_train, y_train, f_test, y_test, num_classes, knn_k=ev.knn_k,
                             knn_temperature=ev.knn_temperature, linear_steps=ev.linear_steps,
                             linear_optimizer=ev.linear_optimizer, linear_lr=ev.linear_lr, linear_weight_decay=ev.linear_weight_decay,
                             seed=config.seed, bootstrap_resamples=ev.bootstrap_resamples, probs_out=probs_out)
