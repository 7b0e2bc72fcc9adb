"""Vision Transformer split at the privacy boundary.

`PatchHead` runs at the sites: a linear patch embedding plus the patch position embedding. Its output
tokens carry their position inside the vector, so the server never needs to know where a token came
from. `Body` runs at the server: CLS token, pre-norm transformer blocks, final norm. Without position
information self-attention is permutation-equivariant, so the CLS output is invariant to the order of
the tokens. `DINOHead` is DINO's projection head.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.models import matmul

VARIANTS = {
    # name: (embed_dim, depth, num_heads)
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What the sites' head is (the fields head.json records): patch embedding of p x p patches of
    an image_size x image_size x channels image into embed_dim, plus the position embedding."""
    image_size: int
    patch_size: int
    channels: int
    embed_dim: int
    pos_embed: str  # 'sincos' (fixed 2-D sin-cos) or 'random' (trunc-normal 0.02)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    def validate(self):
        if self.channels not in (1, 3):
            raise ValueError(f"config.model.channels: expected 1 or 3, got {self.channels}")
        if self.patch_size < 1 or self.image_size < self.patch_size:
            raise ValueError(f"config.model.image_size={self.image_size} must be >= "
                             f"config.model.patch_size={self.patch_size} >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(f"config.model.image_size={self.image_size} is not divisible by "
                             f"config.model.patch_size={self.patch_size}")
        if self.pos_embed not in ("sincos", "random"):
            raise ValueError(f"config.model.pos_embed: expected 'sincos' or 'random', got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"config.model.embed_dim={self.embed_dim} must be divisible by 4 for sincos")
        return self


@dataclasses.dataclass(frozen=True)
class ViTConfig(HeadConfig):
    """Static shape of the whole ViT: the head, the body and the DINO projection head; built from
    `config.model` by `from_config` (msd_jax/config.py holds every default)."""
    depth: int
    num_heads: int
    mlp_ratio: float
    out_dim: int
    head_hidden_dim: int
    head_bottleneck_dim: int
    head_layers: int
    dtype: str  # compute dtype of the body; parameters stay float32
    # operands of the body's dense layers when dtype is float32: 'bfloat16' rounds them to bfloat16
    # and accumulates in float32 (a TPU's default matmul precision; ~1.5x faster steps on CPUs with
    # AVX512-BF16, see models/matmul.py). The DINO head stays float32: its output is sharpened by
    # the teacher temperature (/0.04), which would magnify the rounding, and it is ~2 % of the
    # demo's FLOPs (counted by hand)
    matmul_dtype: str

    def validate(self) -> "ViTConfig":
        super().validate()
        if self.embed_dim % self.num_heads:
            raise ValueError(f"config.model.embed_dim={self.embed_dim} is not divisible by "
                             f"config.model.num_heads={self.num_heads}")
        for field in ("dtype", "matmul_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16"):
                raise ValueError(f"config.model.{field}: expected 'float32' or 'bfloat16', got "
                                 f"{getattr(self, field)!r}")
        return self

    @classmethod
    def from_config(cls, model_cfg) -> "ViTConfig":
        """Every field from `config.model`. A named `variant` must already be resolved into
        embed_dim/depth/num_heads (msd_jax.config.validate does it when the config is read), so
        that the config records what runs."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in model_cfg]
        if missing:
            raise ValueError(f"config.model: missing {missing} (start the config from "
                             "msd_jax.config.base_config())")
        variant = model_cfg["variant"]
        if variant != "custom":
            if variant not in VARIANTS:
                raise ValueError(f"config.model.variant: expected one of {sorted(VARIANTS)} or "
                                 f"'custom', got {variant!r}")
            shape = (model_cfg["embed_dim"], model_cfg["depth"], model_cfg["num_heads"])
            if shape != VARIANTS[variant]:
                raise ValueError(f"config.model.variant={variant!r} means embed_dim/depth/num_heads "
                                 f"{VARIANTS[variant]}, but the config holds {shape}: read the config "
                                 "through msd_jax.config.validate, which resolves the variant")
        return cls(**{f.name: model_cfg[f.name] for f in dataclasses.fields(cls)}).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def dot_general(self):
        """What the dense layers multiply with: None (XLA's own) or `matmul.bf16_dot_general`."""
        if self.matmul_dtype == "bfloat16" and self.dtype == "float32" and matmul.bf16_matmul_works():
            return matmul.bf16_dot_general
        return None


# how a model computes, not what it is: a checkpoint loads under either setting
COMPUTE_FIELDS = ("dtype", "matmul_dtype")


def sincos_pos_embed(embed_dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding [grid*grid, embed_dim] (MAE / MoCo v3 layout)."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                         indexing="ij")
    out_y = ys.reshape(-1, 1) * omega[None]
    out_x = xs.reshape(-1, 1) * omega[None]
    emb = np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], axis=1)
    return emb.astype(np.float32)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written with erf as PyTorch does. Flax's `nn.gelu(approximate=False)`
    goes through erfc, which XLA expands into two exp-based branches; on CPU that made GELU 12 % of
    the demo step (benchmarks/NOTES.md). Same function to float32 rounding."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / np.sqrt(2.0))).astype(x.dtype))


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], rows of patches in raster order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchHead(nn.Module):
    """Client-side head: linear patch embedding + position embedding. Fixed during training."""
    cfg: HeadConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(f"PatchHead expects images [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.channels}], got {tuple(images.shape)}")
        patches = patchify(images.astype(jnp.float32), cfg.patch_size)
        tokens = nn.Dense(cfg.embed_dim, name="patch_embed",
                          kernel_init=nn.initializers.lecun_normal())(patches)
        if cfg.pos_embed == "sincos":
            init = lambda *_: jnp.asarray(sincos_pos_embed(cfg.embed_dim, cfg.grid))[None]
        else:
            init = trunc_normal
        pos = self.param("pos_embed", init, (1, cfg.num_patches, cfg.embed_dim))
        return tokens + pos


class MlpBlock(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32
    dot_general: Any = None

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal,
                                  dot_general=self.dot_general)
        x = gelu(dense(self.hidden_dim, name="fc1")(x))
        return dense(d, name="fc2")(x)


class Attention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32
    dot_general: Any = None

    @nn.compact
    def __call__(self, x, return_weights: bool = False):
        b, n, d = x.shape
        hd = d // self.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal,
                                  dot_general=self.dot_general)
        qkv = dense(3 * d, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))  # [b, n, h, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).reshape(b, n, d)
        out = dense(d, name="proj")(out)
        return (out, weights) if return_weights else out


DROP_PATH_RNG = "drop_path"  # the rng stream stochastic depth draws from (apply(..., rngs=...))


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch [B, ...]: each sample's branch is zeroed with
    probability `rate`, else scaled by 1 / (1 - rate) so its expectation is unchanged."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def drop_path_rates(rate: float, depth: int) -> list:
    """Per-block rates rising linearly from 0 to `rate` (DINO's and timm's schedule)."""
    return [float(r) for r in np.linspace(0.0, rate, depth)] if depth > 1 else [0.0] * depth


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32
    dot_general: Any = None
    drop_path: float = 0.0

    def _branch(self, y, deterministic: bool):
        if deterministic or self.drop_path == 0.0:
            return y
        return drop_path(y, self.drop_path, self.make_rng(DROP_PATH_RNG))

    @nn.compact
    def __call__(self, x, return_weights: bool = False, deterministic: bool = True):
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.dtype, self.dot_general, name="attn")(y, return_weights)
        if return_weights:
            y, weights = y
        x = x + self._branch(y, deterministic)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.dot_general, name="mlp")(y)
        x = x + self._branch(y, deterministic)
        return (x, weights) if return_weights else x


class Body(nn.Module):
    """Server-side body. Input: tokens [B, n, D] in any order (any n); output: normed tokens
    [B, 1 + n, D], CLS first. With `return_attention`, also the last block's attention weights.
    `drop_path_rate`: stochastic depth, only when called with deterministic=False (training), which
    needs an rng for the DROP_PATH_RNG stream."""
    cfg: ViTConfig
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, return_attention: bool = False, deterministic: bool = True):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b = tokens.shape[0]
        cls = self.param("cls_token", trunc_normal, (1, 1, cfg.embed_dim))
        cls_pos = self.param("cls_pos_embed", trunc_normal, (1, 1, cfg.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls + cls_pos, (b, 1, cfg.embed_dim)),
                             tokens.astype(jnp.float32)], axis=1).astype(dtype)
        weights = None
        rates = drop_path_rates(self.drop_path_rate, cfg.depth)
        for i in range(cfg.depth):
            last = return_attention and i == cfg.depth - 1
            x = Block(cfg.num_heads, cfg.mlp_ratio, dtype, cfg.dot_general, rates[i],
                      name=f"block{i}")(x, last, deterministic)
            if last:
                x, weights = x
        x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="norm")(x.astype(jnp.float32))
        return (x, weights) if return_attention else x


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalise -> weight-normalised last layer (norm fixed to 1)."""
    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.num_layers == 1:
            x = nn.Dense(self.bottleneck_dim, kernel_init=trunc_normal, name="mlp0")(x)
        else:
            for i in range(self.num_layers - 1):
                x = gelu(nn.Dense(self.hidden_dim, kernel_init=trunc_normal, name=f"mlp{i}")(x))
            x = nn.Dense(self.bottleneck_dim, kernel_init=trunc_normal,
                         name=f"mlp{self.num_layers - 1}")(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        v = self.param("last_layer", trunc_normal, (self.bottleneck_dim, self.out_dim))
        # x @ (v / |v|_col) computed as (x @ v) / |v|_col: equal, but XLA CPU fused the normalised
        # [bottleneck, out_dim] matrix into the dot and ran it ~20x slower (benchmarks/NOTES.md).
        inv_norm = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v), axis=0)), 1e-12)
        return (x @ v) * inv_norm


class Student(nn.Module):
    """Body + `num_heads_out` DINO heads sharing it. One head for self-distillation; one head per
    site teacher for one-shot merging. Returns logits [num_heads_out, B, out_dim]."""
    cfg: ViTConfig
    num_heads_out: int = 1
    drop_path_rate: float = 0.0

    def setup(self):
        self.body = Body(self.cfg, self.drop_path_rate)
        self.heads = [DINOHead(self.cfg.out_dim, self.cfg.head_hidden_dim, self.cfg.head_bottleneck_dim,
                               self.cfg.head_layers)
                      for _ in range(self.num_heads_out)]

    def __call__(self, tokens, deterministic: bool = True):
        cls = self.body(tokens, deterministic=deterministic)[:, 0]
        return jnp.stack([h(cls) for h in self.heads])

    def features(self, tokens):
        return self.body(tokens)[:, 0]


# jitted: flax's eager init dispatches op by op, ~4 s for the demo's student on a CPU (1.7 s with
# the compile under jit, then cached; the same numbers bit for bit)
# Features of the body output [B, 1 + n, D]: the final-norm CLS token, the mean of the final-norm
# patch tokens, and their concatenation (DINO's linear-evaluation features for ViT-B). Both are
# invariant to the token order, so the same for encrypted and plain tokens.
FEATURE_KINDS = ("cls", "avgpool", "cls_avgpool")


def pool_features(out: jax.Array, kind: str) -> jax.Array:
    """Body output [B, 1 + n, D] -> the feature of `kind` ."""
    cls, avg = out[:, 0], out[:, 1:].mean(axis=1)
    if kind == "cls":
        return cls
    if kind == "avgpool":
        return avg
    if kind == "cls_avgpool":
        return jnp.concatenate([cls, avg], axis=-1)
    raise ValueError(f"feature kind: expected one of {list(FEATURE_KINDS)}, got {kind!r}")


def feature_dim(model_cfg: ViTConfig, kind: str) -> int:
    return 2 * model_cfg.embed_dim if kind == "cls_avgpool" else model_cfg.embed_dim


def resized_pos_embed(pos: jax.Array, grid: int, new_grid: int) -> jax.Array:
    """[1, grid*grid, D] -> [1, new_grid*new_grid, D], bicubic (no antialias, as torch's
    F.interpolate in DINO); the identity when new_grid == grid."""
    if new_grid == grid:
        return pos
    d = pos.shape[-1]
    x = jax.image.resize(pos.reshape(grid, grid, d).astype(jnp.float32), (new_grid, new_grid, d),
                         method="bicubic", antialias=False)
    return x.reshape(1, new_grid * new_grid, d)


def embed_images(model_cfg: ViTConfig, patch_embed, pos_embed, images, mean: float, std: float):
    """Raw images [B, S, S, C] in [0, 1] (S any multiple of the patch) -> tokens [B, (S/p)^2, D]
    through PatchHead with the fixed position embedding resized to the grid of S."""
    size = images.shape[1]
    cfg = dataclasses.replace(model_cfg, image_size=size)
    pos = resized_pos_embed(jax.lax.stop_gradient(pos_embed), model_cfg.grid, cfg.grid)
    x = (images - mean) / std  # the sites' pixel normalisation before the head
    return PatchHead(cfg).apply({"params": {"patch_embed": patch_embed, "pos_embed": pos}}, x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_head(cfg: HeadConfig, key: jax.Array) -> dict:
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return PatchHead(cfg).init(key, dummy)["params"]


@functools.partial(jax.jit, static_argnames=("cfg", "num_heads_out"))
def init_student(cfg: ViTConfig, key: jax.Array, num_heads_out: int = 1) -> dict:
    dummy = jnp.zeros((1, 2, cfg.embed_dim), jnp.float32)
    return Student(cfg, num_heads_out).init(key, dummy)["params"]


def encode_cls(cfg: ViTConfig, body_params: dict, tokens: jax.Array) -> jax.Array:
    """CLS feature of a batch of (encrypted or plain) tokens, from the body parameters alone."""
    return Body(cfg).apply({"params": body_params}, tokens)[:, 0]


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def is_decay_param(path: Sequence[Any], _leaf=None) -> bool:
    """Whether weight decay applies: not to biases, norm scales, the CLS token and the position
    embeddings. (DINO's get_params_groups exempts only biases and 1-D tensors, i.e. biases and norm
    scales; the CLS token and position embeddings are exempt here too, as in MAE/BEiT fine-tuning.)"""
    last = getattr(path[-1], "key", str(path[-1]))
    return last not in ("bias", "scale", "cls_token", "cls_pos_embed", "pos_embed")
