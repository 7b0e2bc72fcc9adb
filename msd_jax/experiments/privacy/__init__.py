"""Privacy of the encrypted tokens: encryption modes (modes.py), the attacks an honest-but-curious
server can run on what it receives (attacks.py), image metrics (metrics.py) and the audit that runs
every attack against every mode (audit.py; `python -m msd_jax.main --config configs/audit.py`)."""
