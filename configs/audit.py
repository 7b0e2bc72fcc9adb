"""Privacy audit: every attack against every encryption mode on Br35H, and each mode's downstream
cost (a backbone trained in that mode, linear probe). Writes DIR/audit.json, audit.md, audit.png.

  python -m msd_jax.main --config configs/audit.py:quick --workdir runs/audit_quick   # ~20 min, 2 CPUs
  python -m msd_jax.main --config configs/audit.py --workdir runs/audit               # demo-sized model

See docs/privacy.md for the threat model and msd_jax/experiments/privacy/ for the attacks.
"""
from msd_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.job = "audit"
    c.encrypt.key_source = "seed"     # the audit recomputes every token's true position
    c.eval.random_init_baseline = False
    c.eval.per_site = False           # the audit needs the pooled linear probe only
    c.eval.label_fractions = ""
    if arg == "quick":
        # 32 px, patch 4: 64 tokens of 16 pixels into 64 channels (D > d_p as in the demo's 192 > 64)
        c.model.update(image_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, out_dim=512,
                       head_hidden_dim=128, head_bottleneck_dim=64)
        c.train.update(num_steps=200, batch_size=64, log_every=50, checkpoint_every=200)
        c.optim.lr = 4e-3
        c.msd.momentum_teacher = 0.99
        c.eval.update(linear_steps=300, features="cls_avgpool")
        c.audit.attack_images = 200
        c.audit.sweep = "0.5,1,2,4"
    elif arg in (None, "", "full"):
        # the demo's model (configs/demo.py): 64 px, patch 8, width 192, 4 blocks
        c.train.num_steps = 600
        c.optim.lr = 4e-3
        c.msd.momentum_teacher = 0.99
        c.audit.attack_images = 600
        c.audit.sweep = "0.5,1,2,4"
    elif arg == "tiny":  # tests: seconds per mode
        c.model.update(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_dim=64,
                       head_hidden_dim=32, head_bottleneck_dim=16)
        c.train.update(num_steps=2, batch_size=16, log_every=1, checkpoint_every=2)
        c.eval.update(linear_steps=20, features="cls")
        c.audit.update(attack_images=12, public_images=40, kmeans_iters=5, num_figure_images=3)
    else:
        raise ValueError(f"configs/audit.py: argument expected 'quick', 'full', 'tiny' or none, got {arg!r}")
    return c
