"""Encryption modes: names and parsing only (no jax, so config validation stays light).

A mode is 'paper' or a '+'-joined combination of the parts below, e.g. 'secret_head+masked', or
'auto' (REAL_KEYS_MODE with real keys, else 'paper'):
  secret_head   head (patch embedding + position embedding) derived from a key the sites share and
                the server never gets
  masked        each image uploads only encrypt.masked_keep_ratio of its tokens
  feature_perm  a secret fixed permutation of the embedding channels, shared by the sites
  pos_noise     fresh gaussian noise on every uploaded token's position component, std
                encrypt.pos_noise_std x the position table's std (against position clustering)
'paper' is the paper's: a public head, position embeddings added before the token permutation.
"""
from __future__ import annotations

import dataclasses

PARTS = ("secret_head", "feature_perm", "masked", "pos_noise")
PAPER = "paper"
AUTO = "auto"
# 'auto' with real keys (encrypt.key_source='urandom'): the mode whose attacks the privacy audit
# found near chance at its accuracy cost within noise of 'paper' (docs/privacy.md, "The default");
# with 'seed' keys, as in every reproduction of the paper, the paper's own transform.
REAL_KEYS_MODE = "secret_head+pos_noise"
# The modes the audit measures by default (every combination worth a row).
ALL_MODES = ("paper", "masked", "feature_perm", "secret_head", "feature_perm+masked",
             "secret_head+masked", "secret_head+feature_perm+masked")


def resolve_name(encrypt_cfg) -> str:
    """config.encrypt.mode with 'auto' replaced by what it stands for under encrypt.key_source."""
    if encrypt_cfg.mode != AUTO:
        return encrypt_cfg.mode
    return REAL_KEYS_MODE if encrypt_cfg.key_source == "urandom" else PAPER


def resolve_shared_key_source(encrypt_cfg) -> str:
    """config.encrypt.shared_key_source, 'auto' meaning the per-image keys' source: a secret head
    drawn from a seed the server's config holds would be no secret."""
    source = encrypt_cfg.shared_key_source
    return encrypt_cfg.key_source if source == AUTO else source


def _parse_parts(text, field: str) -> frozenset:
    """'paper' -> frozenset(); 'secret_head+masked' -> {'secret_head', 'masked'}. Raises a
    ValueError naming `field` for anything else."""
    expected = (f"expected 'paper' or a '+'-joined combination of {list(PARTS)} "
                "(e.g. 'secret_head+masked')")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{field}: {expected}, got {text!r}")
    if text == PAPER:
        return frozenset()
    parts = [p.strip() for p in text.split("+")]
    bad = [p for p in parts if p not in PARTS]
    if bad or len(set(parts)) != len(parts):
        why = f"unknown part(s) {bad}" if bad else "a part repeated"
        raise ValueError(f"{field}: {expected}, got {text!r} ({why})")
    return frozenset(parts)


@dataclasses.dataclass(frozen=True)
class EncryptionMode:
    """A parsed encryption mode: read once from the config, then handed to whoever needs it."""

    parts: frozenset

    @classmethod
    def parse(cls, text, field: str = "config.encrypt.mode") -> "EncryptionMode":
        return cls(_parse_parts(text, field))

    @classmethod
    def from_config(cls, encrypt_cfg) -> "EncryptionMode":
        """The mode config.encrypt names, 'auto' resolved (resolve_name)."""
        return cls.parse(resolve_name(encrypt_cfg))

    @property
    def name(self) -> str:
        """The mode's name with its parts in the fixed order of PARTS."""
        return "+".join(p for p in PARTS if p in self.parts) or PAPER

    @property
    def secret_head(self) -> bool:
        return "secret_head" in self.parts

    @property
    def feature_perm(self) -> bool:
        return "feature_perm" in self.parts

    @property
    def masked(self) -> bool:
        return "masked" in self.parts

    @property
    def pos_noise(self) -> bool:
        return "pos_noise" in self.parts

    def position_noise_std(self, encrypt_cfg) -> float:
        """The std of the noise on each token's position component, relative to the position
        table's std: encrypt.pos_noise_std in a 'pos_noise' mode, else 0."""
        return float(encrypt_cfg.pos_noise_std) if self.pos_noise else 0.0

    @property
    def secret_transform(self) -> bool:
        """True when the sites' head transform is secret (the server must not hold the head)."""
        return self.secret_head or self.feature_perm

    def upload_keep_ratio(self, encrypt_cfg) -> float:
        """The share of each image's tokens a site uploads: encrypt.masked_keep_ratio in a 'masked'
        mode, else encrypt.keep_ratio."""
        return float(encrypt_cfg.masked_keep_ratio if self.masked else encrypt_cfg.keep_ratio)


# What the privacy audit measured an honest-but-curious server recovering in each part's mode
# (docs/privacy.md: the quick audit, 32 px, patch 4, mean-image guess 16.46 dB; figures marked 64 px
# from the demo-size audit, mean-image guess 15.32 dB).
# A combination is as weak as its weakest claim, so the statement is picked by the parts present.
_EXPOSURE = {
    "public_head": "the head is public: the server places 100 % of the tokens and rebuilds every image "
                   "(69.9 dB PSNR, SSIM 1.000)",
    "public_head_masked": "the head is public: the server places every uploaded token and rebuilds the "
                          "uploaded patches exactly; only the patches not uploaded are hidden (19.5 dB "
                          "against 16.5 dB for the mean-image guess)",
    "secret_head": "head-free attacks group 100 % of the tokens by position (clustering) and rebuild "
                   "the images, mirrored, at 24.99 dB (SSIM 0.896) against 16.46 dB for the "
                   "mean-image guess (moments; at 64 px 24.47 dB, SSIM 0.849, against 15.32 dB)",
    "secret_head_masked": "head-free clustering places 0.270 of the uploaded tokens (17.3 x chance); the "
                          "moments attack rebuilds below the mean-image guess (15.29 dB against 16.46 dB)",
    "secret_head_pos_noise": "at pos_noise_std 4 (the default) head-free clustering places 0.043 (32 px) / "
                             "0.045 (64 px) of the tokens, 1.2 / 1.6 x a random grouping, and every "
                             "reconstruction is below the mean-image guess; linear accuracy 0.753 against "
                             "0.758 (32 px) and 0.860 against 0.888 (64 px) in paper; at 2 the clustering "
                             "places 0.117 at 64 px",
    "public_head_pos_noise": "not measured without secret_head; the public head still gives the "
                             "known-head attack the patch embedding",
}


def exposure(mode: EncryptionMode) -> str:
    """One line: the mode, and what the privacy audit says an honest-but-curious server can recover
    from its uploads (docs/privacy.md)."""
    if not mode.secret_head:
        key = "public_head_pos_noise" if mode.pos_noise else (
            "public_head_masked" if mode.masked else "public_head")
    elif mode.pos_noise:
        key = "secret_head_pos_noise"
    else:
        key = "secret_head_masked" if mode.masked else "secret_head"
    statement = _EXPOSURE[key]
    if mode.feature_perm and not mode.secret_head:
        statement += "; the secret channel order is read off the channels' value distributions"
    return f"privacy: encrypt.mode={mode.name}: {statement} (docs/privacy.md)"
