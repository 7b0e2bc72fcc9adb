"""The comparison's settings: the rows, the checks of config.compare, and every config the comparison
derives from the user's one (quick sizes, one per seed, one per sweep value, one per row protocol).

No jax here: configs/compare.py imports ROWS while the command line's flags are parsed.
"""
from __future__ import annotations

import copy

ROWS = ("msd_token_upload", "msd_model_upload", "fedavg_msd", "local_only", "centralized_dino",
        "centralized_msd", "no_pretraining", "finetune_only", "supervised_scratch")


def parse_rows(value: str) -> list[str]:
    rows = [r.strip() for r in str(value).split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if not rows or bad:
        raise ValueError(f"config.compare.rows: expected a comma-separated list of {list(ROWS)}, "
                         f"got {value!r} (unknown: {bad})")
    return rows


def check_config(config) -> None:
    c = config.compare
    parse_rows(c.rows)
    for key in ("seeds", "budget_steps", "fedavg_rounds", "finetune_steps"):
        if int(c[key]) < 1:
            raise ValueError(f"config.compare.{key}: expected >= 1, got {c[key]}")
    if not 0.0 <= float(c.merge_frac) < 1.0:
        raise ValueError(f"config.compare.merge_frac: expected in [0, 1), got {c.merge_frac}")
    if c.site_split not in ("size", "equal"):
        raise ValueError(f"config.compare.site_split: expected 'size' or 'equal', got {c.site_split!r}")


def parse_sweep(value: str, config) -> tuple[str, list]:
    """'section.key=v1,v2' -> ('section.key', [typed values])."""
    if "=" not in value:
        raise ValueError(f"config.compare.sweep: expected 'section.key=v1,v2,...', got {value!r}")
    key, vals = value.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in config or parts[1] not in config[parts[0]]:
        raise ValueError(f"config.compare.sweep: {key!r} is not a config key (section.key)")
    typ = type(config[parts[0]][parts[1]])
    out = []
    for v in vals.split(","):
        v = v.strip()
        if typ is bool:
            out.append(v.lower() in ("1", "true", "yes"))
        else:
            out.append(typ(v))
    return key, out


# --------------------------------------------------------------------------------------------------
# the derived configs: each a copy, so the user's config is never changed
# --------------------------------------------------------------------------------------------------

def apply_quick(config):
    """A copy of `config` with config.quick_settings.<section>.<key> applied when config.quick."""
    config = copy.deepcopy(config)
    if config.get("quick", False):
        for section, values in config.quick_settings.items():
            for k, v in values.items():
                if k not in config[section]:
                    raise ValueError(f"config.quick_settings.{section}.{k}: config.{section} has no "
                                     f"key {k!r}")
                config[section][k] = v
    return config


def seed_config(config, k: int):
    """The config of the k-th seed: config.seed + k changes the partition, the head and every key."""
    config = copy.deepcopy(config)
    config.seed = int(config.seed) + k
    return config


def sweep_config(config, key: str, value):
    """The config of one sweep value: config[section][field] = value, the sweep itself off."""
    section, field = key.split(".")
    config = copy.deepcopy(config)
    config[section][field] = value
    config.compare.sweep = ""
    config.quick = False  # quick settings are already applied
    return config


def protocol_config(config, protocol: str, merge_data: str | None = None):
    """The config a row's parties run under: its protocol and, where given, config.merge.data."""
    config = copy.deepcopy(config)
    config.protocol = protocol
    if merge_data is not None:
        config.merge.data = merge_data
    return config


def changed_config(config, settings: dict):
    """The config of a row that runs with changed settings ({'section.key': value}, from
    needs.check_rows); `config` itself when there are none."""
    if not settings:
        return config
    config = copy.deepcopy(config)
    for key, value in settings.items():
        section, field = key.split(".")
        config[section][field] = value
    return config
