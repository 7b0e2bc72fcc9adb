"""DINO multi-crop pixel augmentations in JAX for (grayscale or RGB) medical images.

Everything is jittable with static shapes: a crop box is continuous (no integer rounding), so a
view is one bilinear `jax.image.scale_and_translate` of the image whatever the box. Each example's
views are keyed on `fold_in(key, example_id)`, never on its place in a device shard, so the views do
not depend on how the batch is split across devices (as msd/views.py does for token views).

Per view (DINO, Caron et al. 2021, main_dino.py DataAugmentationDINO, with the colour operations
replaced by intensity operations on one channel):
  random resized crop (area share in `scale`, log-uniform aspect ratio in `crop_ratio`, torchvision's
  10 tries then a central fallback) -> horizontal flip -> intensity jitter with `jitter_prob`
  (brightness factor, contrast around the view mean, gamma; RGB adds saturation, and random grey
  conversion) -> gaussian blur with a per-view probability (DINO: first global view 1.0, second 0.1,
  local views 0.5) -> optional additive gaussian noise. Values stay in [0, 1]; normalisation with
  config.data.mean/std happens afterwards, before the patch embedding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def default_local_size(image_size: int, patch_size: int) -> int:
    """image_size // 2 rounded to a multiple of patch_size, at least one patch."""
    return max(patch_size, int(round(image_size / 2 / patch_size)) * patch_size)


def _pair(value, field: str, lo: float = 0.0, hi: float = math.inf) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config.baselines.{field}: expected a pair (low, high), got {value!r}") from None
    if not lo <= a <= b <= hi:
        raise ValueError(f"config.baselines.{field}: expected {lo} <= low <= high <= {hi}, got {value!r}")
    return a, b


def _prob(value, field: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"config.baselines.{field}: expected a probability in [0, 1], got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class PixelViewConfig:
    """Static description of the multi-crop views (hashable: usable as a jit static argument)."""
    num_global: int
    global_size: int
    global_scale: Tuple[float, float]
    num_local: int
    local_size: int
    local_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float]
    flip_prob: float
    jitter_prob: float
    brightness: float
    contrast: float
    gamma: float
    saturation: float
    grayscale_prob: float
    global_blur_probs: Tuple[float, ...]
    local_blur_prob: float
    blur_sigma: Tuple[float, float]
    noise_prob: float
    noise_std: float

    @classmethod
    def from_config(cls, config) -> "PixelViewConfig":
        """Sizes from config.model, view counts from config.msd, the rest from config.baselines."""
        m, b = config.model, config.baselines
        local_size = int(b.local_size) or default_local_size(m.image_size, m.patch_size)
        if local_size % m.patch_size or local_size < m.patch_size:
            raise ValueError(f"config.baselines.local_size={local_size}: expected a positive multiple "
                             f"of config.model.patch_size={m.patch_size} (or 0 for image_size // 2)")
        probs = b.global_blur_probs
        probs = tuple(_prob(p, "global_blur_probs") for p in (probs if isinstance(probs, (tuple, list))
                                                               else (probs,)))
        if not probs:
            raise ValueError("config.baselines.global_blur_probs: expected at least one probability")
        pc = cls(
            num_global=int(config.msd.num_global), global_size=int(m.image_size),
            global_scale=_pair(b.global_scale, "global_scale", 0.0, 1.0),
            num_local=int(config.msd.num_local), local_size=local_size,
            local_scale=_pair(b.local_scale, "local_scale", 0.0, 1.0),
            crop_ratio=_pair(b.crop_ratio, "crop_ratio", 1e-6),
            flip_prob=_prob(b.flip_prob, "flip_prob"),
            jitter_prob=_prob(b.jitter_prob, "jitter_prob"),
            brightness=_prob(b.brightness, "brightness"),
            contrast=_prob(b.contrast, "contrast"),
            gamma=float(b.gamma),
            saturation=_prob(b.saturation, "saturation"),
            grayscale_prob=_prob(b.grayscale_prob, "grayscale_prob"),
            global_blur_probs=probs,
            local_blur_prob=_prob(b.local_blur_prob, "local_blur_prob"),
            blur_sigma=_pair(b.blur_sigma, "blur_sigma", 1e-3),
            noise_prob=_prob(b.noise_prob, "noise_prob"),
            noise_std=float(b.noise_std),
        )
        if pc.global_scale[0] <= 0 or pc.local_scale[0] <= 0:
            raise ValueError("config.baselines.global_scale/local_scale: the low end must be > 0")
        if pc.gamma < 0:
            raise ValueError(f"config.baselines.gamma: expected >= 0, got {pc.gamma}")
        if pc.noise_std < 0:
            raise ValueError(f"config.baselines.noise_std: expected >= 0, got {pc.noise_std}")
        return pc

    def light(self, scale: Tuple[float, float]) -> "PixelViewConfig":
        """Crop + flip only (the supervised and fine-tuning augmentation)."""
        return dataclasses.replace(self, global_scale=tuple(scale), jitter_prob=0.0, grayscale_prob=0.0,
                                   global_blur_probs=(0.0,), local_blur_prob=0.0, noise_prob=0.0)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

def crop_box(key: jax.Array, height: int, width: int, scale: Tuple[float, float],
             ratio: Tuple[float, float], tries: int = 10) -> jax.Array:
    """torchvision RandomResizedCrop.get_params, continuous: [y0, x0, h, w] in pixels (edges).

    `tries` candidates (area share uniform in `scale`, aspect w/h log-uniform in `ratio`); the first
    that fits is used, else the central crop with the aspect clamped to `ratio`.
    """
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = float(height * width)
    target = area * jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (tries,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    w = jnp.sqrt(target * aspect)
    h = jnp.sqrt(target / aspect)
    fits = (w <= width) & (h <= height)
    first = jnp.argmax(fits)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    ok = jnp.any(fits)
    h = jnp.where(ok, h[first], fh)
    w = jnp.where(ok, w[first], fw)
    y0 = jnp.where(ok, jax.random.uniform(k_y) * (height - h), (height - h) / 2)
    x0 = jnp.where(ok, jax.random.uniform(k_x) * (width - w), (width - w) / 2)
    return jnp.stack([y0, x0, h, w]).astype(jnp.float32)


def resample_box(image: jax.Array, box: jax.Array, out_size: int, antialias: bool = True) -> jax.Array:
    """Bilinear resize of the box [y0, x0, h, w] (pixel edges) of image [H, W, C] to
    [out_size, out_size, C]. Output pixel centre o samples the input at y0 + (o + 0.5) h / out_size
    (half-pixel centres, torchvision's align_corners=False); `antialias` widens the triangle kernel
    when shrinking, as PIL / torchvision antialias."""
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([out_size / h, out_size / w])
    translation = jnp.stack([-y0 * out_size / h, -x0 * out_size / w])
    out = jax.image.scale_and_translate(image.astype(jnp.float32), (out_size, out_size, image.shape[-1]),
                                        (0, 1), scale, translation, method="linear", antialias=antialias)
    return out


def random_resized_crop(key: jax.Array, image: jax.Array, out_size: int, scale: Tuple[float, float],
                        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> jax.Array:
    box = crop_box(key, image.shape[0], image.shape[1], scale, ratio)
    return resample_box(image, box, out_size)


# ------------------------------------------------------------------------------------------------
# Intensity
# ------------------------------------------------------------------------------------------------

def _grey(image: jax.Array) -> jax.Array:
    if image.shape[-1] == 1:
        return image
    return jnp.sum(image * jnp.asarray(_GREY, image.dtype), axis=-1, keepdims=True)


def intensity_jitter(key: jax.Array, image: jax.Array, pc: PixelViewConfig) -> jax.Array:
    """Brightness factor, contrast around the mean grey level, gamma (and RGB saturation), each
    clipped to [0, 1]. No colour operation touches a one-channel image."""
    kb, kc, kg, ks = jax.random.split(key, 4)
    x = jnp.clip(image * jax.random.uniform(kb, minval=1 - pc.brightness, maxval=1 + pc.brightness),
                 0.0, 1.0)
    mean = jnp.mean(_grey(x))
    c = jax.random.uniform(kc, minval=1 - pc.contrast, maxval=1 + pc.contrast)
    x = jnp.clip(mean + (x - mean) * c, 0.0, 1.0)
    lg = math.log1p(pc.gamma)
    x = jnp.clip(x, 0.0, 1.0) ** jnp.exp(jax.random.uniform(kg, minval=-lg, maxval=lg))
    if image.shape[-1] == 3:
        s = jax.random.uniform(ks, minval=1 - pc.saturation, maxval=1 + pc.saturation)
        g = _grey(x)
        x = jnp.clip(g + (x - g) * s, 0.0, 1.0)
    return x


def gaussian_blur(image: jax.Array, sigma, radius: int) -> jax.Array:
    """Separable gaussian blur of [H, W, C] with a static `radius` (2 radius + 1 taps), reflect
    padding (torchvision GaussianBlur); `sigma` may be traced."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    k = k / jnp.sum(k)
    h, w = image.shape[:2]
    x = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * x[i:i + h] for i in range(2 * radius + 1))
    x = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(k[i] * x[:, i:i + w] for i in range(2 * radius + 1))


def _blur_radius(pc: PixelViewConfig, size: int) -> int:
    return max(1, min(int(math.ceil(3.0 * pc.blur_sigma[1])), size - 1))


# ------------------------------------------------------------------------------------------------
# One view, all views
# ------------------------------------------------------------------------------------------------

def augment_view(key: jax.Array, image: jax.Array, out_size: int, scale: Tuple[float, float],
                 blur_prob: float, pc: PixelViewConfig) -> jax.Array:
    """One augmented view [out_size, out_size, C] of image [H, W, C] in [0, 1]."""
    k_crop, k_flip, k_jit, k_jit_on, k_grey, k_blur, k_blur_on, k_noise, k_noise_on = \
        jax.random.split(key, 9)
    x = random_resized_crop(k_crop, image, out_size, scale, pc.crop_ratio)
    x = jnp.clip(x, 0.0, 1.0)
    if pc.flip_prob > 0:
        x = jnp.where(jax.random.bernoulli(k_flip, pc.flip_prob), x[:, ::-1], x)
    if pc.jitter_prob > 0:
        x = jnp.where(jax.random.bernoulli(k_jit_on, pc.jitter_prob), intensity_jitter(k_jit, x, pc), x)
    if image.shape[-1] == 3 and pc.grayscale_prob > 0:
        x = jnp.where(jax.random.bernoulli(k_grey, pc.grayscale_prob),
                      jnp.broadcast_to(_grey(x), x.shape), x)
    if blur_prob > 0:
        sigma = jax.random.uniform(k_blur, minval=pc.blur_sigma[0], maxval=pc.blur_sigma[1])
        x = jnp.where(jax.random.bernoulli(k_blur_on, blur_prob),
                      gaussian_blur(x, sigma, _blur_radius(pc, out_size)), x)
    if pc.noise_prob > 0 and pc.noise_std > 0:
        noisy = jnp.clip(x + pc.noise_std * jax.random.normal(k_noise, x.shape), 0.0, 1.0)
        x = jnp.where(jax.random.bernoulli(k_noise_on, pc.noise_prob), noisy, x)
    return x


def make_pixel_views(key: jax.Array, images: jax.Array, example_ids: jax.Array,
                     pc: PixelViewConfig, view_major: bool = True) -> Tuple[jax.Array, Optional[jax.Array]]:
    """images [B, H, W, C] in [0, 1] -> view-major global views [G*B, Sg, Sg, C] and local views
    [L*B, Sl, Sl, C] (None when L == 0), the order of msd/views.py (view v of example b at v*B + b);
    with `view_major=False` [B, G, Sg, Sg, C] and [B, L, Sl, Sl, C], which keeps the batch axis
    first (sharded on a mesh). Example b's views depend only on (key, example_ids[b])."""
    def one(image, example_id):
        kg, kl = jax.random.split(jax.random.fold_in(key, example_id))
        gkeys = jax.random.split(kg, pc.num_global)
        g = jnp.stack([augment_view(gkeys[i], image, pc.global_size, pc.global_scale,
                                    pc.global_blur_probs[i % len(pc.global_blur_probs)], pc)
                       for i in range(pc.num_global)])
        if pc.num_local == 0:
            return g, None
        l = jax.vmap(lambda k: augment_view(k, image, pc.local_size, pc.local_scale,
                                            pc.local_blur_prob, pc))(jax.random.split(kl, pc.num_local))
        return g, l

    g, l = jax.vmap(one)(images, example_ids)   # [B, V, S, S, C]
    if not view_major:
        return g, l

    def to_view_major(v):
        return None if v is None else jnp.swapaxes(v, 0, 1).reshape((-1,) + v.shape[2:])
    return to_view_major(g), to_view_major(l)


def light_views(key: jax.Array, images: jax.Array, example_ids: jax.Array, out_size: int,
                scale: Tuple[float, float], pc: PixelViewConfig) -> jax.Array:
    """One crop + flip view per image ([B, out_size, out_size, C]), keyed by fold_in(key, id)."""
    light = pc.light(scale)
    return jax.vmap(lambda im, i: augment_view(jax.random.fold_in(key, i), im, out_size, light.global_scale,
                                               0.0, light))(images, example_ids)
