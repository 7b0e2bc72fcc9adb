"""Demo: Br35H brain MRI (embedded), 4 sites with Dirichlet(0.5) label skew, a small ViT at 64x64
with patch 8, the paper's token-upload protocol. Sized for 2 CPU cores.

  python -m msd_jax.main --config configs/demo.py --workdir runs/demo
  python -m msd_jax.main --config configs/demo.py:quick --workdir /tmp/q   # a smoke run
"""
from msd_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    # A short budget (600 steps, ~18 epochs of 2,159 images): a faster-moving teacher and a higher lr
    # than DINO's 100-epoch defaults. Measured on Br35H (see README, Results).
    c.train.num_steps = 600
    c.optim.lr = 4e-3                 # per 256 images: 1e-3 at batch 64
    c.msd.momentum_teacher = 0.99
    c.train.site_steps = 150
    c.merge.num_steps = 150
    # bfloat16 operands in the dense layers, float32 everywhere else: 1.5x faster steps on CPUs with
    # AVX512-BF16 at the same accuracy (benchmarks/NOTES.md, change 9)
    c.model.matmul_dtype = "bfloat16"
    if arg == "quick":  # seconds, for smoke tests
        c.model.update(embed_dim=32, depth=1, num_heads=2, out_dim=64, head_hidden_dim=32,
                       head_bottleneck_dim=16, image_size=32)
        c.train.update(num_steps=4, site_steps=4, batch_size=16, log_every=2, checkpoint_every=2)
        c.merge.num_steps = 4
        c.eval.linear_steps = 50
        c.eval.update(label_fractions="0.25,1.0", label_draws=1, bootstrap_resamples=200)
    return c
