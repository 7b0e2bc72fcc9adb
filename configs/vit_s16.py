"""Paper scale: ViT-S/16 at 224 px, DINO's head, for one GPU/TPU host. Same code as the demo.

  python -m msd_jax.main --config configs/vit_s16.py --workdir runs/vit_s16
"""
from msd_jax.config import base_config, resolve_variant


def get_config(arg=None):
    c = base_config()
    c.model.update(variant="S", image_size=224, patch_size=16, out_dim=65536, head_hidden_dim=2048,
                   head_bottleneck_dim=256, dtype="bfloat16")
    c.msd.update(num_global=2, ratio_global=0.6, num_local=8, ratio_local=0.2,
                 teacher_temp=0.04, warmup_teacher_temp=0.04)
    c.train.update(batch_size=256, num_steps=3000, site_steps=3000, log_every=50, checkpoint_every=500)
    c.merge.num_steps = 2000
    c.eval.batch_size = 128
    c.encrypt.mode = "paper"  # the paper's transform, whatever the key source
    return resolve_variant(c)  # direct loaders (benchmarks, notebooks) see the shape that runs
