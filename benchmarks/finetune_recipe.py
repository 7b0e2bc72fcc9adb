"""Fine-tuning recipes on one finished run's backbone: each variant fine-tunes the backbone on the
run's labelled train split and is scored on its test split, next to the linear probe of report.json.

  python benchmarks/finetune_recipe.py --run runs/demo --config configs/demo.py \
      --variants old,lp,val,lr,new --steps 300 --out ft.json

Variants (on top of the eval.finetune_* defaults of the config, with crops of 0.6-1.0 of the area
unless a variant says 'nocrop'): 'old' random head, lr 4e-3 per
256, no validation split (the last step is tested); 'lp' linear-probe head at lr 1e-3, no
selection; 'val' old + model selection on 10 % of the train split; 'lr' old + lr 1e-3; 'new'
linear-probe head + selection + lr 1e-3; 'new_lr4', 'new_lr1e4', 'new_lr3e5' the same at lr 4e-3,
1e-4, 3e-5 per 256; 'new_nocrop', 'new_lr1e4_nocrop' without the random-resized crop (flip only).
Only the run's backbone and report.json are read.
"""
import argparse
import importlib.util
import json
import os
import time

from msd_jax.data import sites as sites_lib
from msd_jax.evaluation import finetune as ft
from msd_jax.models import vit
from msd_jax.protocols import model_io

OLD = dict(finetune_init="random", finetune_lr=4e-3, finetune_val_fraction=0.0, finetune_crop_scale=(0.6, 1.0))
VARIANTS = {
    "old": {},
    "lp": dict(finetune_init="linear_probe", finetune_lr=1e-3),
    "val": dict(finetune_val_fraction=0.1),
    "lr": dict(finetune_lr=1e-3),
    "new": dict(finetune_init="linear_probe", finetune_val_fraction=0.1, finetune_lr=1e-3),
    "new_lr4": dict(finetune_init="linear_probe", finetune_val_fraction=0.1),
    "new_lr1e4": dict(finetune_init="linear_probe", finetune_val_fraction=0.1, finetune_lr=1e-4),
    "new_lr3e5": dict(finetune_init="linear_probe", finetune_val_fraction=0.1, finetune_lr=3e-5),
    "new_nocrop": dict(finetune_init="linear_probe", finetune_val_fraction=0.1, finetune_lr=1e-3,
                       finetune_crop_scale=(1.0, 1.0)),
    "new_lr1e4_nocrop": dict(finetune_init="linear_probe", finetune_val_fraction=0.1, finetune_lr=1e-4,
                             finetune_crop_scale=(1.0, 1.0)),
}


def load_config(path):
    """'configs/NAME.py' or 'configs/NAME.py:ARG', as --config takes it."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--variants", default="old,lp,val,lr,new")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="")
    a = p.parse_args()
    config = load_config(a.config)
    model = vit.ViTConfig.from_config(config.model)
    data = sites_lib.load(config)
    head, body, _ = model_io.load_backbone(os.path.join(a.run, "backbone"), model)
    with open(os.path.join(a.run, "report.json")) as f:
        probe = json.load(f)["eval"]
    print(f"linear probe: {probe['linear']}", flush=True)
    results = []
    for name in a.variants.split(","):
        cfg = config.copy_and_resolve_references()
        cfg.eval.update({**OLD, **VARIANTS[name]})
        t0 = time.perf_counter()
        r = ft.finetune(cfg, model, head, body, data.labelled_train, data.test, steps=a.steps, seed=cfg.seed,
                        log=lambda m: print(m, flush=True))
        row = {"variant": name, "eval": {k: cfg.eval[k] for k in ("finetune_init", "finetune_lr",
                                                                   "finetune_val_fraction", "finetune_layer_decay",
                                                                   "finetune_crop_scale")},
               "steps": a.steps, "accuracy": r["accuracy"], "auc": r["auc"],
               "linear_accuracy": probe["linear"]["accuracy"], "linear_auc": probe["linear"]["auc"],
               "wall_s": round(time.perf_counter() - t0, 1),
               "val": r["selection"]}
        print(json.dumps({k: v for k, v in row.items() if k != "val"}), flush=True)
        results.append(row)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
