"""Centralized (privacy-free) self-supervised baselines on pooled raw images.

Both train the patch embedding jointly with the body (no encryption is needed when the data is
pooled), with the project's MSD step machinery: the same DINO loss and centre (msd/loss.py), the
same schedules, optimizer, teacher EMA, centre update and metrics (msd/step.py `schedule_values`
and `finish_step`: AdamW with DINO's per-tensor clipping, weight-decay and teacher-momentum
cosines, teacher-temperature warm-up, last layer frozen for
config.optim.freeze_last_layer_epochs), the same initial weights as
the pipeline (head from party_key(seed, 'head'), student from party_key(seed, 'init')), batch
config.train.batch_size, jit over the device mesh with the batch sharded on 'data'.

- `train_pixel_dino`: DINO with pixel multi-crop views (data/pixel_views.py): config.msd.num_global
  global crops at image_size and config.msd.num_local local crops at config.baselines.local_size per
  image, so the student sees as many views per image per step as in token MSD.
- `train_centralized_msd`: MSD with the project's token views (msd/views.py) of the unpermuted
  tokens of the trainable head.

The position embedding stays the fixed one of the head (config.model.pos_embed). Local crops at the
smaller size use that embedding resized to their grid (bicubic, half-pixel centres), as DINO's
`interpolate_pos_encoding`: a local crop is a full-field view at a lower resolution, so its tokens
keep positions spanning the whole grid; this works the same for 'sincos' and 'random' embeddings
and leaves the embedding fixed. (The sincos table of the small grid would instead give every local
crop the positions of the image's top-left corner.)

The returned model is the teacher (EMA): {"head": {"patch_embed", "pos_embed"}, "body"}, the layout
of the pipeline's backbone, so msd_jax.evaluation applies to it unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.training import train as train_lib
from msd_jax.training import batches, loop
from msd_jax.data import pixel_views as pv_lib
from msd_jax.models import vit
from msd_jax.msd import loss as loss_lib
from msd_jax.msd import step as step_lib
from msd_jax.msd import views as views_lib
from msd_jax.protocols import pretrained


def make_ssl_step(model_cfg: vit.ViTConfig, sc: step_lib.StepConfig, pos_embed, *, mean: float,
                  std: float, pixel: Optional[pv_lib.PixelViewConfig]) -> Callable:
    """step(state, images, example_ids, key) -> (state, metrics) with state.params =
    {"patch_embed", "student": {"body", "heads_0"}}. `pixel`: pixel multi-crop views; None: token
    views (msd/views.py) of the unpermuted tokens."""
    student = vit.Student(model_cfg, 1, sc.drop_path_rate)
    pos_embed = jnp.asarray(pos_embed)

    def student_logits(params, tokens, drop_key):  # the training forward (stochastic depth)
        if sc.drop_path_rate == 0.0:
            return student.apply({"params": params}, tokens)
        return student.apply({"params": params}, tokens, deterministic=False,
                             rngs={vit.DROP_PATH_RNG: drop_key})

    # Views stay batch-major ([B, V, ...] flattened to [B*V, ...]) so the batch axis, sharded on a
    # mesh, is never mixed with the view axis: XLA keeps the step data-parallel (a view-major
    # flattening made it all-gather the views and run the whole step on every device).
    def flat(views):  # [B, V, ...] -> [B*V, ...]
        return views.reshape((-1,) + views.shape[2:])

    def split_views(logits, num_views):  # [H, B*V, K] -> [H, V, B, K]
        h, bv, k = logits.shape
        return logits.reshape(h, bv // num_views, num_views, k).swapaxes(1, 2)

    def step_fn(state: step_lib.TrainState, images, example_ids, key):
        hp = step_lib.schedule_values(sc, state.step)
        step_key = jax.random.fold_in(key, state.step)
        if pixel is not None:
            g_imgs, l_imgs = pv_lib.make_pixel_views(step_key, images, example_ids, pixel,
                                                     view_major=False)

            def views(params):
                g = vit.embed_images(model_cfg, params["patch_embed"], pos_embed, flat(g_imgs), mean, std)
                l = None if l_imgs is None else vit.embed_images(model_cfg, params["patch_embed"], pos_embed,
                                                      flat(l_imgs), mean, std)
                return g, l
        else:
            def views(params):
                tokens = vit.embed_images(model_cfg, params["patch_embed"], pos_embed, images, mean, std)
                g, l = views_lib.make_views(step_key, tokens, example_ids, sc.num_global, sc.size_global,
                                            sc.num_local, sc.size_local, view_major=False)
                return flat(g), None if l is None else flat(l)

        t_g, _ = views(state.ema_params)
        t_logits = student.apply({"params": state.ema_params["student"]}, t_g)
        t_logits = jax.lax.stop_gradient(split_views(t_logits, sc.num_global))

        drop_key = jax.random.fold_in(step_key, 0xD409)  # apart from the views' keys

        def loss_fn(params):
            g, l = views(params)
            s_logits = split_views(student_logits(params["student"], g, jax.random.fold_in(drop_key, 0)),
                                   sc.num_global)
            if l is not None:
                s_local = split_views(student_logits(params["student"], l, jax.random.fold_in(drop_key, 1)),
                                      sc.num_local)
                s_logits = jnp.concatenate([s_logits, s_local], axis=1)
            return loss_lib.dino_loss(s_logits, t_logits, state.center, sc.student_temp,
                                      hp["teacher_temp"])

        (loss, t_probs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return step_lib.finish_step(sc, hp, state, grads, loss, t_logits, t_probs)

    return step_fn


def initial_params(config, model_cfg: vit.ViTConfig):
    """The pipeline's initial head (party 'head') and student (party 'init'): (trainable params,
    fixed position embedding)."""
    head = pretrained.initial_head(config, model_cfg)
    student = pretrained.initial_student(config, model_cfg)
    return {"patch_embed": head["patch_embed"], "student": student}, np.asarray(head["pos_embed"])


def _train_ssl(config, model: vit.ViTConfig, images, *, total_steps: int, party: str, pixel: bool,
               ckpt_dir: Optional[str], metrics_path: Optional[str], tensorboard_dir: Optional[str],
               log) -> dict:
    images = batches.check_images(images, model)
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    mesh = step_lib.make_mesh()
    batch = batches.batch_size_for(config.train.batch_size, len(images), mesh.devices.size)
    order = batches.BatchOrder(jax.random.fold_in(train_lib.party_key(config.seed, party), 1),
                               len(images), batch)
    sc = step_lib.StepConfig.from_config(config, model.num_patches, total_steps,
                                         order.steps_per_epoch, batch)
    pc = pv_lib.PixelViewConfig.from_config(config) if pixel else None
    params, pos = initial_params(config, model)
    state = step_lib.init_state(params, 1, model.out_dim, sc)
    step_fn = step_lib.jit_train_step(
        make_ssl_step(model, sc, pos, mean=config.data.mean, std=config.data.std, pixel=pc), mesh)
    if pixel:
        describe = (f", pixel views {sc.num_global}x{pc.global_size}px + {sc.num_local}x"
                    f"{pc.local_size}px crops")
    else:
        describe = f", token views {sc.num_global}x{sc.size_global} + {sc.num_local}x{sc.size_local} tokens"
    meta = {"party": party, "total_steps": total_steps, "model": model.to_dict()}
    state = loop.run(config, party=party, step_fn=step_fn, state=state, arrays=(images,), order=order,
                     mesh=mesh, key=train_lib.party_key(config.seed, party), total_steps=total_steps,
                     ckpt_dir=ckpt_dir, meta=meta, metrics_path=metrics_path,
                     tensorboard_dir=tensorboard_dir, log=log, describe=describe)
    teacher = state.ema_params
    return {"head": {"patch_embed": teacher["patch_embed"], "pos_embed": pos[...]},
            "body": teacher["student"]["body"]}


def train_pixel_dino(config, model: vit.ViTConfig, images, *, total_steps: int,
                     ckpt_dir: Optional[str] = None, metrics_path: Optional[str] = None,
                     tensorboard_dir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Centralized DINO with pixel multi-crop views on the pooled raw images [N, H, W, C] in [0, 1].
    Returns the teacher {"head": {"patch_embed", "pos_embed"}, "body"}."""
    return _train_ssl(config, model, images, total_steps=total_steps, party="central_pixel_dino", pixel=True,
                      ckpt_dir=ckpt_dir, metrics_path=metrics_path, tensorboard_dir=tensorboard_dir,
                      log=log)


def train_centralized_msd(config, model: vit.ViTConfig, images, *, total_steps: int,
                          ckpt_dir: Optional[str] = None, metrics_path: Optional[str] = None,
                          tensorboard_dir: Optional[str] = None,
                          log: Callable[[str], None] = print) -> dict:
    """Centralized MSD: token views of the unpermuted tokens, patch embedding trained jointly.
    Returns the teacher {"head": {"patch_embed", "pos_embed"}, "body"}."""
    return _train_ssl(config, model, images, total_steps=total_steps, party="central_msd", pixel=False,
                      ckpt_dir=ckpt_dir, metrics_path=metrics_path, tensorboard_dir=tensorboard_dir,
                      log=log)
