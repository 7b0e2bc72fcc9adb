"""Every shipped config builds: valid keys, a valid model, shapes that trace."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from msd_jax import config as config_lib
from msd_jax.models import vit

CONFIGS = sorted(pathlib.Path(__file__).resolve().parent.parent.glob("configs/*.py"))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    c = config_lib.validate(load(path))
    cfg = vit.ViTConfig.from_config(c.model)
    shapes = jax.eval_shape(lambda k: vit.init_student(cfg, k), jax.random.key(0))
    assert shapes["body"]["cls_token"].shape == (1, 1, cfg.embed_dim)
    assert shapes["heads_0"]["last_layer"].shape == (cfg.head_bottleneck_dim, cfg.out_dim)
    tokens = jax.ShapeDtypeStruct((2, cfg.num_patches, cfg.embed_dim), jnp.float32)
    out = jax.eval_shape(lambda p, t: vit.Student(cfg).apply({"params": p}, t), shapes, tokens)
    assert out.shape == (1, 2, cfg.out_dim)


def test_vit_s16_is_paper_scale():
    c = load(pathlib.Path(__file__).resolve().parent.parent / "configs" / "vit_s16.py")
    cfg = vit.ViTConfig.from_config(c.model)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.image_size, cfg.patch_size) == (384, 12, 6, 224, 16)


def test_validate_names_the_field():
    c = config_lib.base_config()
    c.protocol = "fedsgd"
    with pytest.raises(ValueError, match="config.protocol"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.data.name = "folders"
    with pytest.raises(ValueError, match="config.data.site_dirs"):
        config_lib.validate(c)
