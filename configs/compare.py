"""Every protocol and baseline at one compute budget, over several seeds (msd_jax/experiments/compare/).

  python -m msd_jax.main --config configs/compare.py --workdir DIR                     # one GPU
  python -m msd_jax.main --config configs/compare.py --config.quick=True --workdir DIR # 2 CPU cores
  python -m msd_jax.main --config configs/compare.py:demo --workdir DIR  # the demo's scale, 1 seed
  # ablations (one key, several values; each value gets DIR/sweep/<key>=<value>/):
  ... --config.compare.sweep=data.num_sites=2,4,8
  ... --config.compare.sweep=data.alpha=0.1,0.5,10
  ... --config.compare.sweep=msd.ratio_local=0.1,0.2,0.3     (token keep ratios of the views)
  ... --config.compare.sweep=merge.data=proxy,uploaded --config.compare.rows=msd_token_upload,msd_model_upload
  ... --config.compare.sweep=data.partition=iid,dirichlet,quantity

Full mode is the demo's model and training recipe (configs/demo.py: 64 px, patch 8, width 192, depth
4; 600 server steps of batch 64, lr 4e-3 per 256, teacher momentum 0.99) for every row, sized for one
GPU. `quick=True` applies `quick_settings` (a tiny ViT at 32 px) on top; to change one of those keys
in quick mode, override it as --config.quick_settings.<section>.<key>=...
`:demo` is full mode for one seed, with the demo's bfloat16 matmul operands and no per-site
fine-tuning, so that every row at the demo's model and recipe fits on 2 CPU cores (docs/comparison.md).
"""
import ml_collections

from msd_jax.config import base_config
from msd_jax.experiments.compare.settings import ROWS


def get_config(arg=None):
    c = base_config()
    c.job = "compare"
    c.quick = False
    # the demo's recipe (README, Results): a short budget needs a faster teacher and a higher lr
    c.optim.lr = 4e-3
    c.msd.momentum_teacher = 0.99
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.eval.random_init_baseline = False  # no_pretraining is its own row
    # fine-tuning (evaluation/finetune.py) with the eval.finetune_* defaults: LP-FT at lr 1e-3 per 256,
    # selected on 10 % of the labelled train images (docs/comparison.md, "Fine-tuning recipe")
    c.compare = ml_collections.ConfigDict(dict(
        seeds=3,                  # seeds config.seed, +1, ...: partition, head and every key change
        rows=",".join(ROWS),      # comma-separated subset of msd_jax.experiments.compare.settings.ROWS
        budget_steps=600,         # the budget: token-upload server steps x batch x views per image
        merge_frac=0.25,          # model upload: share of the budget spent on the one-shot merge
        site_split="size",        # model upload / local only: site steps 'size'-proportional or 'equal'
        fedavg_rounds=20,         # FedAvg-MSD rounds R (local steps E follow from the budget)
        finetune_steps=300,       # full fine-tuning budget of each backbone (linear head on CLS)
        finetune_train_head=False,  # also fine-tune the patch embedding
        finetune_per_site=True,   # also fine-tune on each site's labels alone (mean over sites)
        # label efficiency (label_curves.py): probes at eval.label_fractions x eval.label_draws; each
        # row's label-trained method (fine-tuning, finetune_only, supervised) at these fractions
        # ('' = the same) on the first label_train_draws draws
        label_train_fractions="",
        label_train_draws=3,
        sweep="",                 # ablation: 'section.key=v1,v2,...' runs the comparison per value
        compile_cache=True,       # persistent XLA compilation cache in DIR/.jax_cache
        verbose=False,            # print the training loops' progress lines
        report_only=False,        # write the table from the row-seed results already in DIR; train nothing
    ))
    # tiny sizes for 2 CPU cores (measured: see README, "Comparison")
    c.quick_settings = ml_collections.ConfigDict(dict(
        model=dict(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, out_dim=512,
                   head_hidden_dim=256, head_bottleneck_dim=64),
        msd=dict(num_local=4, ratio_local=0.25),
        train=dict(batch_size=32, checkpoint_every=1000, log_every=100),
        compare=dict(budget_steps=600, fedavg_rounds=5, finetune_steps=150, finetune_per_site=False,
                     label_train_fractions="0.1", label_train_draws=1),
        eval=dict(linear_steps=300),
    ))
    if arg == "demo":  # every row at the demo's model and recipe, one seed, for 2 CPU cores
        c.model.matmul_dtype = "bfloat16"
        c.compare.update(seeds=1, finetune_per_site=False, label_train_fractions="0.01,0.1", label_train_draws=1)
    elif arg not in (None, "", "tiny"):
        raise ValueError(f"configs/compare.py: unknown argument {arg!r} (expected none, 'demo' or 'tiny')")
    if arg == "tiny":  # a seconds-long smoke run of every row (tests)
        c.quick = True
        c.quick_settings.model.update(image_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                      out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
        c.quick_settings.msd.update(num_local=2, ratio_local=0.25)
        c.quick_settings.train.update(batch_size=8)
        c.quick_settings.compare.update(budget_steps=4, fedavg_rounds=2, finetune_steps=3, seeds=1,
                                        label_train_fractions="0.5")
        c.quick_settings.eval.update(linear_steps=10, label_fractions="0.5,1.0", label_draws=2,
                                     bootstrap_resamples=50)
    return c
