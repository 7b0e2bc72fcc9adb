"""Encryption modes: names and parsing only (no jax, so config validation stays light).

A mode is 'paper' or a '+'-joined combination of the parts below, e.g. 'secret_head+masked':
  secret_head   head (patch embedding + position embedding) derived from a key the sites share and
                the server never gets
  masked        each image uploads only encrypt.masked_keep_ratio of its tokens
  feature_perm  a secret fixed permutation of the embedding channels, shared by the sites
'paper' is the paper's: a public head, position embeddings added before the token permutation.
"""
from __future__ import annotations

PARTS = ("secret_head", "feature_perm", "masked")
PAPER = "paper"
# The modes the audit measures by default (every combination worth a row).
ALL_MODES = ("paper", "masked", "feature_perm", "secret_head", "feature_perm+masked",
             "secret_head+masked", "secret_head+feature_perm+masked")


def parse_mode(mode, field: str = "config.encrypt.mode") -> frozenset:
    """'paper' -> frozenset(); 'secret_head+masked' -> {'secret_head', 'masked'}. Raises a
    ValueError naming `field` for anything else."""
    expected = (f"expected 'paper' or a '+'-joined combination of {list(PARTS)} "
                "(e.g. 'secret_head+masked')")
    if not isinstance(mode, str) or not mode.strip():
        raise ValueError(f"{field}: {expected}, got {mode!r}")
    if mode == PAPER:
        return frozenset()
    parts = [p.strip() for p in mode.split("+")]
    bad = [p for p in parts if p not in PARTS]
    if bad or len(set(parts)) != len(parts):
        why = f"unknown part(s) {bad}" if bad else "a part repeated"
        raise ValueError(f"{field}: {expected}, got {mode!r} ({why})")
    return frozenset(parts)


def canonical(mode) -> str:
    """The mode's name with its parts in the fixed order of PARTS."""
    parts = parse_mode(mode)
    return "+".join(p for p in PARTS if p in parts) or PAPER


def secret_transform(mode) -> bool:
    """True when the sites' head transform is secret (the server must not hold the head)."""
    return bool(parse_mode(mode) & {"secret_head", "feature_perm"})


def upload_keep_ratio(encrypt_cfg) -> float:
    """The share of each image's tokens a site uploads: encrypt.masked_keep_ratio in a 'masked'
    mode, else encrypt.keep_ratio."""
    if "masked" in parse_mode(encrypt_cfg.mode):
        return float(encrypt_cfg.masked_keep_ratio)
    return float(encrypt_cfg.keep_ratio)
