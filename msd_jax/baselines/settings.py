"""Optional config keys of the baselines, read as `config.baselines.<key>` with these defaults.

The lead adds the section to `base_config()`; until then (or when a key is missing) the default
applies, so every config file keeps working.
"""
from __future__ import annotations

DEFAULTS = {
    # multi-crop (DINO): random resized crop scale ranges (share of the image area) and output sizes
    "global_scale": (0.4, 1.0),
    "local_scale": (0.05, 0.4),
    "local_size": 0,              # 0: image_size // 2 rounded to a multiple of patch_size (>= patch)
    "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),   # aspect-ratio range (log-uniform), as torchvision
    "flip_prob": 0.5,             # horizontal flip
    # intensity jitter suited to grayscale MRI (on [0, 1] images, before normalisation)
    "jitter_prob": 0.8,           # applied with this probability per view (DINO's colour-jitter p)
    "brightness": 0.4,            # multiplicative factor in [1 - b, 1 + b]
    "contrast": 0.4,              # around the view mean, factor in [1 - c, 1 + c]
    "gamma": 0.3,                 # x ** g, log g uniform in [-log(1 + g), log(1 + g)]
    "saturation": 0.2,            # RGB only: blend with the grey image, factor in [1 - s, 1 + s]
    "grayscale_prob": 0.2,        # RGB only: random grey conversion
    "global_blur_probs": (1.0, 0.1),  # DINO: first global view always blurred, second 10 %
    "local_blur_prob": 0.5,
    "blur_sigma": (0.1, 1.0),     # pixels (DINO's (0.1, 2.0) at 224 px, scaled down for 32-64 px)
    "noise_prob": 0.0,            # optional additive gaussian noise
    "noise_std": 0.03,
    # supervised baseline: light augmentation
    "supervised_scale": (0.6, 1.0),
    "supervised_weight_decay": 0.05,
}


def setting(config, key: str):
    """`config.baselines.<key>` if present, else DEFAULTS[key]."""
    if key not in DEFAULTS:
        raise KeyError(f"unknown baselines setting {key!r}; known: {sorted(DEFAULTS)}")
    section = config.get("baselines", None) if hasattr(config, "get") else None
    if section is None:
        return DEFAULTS[key]
    return section.get(key, DEFAULTS[key])
