"""Privacy of the encrypted tokens, as measured: the attacks an honest-but-curious server can run on
what it receives (attacks.py), image metrics (metrics.py), and the audit that runs every attack
against every encryption mode of msd_jax/encryption/modes.py (audit.py;
`python -m msd_jax.main --config configs/audit.py`)."""
