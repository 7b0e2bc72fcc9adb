"""The msd_jax MSD step that the benchmarks time or compile, built in one place: a config (by name
from configs/, optionally shrunk for smoke runs) -> model config, StepConfig, mesh, jitted step,
initial state (real, or shapes only for compile-only probes) and a synthetic batch.

Scripts run as `python benchmarks/X.py` import it as `stepbuild` (their folder is on sys.path);
msd_jax itself must be importable (`pip install -e .`). JAX and msd_jax are imported only when a
step is built: the PyTorch worker takes its tokens from here, and JAX in its process would count in
its peak RSS (and a JAX worker must set XLA_FLAGS and its cores before JAX is imported).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, Callable, Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The model of --smoke and dry runs: every part of the step, at sizes that compile in seconds.
SMOKE_MODEL = dict(variant="custom", embed_dim=32, depth=1, num_heads=2, out_dim=64,
                   head_hidden_dim=32, head_bottleneck_dim=16, image_size=32, patch_size=8)
# The run length the schedules are resolved over; the work of one step does not depend on it.
TOTAL_STEPS, STEPS_PER_EPOCH = 1000, 100


def load_config(name: str, arg: Optional[str] = None, smoke: bool = False):
    """configs/<name>.py's `get_config(arg)`, loaded from its file (configs/ is not an installed
    package); with `smoke`, the model shrunk to SMOKE_MODEL."""
    spec = importlib.util.spec_from_file_location(f"bench_cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    if smoke:
        config.model.update(SMOKE_MODEL)
    return config


def resolve(config, batch: int, dtype: Optional[str] = None, matmul_dtype: Optional[str] = None,
            steady: bool = True, total_steps: int = TOTAL_STEPS,
            steps_per_epoch: int = STEPS_PER_EPOCH):
    """(config, ViTConfig, StepConfig) of the step on `batch` images. The config is a copy with the
    batch size and the given dtypes set (None keeps the config's). `steady` drops the lr warm-up and
    the frozen last layer: the timed steps stand for a run's steps after its first epoch."""
    from msd_jax.models import vit  # noqa: PLC0415
    from msd_jax.msd import step as step_lib  # noqa: PLC0415
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch
    if dtype is not None:
        config.model.dtype = dtype
    if matmul_dtype is not None:
        config.model.matmul_dtype = matmul_dtype
    model_cfg = vit.ViTConfig.from_config(config.model)
    sc = step_lib.StepConfig.from_config(config, model_cfg.num_patches, total_steps, steps_per_epoch,
                                         batch)
    if steady:
        sc = dataclasses.replace(sc, freeze_last_layer_steps=0, warmup_steps=0)
    return config, model_cfg, sc


def synthetic_tokens(batch: int, num_tokens: int, embed_dim: int, seed: int = 0) -> np.ndarray:
    """Standard-normal float32 tokens [batch, num_tokens, embed_dim], the same for every framework."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, num_tokens, embed_dim)).astype(np.float32)


@dataclasses.dataclass
class BenchStep:
    """A jitted MSD step with everything it is called on. With `abstract`, state, tokens and ids are
    shapes (jax.ShapeDtypeStruct), enough to lower and compile but not to run."""
    config: Any           # ml_collections.ConfigDict, batch and dtypes set
    model: Any            # msd_jax.models.vit.ViTConfig
    step_config: Any      # msd_jax.msd.step.StepConfig
    mesh: Any             # jax.sharding.Mesh over all devices
    step: Callable        # jitted step(state, tokens, ids, key) -> (state, metrics)
    state: Any            # TrainState, replicated on the mesh
    tokens: Any           # [batch, num_tokens, embed_dim] float32, sharded on the batch axis
    ids: Any              # [batch] int32
    key: Any

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def compile(self):
        return self.step.lower(self.state, self.tokens, self.ids, self.key).compile()

    def run(self, step: Optional[Callable] = None):
        """One step (of `step`, e.g. the compiled one, else of the jitted one) from the held state,
        which it replaces (the old one is donated). Returns the metrics, not waited for."""
        self.state, metrics = (step or self.step)(self.state, self.tokens, self.ids, self.key)
        return metrics


def _abstract_inputs(model_cfg, sc, batch):
    import jax  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    from msd_jax.msd import step as step_lib  # noqa: PLC0415
    params = jax.eval_shape(lambda k: vit.init_student(model_cfg, k), jax.random.key(0))
    state = jax.eval_shape(lambda p: step_lib.init_state(p, 1, model_cfg.out_dim, sc), params)
    tokens = jax.ShapeDtypeStruct((batch, model_cfg.num_patches, model_cfg.embed_dim), np.float32)
    return state, tokens, jax.ShapeDtypeStruct((batch,), np.int32)


def _concrete_inputs(model_cfg, sc, mesh, batch, params):
    import jax  # noqa: PLC0415
    from msd_jax.models import vit  # noqa: PLC0415
    from msd_jax.msd import step as step_lib  # noqa: PLC0415
    if params is None:
        params = jax.jit(lambda k: vit.init_student(model_cfg, k))(jax.random.key(0))
    state = step_lib.replicate(mesh, step_lib.init_state(params, 1, model_cfg.out_dim, sc))
    tokens = synthetic_tokens(batch, model_cfg.num_patches, model_cfg.embed_dim)
    tokens, ids = step_lib.shard_batch(mesh, tokens, np.arange(batch, dtype=np.int32))
    return state, tokens, ids


def build_step(config, batch: int, *, dtype: Optional[str] = None,
               matmul_dtype: Optional[str] = None, steady: bool = True,
               total_steps: int = TOTAL_STEPS, steps_per_epoch: int = STEPS_PER_EPOCH,
               params=None, abstract: bool = False) -> BenchStep:
    """The step of `config` on `batch` images over all devices (see `resolve` for the dtypes and
    `steady`). The state starts from `params` (default: the student initialised from key 0), the
    batch is `synthetic_tokens` with ids 0..batch-1, the step's key is key 1."""
    import jax  # noqa: PLC0415
    from msd_jax.msd import step as step_lib  # noqa: PLC0415
    config, model_cfg, sc = resolve(config, batch, dtype, matmul_dtype, steady, total_steps,
                                    steps_per_epoch)
    mesh = step_lib.make_mesh()
    step = step_lib.jit_train_step(
        step_lib.make_train_step(model_cfg, sc, num_devices=mesh.devices.size), mesh)
    if abstract:
        state, tokens, ids = _abstract_inputs(model_cfg, sc, batch)
    else:
        state, tokens, ids = _concrete_inputs(model_cfg, sc, mesh, batch, params)
    return BenchStep(config=config, model=model_cfg, step_config=sc, mesh=mesh, step=step,
                     state=state, tokens=tokens, ids=ids, key=jax.random.key(1))
