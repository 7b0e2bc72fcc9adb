"""The one mapping between our ViT parameters and timm's `VisionTransformer` state-dict names.

`to_timm` writes {head, body} under timm's names in torch layout (what msd_jax.export saves);
`from_timm` is its exact inverse (bit for bit where the shapes agree) and also takes DINO's and
timm's own checkpoints: wrapper prefixes ('module.', 'backbone.') and wrapper dicts ('teacher',
'student', 'model', 'state_dict') are unwrapped, the projection or classifier head ('head.*') is
ignored, a position table of another grid is resized (bicubic, as torch's F.interpolate), and an
RGB patch embedding is folded into one channel (timm's adapt_input_conv).

Our body feeds cls_token + cls_pos_embed, then patch tokens that already carry pos_embed; timm adds
pos_embed [1, 1 + N, D] after prepending cls_token. So cls_token -> cls_token and pos_embed =
[cls_pos_embed; head pos_embed]: the sums, hence the features, are identical.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from msd_jax import trust
from msd_jax.models import vit

WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")  # DINO checkpoints: the teacher first
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")
IGNORED_PREFIXES = ("head.",)  # DINO's projection head, timm's classifier: not part of the backbone
BICUBIC_A = -0.75  # torch's cubic convolution coefficient (F.interpolate mode='bicubic')

# (timm name inside a block, our path inside the block, kind)
BLOCK_TENSORS = (
    ("norm1", ("norm1",), "norm"),
    ("attn.qkv", ("attn", "qkv"), "linear"),  # both split 3D as (q|k|v, head, head_dim)
    ("attn.proj", ("attn", "proj"), "linear"),
    ("norm2", ("norm2",), "norm"),
    ("mlp.fc1", ("mlp", "fc1"), "linear"),
    ("mlp.fc2", ("mlp", "fc2"), "linear"),
)
LEAVES = {"linear": (("weight", "kernel"), ("bias", "bias")),
          "norm": (("weight", "scale"), ("bias", "bias"))}


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _torch_leaf(kind: str, ours: str, x: np.ndarray) -> np.ndarray:
    return x.T if kind == "linear" and ours == "kernel" else x  # flax [in, out] <-> torch [out, in]


def body_tensors(cfg: vit.ViTConfig):
    """(timm name, path in the body params, kind, our leaf) of every body tensor but the CLS ones."""
    for i in range(cfg.depth):
        for timm_name, path, kind in BLOCK_TENSORS:
            for timm_leaf, ours in LEAVES[kind]:
                yield f"blocks.{i}.{timm_name}.{timm_leaf}", (f"block{i}",) + path, kind, ours
    for timm_leaf, ours in LEAVES["norm"]:
        yield f"norm.{timm_leaf}", ("norm",), "norm", ours


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def to_timm(cfg: vit.ViTConfig, head_params, body_params) -> dict[str, np.ndarray]:
    """float32 arrays under timm VisionTransformer names, torch layout ([out, in] weights)."""
    p, c, d = cfg.patch_size, cfg.channels, cfg.embed_dim
    kernel = _f32(head_params["patch_embed"]["kernel"])  # [p*p*C, D], rows in (py, px, c) order
    out = {
        "cls_token": _f32(body_params["cls_token"]).reshape(1, 1, d),
        "pos_embed": np.concatenate([_f32(body_params["cls_pos_embed"]).reshape(1, 1, d),
                                     _f32(head_params["pos_embed"]).reshape(1, cfg.num_patches, d)], 1),
        "patch_embed.proj.weight": kernel.reshape(p, p, c, d).transpose(3, 2, 0, 1),  # [D, C, p, p]
        "patch_embed.proj.bias": _f32(head_params["patch_embed"]["bias"]),
    }
    for name, path, kind, ours in body_tensors(cfg):
        out[name] = _torch_leaf(kind, ours, _f32(_get(body_params, path)[ours]))
    return out


def expected_shapes(cfg: vit.ViTConfig) -> dict[str, tuple]:
    """timm name -> shape of every tensor `to_timm` writes for `cfg`."""
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + cfg.num_patches, d),
           "patch_embed.proj.weight": (d, cfg.channels, cfg.patch_size, cfg.patch_size),
           "patch_embed.proj.bias": (d,)}
    dense = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
    for name, _, kind, ours in body_tensors(cfg):
        layer = name.split(".", 2)[2].rsplit(".", 1)[0] if name.startswith("blocks.") else "norm"
        if kind == "linear":
            out[name] = dense[layer] if ours == "kernel" else (dense[layer][0],)
        else:
            out[name] = (d,)
    return out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def unwrap(state: Mapping, source: str) -> dict:
    """The backbone's flat {name: array} inside a checkpoint: wrapper dicts opened (DINO's full
    checkpoints hold 'teacher' and 'student'; the teacher is the model DINO evaluates), wrapper
    prefixes stripped, head.* dropped."""
    while isinstance(state, Mapping) and not any(k in state for k in ("cls_token", "pos_embed")):
        inner = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = state[inner]
    if not isinstance(state, Mapping):
        raise trust.InputError(f"{source}: holds {type(state).__name__}, expected a state dict "
                               "{tensor name: tensor}")
    out = {}
    for name, value in state.items():
        name = str(name)
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name.startswith(IGNORED_PREFIXES):
            continue
        out[name] = value
    return out


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of torch's 1-D bicubic resize (align_corners=False,
    cubic convolution a=-0.75, borders clamped), so resize(x) = M @ x."""
    a = BICUBIC_A

    def cubic(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), in_size - 1)] += cubic(k - t)
    return m


def resize_pos_table(table: np.ndarray, new_grid: int) -> np.ndarray:
    """[g*g, D] position table on a g x g grid -> [new_grid^2, D], bicubic in float64 (as DINO's
    and timm's interpolate_pos_embed with torch's F.interpolate, mode='bicubic', no antialias)."""
    n, d = table.shape
    g = math.isqrt(n)
    if g == new_grid:
        return table
    m = torch_bicubic_matrix(g, new_grid)
    grid = table.astype(np.float64).reshape(g, g, d)
    out = np.einsum("yi,ijd,xj->yxd", m, grid, m)
    return out.reshape(new_grid * new_grid, d).astype(np.float32)


def adapt_channels(weight: np.ndarray, channels: int) -> np.ndarray:
    """Patch embedding [D, C_file, p, p] -> [D, channels, p, p]: RGB into grayscale sums the colour
    filters (timm's adapt_input_conv: a gray image fed as R = G = B gives the same tokens);
    grayscale into RGB spreads the filter as a third per channel (the same equivalence)."""
    have = weight.shape[1]
    if have == channels:
        return weight
    if channels == 1:
        return weight.astype(np.float64).sum(axis=1, keepdims=True).astype(np.float32)
    if have == 1:
        return np.repeat(weight.astype(np.float64) / channels, channels, axis=1).astype(np.float32)
    raise ValueError(f"no rule to map a {have}-channel patch embedding into {channels} channels")


@dataclasses.dataclass
class Imported:
    """What a pretrained file gives: the full body, the head parts whose shapes fit (patch_embed
    and/or pos_embed; empty when none fit), and a note per adaptation made."""
    body: dict
    head: dict
    notes: list


def _array(state: dict, name: str, source: str) -> np.ndarray:
    if name not in state:
        raise trust.InputError(f"{source}: tensor {name!r} missing (expected a timm/DINO ViT state "
                               "dict; see docs/pretrained.md for the names)")
    x = np.asarray(state[name])
    if not np.issubdtype(x.dtype, np.floating):
        raise trust.InputError(f"{source}: tensor {name!r} is {x.dtype}, expected floating point")
    x = x.astype(np.float32, copy=False)
    trust.check_values(x, f"{source}: tensor {name!r}")
    return x


def _shape_error(source: str, name: str, got, want, why: str) -> trust.InputError:
    return trust.InputError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(want)} "
                            f"({why})")


def _pos_table(state: dict, cfg: vit.ViTConfig, source: str, notes: list):
    """(cls position [1, 1, D], patch table [1, N, D] on the model's grid)."""
    pos = _array(state, "pos_embed", source)
    d = cfg.embed_dim
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
        raise _shape_error(source, "pos_embed", pos.shape, (1, 1 + cfg.num_patches, d),
                           f"config.model.embed_dim={d}")
    n = pos.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1 and n > 1:
        cls_pos, table = pos[:, :1], pos[0, 1:]
    elif math.isqrt(n) ** 2 == n:  # timm's no_embed_class: the class token carries no position
        cls_pos, table = np.zeros((1, 1, d), np.float32), pos[0]
        notes.append("pos_embed has no class-token row: the CLS position starts at zero")
    else:
        raise _shape_error(source, "pos_embed", pos.shape, (1, 1 + cfg.num_patches, d),
                           "1 + a square grid of positions")
    g = math.isqrt(len(table))
    if g != cfg.grid:
        notes.append(f"pos_embed resized from a {g}x{g} to a {cfg.grid}x{cfg.grid} grid (bicubic)")
        table = resize_pos_table(table, cfg.grid)
    return cls_pos, table[None]


def _patch_embed(state: dict, cfg: vit.ViTConfig, source: str, notes: list):
    """The head's patch embedding {kernel, bias}, or None when the file's patch size differs."""
    w = _array(state, "patch_embed.proj.weight", source)
    b = _array(state, "patch_embed.proj.bias", source)
    p, d = cfg.patch_size, cfg.embed_dim
    want = (d, cfg.channels, p, p)
    if w.ndim != 4 or w.shape[0] != d:
        raise _shape_error(source, "patch_embed.proj.weight", w.shape, want,
                           f"config.model.embed_dim={d}")
    if b.shape != (d,):
        raise _shape_error(source, "patch_embed.proj.bias", b.shape, (d,), f"config.model.embed_dim={d}")
    if w.shape[2:] != (p, p):
        notes.append(f"patch_embed not loaded: the file's patches are {w.shape[2]}x{w.shape[3]}, "
                     f"config.model.patch_size is {p} (the head's patch embedding stays random)")
        return None
    have = w.shape[1]
    try:
        w = adapt_channels(w, cfg.channels)
    except ValueError as e:
        raise _shape_error(source, "patch_embed.proj.weight", w.shape, want,
                           f"config.model.channels={cfg.channels}: {e}") from None
    if have != cfg.channels:
        notes.append(f"patch_embed mapped from {have} to {cfg.channels} input channel(s)")
    kernel = w.transpose(2, 3, 1, 0).reshape(p * p * cfg.channels, d)  # rows in (py, px, c) order
    return {"kernel": np.ascontiguousarray(kernel), "bias": b}


def from_timm(cfg: vit.ViTConfig, state: Mapping, source: str) -> Imported:
    """{body, head parts, notes} of a timm-layout state dict for the model `cfg`; trust.InputError
    naming `source` and the first tensor whose name or shape does not fit."""
    state = unwrap(state, source)
    shapes = expected_shapes(cfg)
    extra = [k for k in state if k not in shapes]
    notes: list = []
    cls_token = _array(state, "cls_token", source)
    if cls_token.shape != shapes["cls_token"]:
        raise _shape_error(source, "cls_token", cls_token.shape, shapes["cls_token"],
                           f"config.model.embed_dim={cfg.embed_dim}")
    cls_pos, table = _pos_table(state, cfg, source, notes)
    patch_embed = _patch_embed(state, cfg, source, notes)
    body: dict = {"cls_token": cls_token, "cls_pos_embed": cls_pos}
    for name, path, kind, ours in body_tensors(cfg):
        x = _array(state, name, source)
        if x.shape != shapes[name]:
            raise _shape_error(source, name, x.shape, shapes[name],
                               f"config.model embed_dim={cfg.embed_dim}, mlp_ratio={cfg.mlp_ratio}")
        _set(body, path + (ours,), np.ascontiguousarray(_torch_leaf(kind, ours, x)))
    if extra:
        raise trust.InputError(f"{source}: tensor {extra[0]!r} is not part of a timm ViT of "
                               f"config.model (depth={cfg.depth}, class token, qkv bias, final "
                               f"norm; no register tokens or layer scale); {len(extra)} such "
                               "tensor(s)")
    head = {"pos_embed": table}
    if patch_embed is not None:
        head["patch_embed"] = patch_embed
    return Imported(body=body, head=head, notes=notes)
