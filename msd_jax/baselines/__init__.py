"""Baselines for a fair comparison with MS-DINO (issue 3).

- `pixel_views`: DINO multi-crop pixel augmentations (jittable, static shapes, keyed per example).
- `centralized`: privacy-free upper bounds on pooled raw images: DINO with pixel views
  (`train_pixel_dino`) and MSD with token views and a trained patch embedding
  (`train_centralized_msd`).
- `supervised`: the same ViT trained from scratch on the labels (`train_supervised`,
  `predict_supervised`).

Every optional setting is read with `config.baselines.get(key, default)` (see `settings`), so a config
without a `baselines` section runs with the defaults listed in `DEFAULTS`.
"""
from msd_jax.baselines.settings import DEFAULTS, setting  # noqa: F401
