"""Helpers every test file shares: the repository's config files, and tiny models and configs built
from base_config() (the one place a default lives) with a few fields changed."""
import importlib.util
import os
import pathlib

import numpy as np
from PIL import Image

from msd_jax import config as config_lib
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.models import vit

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
    """configs/<name>.py's get_config(arg), as `--config configs/<name>.py[:arg]` reads it."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_model_config(**fields):
    """base_config().model with `fields` changed, a named variant resolved (as the command line
    does when it reads a config)."""
    c = config_lib.base_config()
    c.model.update(fields)
    return config_lib.resolve_variant(c).model


def tiny_model(**fields) -> vit.ViTConfig:
    """The ViTConfig of tiny_model_config(**fields)."""
    return vit.ViTConfig.from_config(tiny_model_config(**fields))


def model_of(config) -> vit.ViTConfig:
    """The model config the command line builds once from `config` and hands to every party."""
    return vit.ViTConfig.from_config(config.model)


def mode_of(config) -> EncryptionMode:
    """The encryption mode the command line parses once from `config` and hands to every party."""
    return EncryptionMode.from_config(config.encrypt)


# A model small enough for a training step in well under a second on one CPU core.
TINY_MODEL = dict(image_size=16, patch_size=4, embed_dim=16, num_heads=2, depth=1, out_dim=32,
                  head_hidden_dim=16, head_bottleneck_dim=8)


def tiny_demo_config(**model_fields):
    """configs/demo.py:quick (the demo's recipe) with TINY_MODEL, then `model_fields`."""
    c = load_config("demo", "quick")
    c.model.update({**TINY_MODEL, **model_fields})
    return c


# The model of the step, baseline and fine-tuning references: TINY_MODEL at twice the width.
SMALL_MODEL = dict(image_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=1, out_dim=64,
                   head_hidden_dim=32, head_bottleneck_dim=16)

# Two local views of a quarter of the tokens, and neither lr warm-up nor a frozen last layer: the
# first step already moves every parameter at the full rate.
SHORT_MSD = dict(msd=dict(num_local=2, ratio_local=0.25),
                 optim=dict(warmup_frac=0.0, freeze_last_layer_epochs=0.0))


def tiny_config(*updates, start=None, **sections):
    """`start` (default: base_config() with SMALL_MODEL) with each of `updates`, dicts of section
    updates such as {"msd": {...}, "train": {...}}, applied in order, then `sections` (model=...,
    train=..., eval=...)."""
    c = start
    if c is None:
        c = config_lib.base_config()
        c.model.update(SMALL_MODEL)
    for update in (*updates, sections):
        for section, fields in update.items():
            c[section].update(fields)
    return c


def class_folder(folder, seed, per_class=6) -> str:
    """An ImageFolder of two separable classes ('bright', 'dark'), `per_class` noisy 20 x 20 grey
    PNGs each, drawn from `seed`: the site, test and proxy folders of the end-to-end tests."""
    rng = np.random.default_rng(seed)
    for cls, base in (("bright", 190), ("dark", 60)):
        os.makedirs(folder / cls, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 25, (20, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(folder / cls / f"img{i:02d}.png")
    return str(folder)
