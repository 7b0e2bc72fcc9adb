"""Every shipped config builds: valid keys, a valid model, shapes that trace."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

from msd_jax import config as config_lib
from msd_jax.data import pixel_views
from msd_jax.models import vit
from msd_jax.msd import step as step_lib
from msd_jax.training import classifier
from conftest import load_config

CONFIGS = sorted(pathlib.Path(__file__).resolve().parent.parent.glob("configs/*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    c = config_lib.validate(load_config(path.stem))
    cfg = vit.ViTConfig.from_config(c.model)
    shapes = jax.eval_shape(lambda k: vit.init_student(cfg, k), jax.random.key(0))
    assert shapes["body"]["cls_token"].shape == (1, 1, cfg.embed_dim)
    assert shapes["heads_0"]["last_layer"].shape == (cfg.head_bottleneck_dim, cfg.out_dim)
    tokens = jax.ShapeDtypeStruct((2, cfg.num_patches, cfg.embed_dim), jnp.float32)
    out = jax.eval_shape(lambda p, t: vit.Student(cfg).apply({"params": p}, t), shapes, tokens)
    assert out.shape == (1, 2, cfg.out_dim)


def test_vit_s16_is_paper_scale():
    c = load_config("vit_s16")
    cfg = vit.ViTConfig.from_config(c.model)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.image_size, cfg.patch_size) == (384, 12, 6, 224, 16)
    # the config itself says what runs (report.json copies it)
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads) == (384, 12, 6)


def test_a_variant_is_resolved_into_the_config_once_it_is_read():
    c = config_lib.base_config()
    c.model.variant = "B"
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads) == (192, 4, 3)
    with pytest.raises(ValueError, match=r"config\.model\.variant='B'.*\(768, 12, 12\).*\(192, 4, 3\)"):
        vit.ViTConfig.from_config(c.model)   # unresolved: would silently build another model
    config_lib.validate(c)
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads) == (768, 12, 12)
    assert vit.ViTConfig.from_config(c.model).embed_dim == 768
    c.model.variant = "L"
    with pytest.raises(ValueError, match=r"config\.model\.variant"):
        config_lib.validate(c)


@pytest.mark.parametrize("cls", [vit.HeadConfig, vit.ViTConfig, step_lib.StepConfig,
                                 pixel_views.PixelViewConfig, classifier.ClassifierSettings])
def test_dataclasses_hold_no_second_set_of_defaults(cls):
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_default, f"{cls.__name__}: defaults belong in msd_jax/config.py, found {with_default}"


def test_model_fields_come_from_the_config():
    c = config_lib.base_config()
    cfg = vit.ViTConfig.from_config(c.model)
    assert cfg.to_dict() == {f.name: c.model[f.name] for f in dataclasses.fields(vit.ViTConfig)}
    del c.model["head_layers"]
    with pytest.raises(ValueError, match=r"config\.model: missing \['head_layers'\]"):
        vit.ViTConfig.from_config(c.model)


def test_validate_names_the_field():
    c = config_lib.base_config()
    c.protocol = "fedsgd"
    with pytest.raises(ValueError, match="config.protocol"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.data.name = "folders"
    with pytest.raises(ValueError, match="config.data.site_dirs"):
        config_lib.validate(c)


@pytest.mark.parametrize("fields, mode, key", [
    (dict(coordinator="node0"), "server", "config.distributed.coordinator"),           # no port
    (dict(coordinator="node0:1234", num_processes=2, process_id=2), "server", "config.distributed.process_id"),
    (dict(coordinator="node0:1234", num_processes=2), "all", "config.distributed.coordinator"),
    (dict(heartbeat_timeout_s=0), "server", "config.distributed.heartbeat_timeout_s"),
    (dict(row_groups=-1), "server", "config.distributed.row_groups"),
    (dict(coordinator="node0:1234", num_processes=2, row_groups=3), "server", "config.distributed.row_groups"),
])
def test_validate_checks_the_distributed_keys(fields, mode, key):
    c = config_lib.base_config()
    c.distributed.update(fields)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(c, mode)
    c = config_lib.base_config()
    c.distributed.update(coordinator="[::1]:1234", num_processes=2, process_id=1)
    config_lib.validate(c, "server")
    c.multihost = True
    with pytest.raises(ValueError, match=r"not both"):
        config_lib.validate(c, "server")


@pytest.mark.parametrize("key_source,mode,shared", [("seed", "paper", "seed"),
                                                    ("urandom", "secret_head+pos_noise", "urandom")])
def test_auto_mode_follows_the_key_source(key_source, mode, shared):
    """'auto' (the default) is the paper's transform with reproducible keys and the audit's safe
    mode with real ones, its shared key then real too; the config says what runs."""
    c = config_lib.base_config()
    c.encrypt.key_source = key_source
    c = config_lib.validate(c)
    assert (c.encrypt.mode, c.encrypt.shared_key_source) == (mode, shared)


def test_a_named_mode_and_the_reproduction_configs_keep_their_mode():
    c = config_lib.base_config()
    c.encrypt.update(key_source="urandom", mode="secret_head+masked", shared_key_source="seed")
    c = config_lib.validate(c)
    assert (c.encrypt.mode, c.encrypt.shared_key_source) == ("secret_head+masked", "seed")
    for name in ("vit_b16", "vit_s16"):
        c = load_config(name)
        c.encrypt.key_source = "urandom"
        assert config_lib.validate(c).encrypt.mode == "paper"


@pytest.mark.parametrize("field,value", [("key_source", "random"), ("shared_key_source", "os")])
def test_key_sources_are_checked(field, value):
    c = config_lib.base_config()
    c.encrypt[field] = value
    with pytest.raises(ValueError, match=f"config.encrypt.{field}"):
        config_lib.validate(c)
