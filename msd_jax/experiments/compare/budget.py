"""One compute budget split among every row.

The budget is counted in student image-views: (msd.num_global + msd.num_local) views x batch x
steps, that of token upload with compare.budget_steps server steps. Each row gets the steps of each
of its parties, which the rows pass on to the trainers.

The rows trained on the labels alone are outside that budget: `finetune_only` (the fine-tuning
recipe from a random-init backbone) and `supervised_scratch` each get the optimizer steps and batch
every backbone's fine-tuning gets (compare.finetune_steps x eval.finetune_batch_size), so that
pretraining is the only difference between them and a pretrained row's fine-tune column.
"""
from __future__ import annotations

import numpy as np

from msd_jax.experiments.compare.settings import ROWS
from msd_jax.training import batches

# rows that spend none of the pretraining budget: trained on the labels alone, or not at all
LABELS_ONLY = ("no_pretraining", "finetune_only", "supervised_scratch")


def _batch(requested: int, n: int) -> int:
    return batches.batch_size_for(requested, n, 1)


def _split_steps(target_views: float, weights, batches, views_per_image: int) -> list[int]:
    """Steps per party so that party i gets about weights[i] / sum(weights) of `target_views`."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return [max(1, int(round(target_views * wi / (views_per_image * b)))) for wi, b in zip(w, batches)]


def _entry(steps: dict, batch: dict, per_image: int, target: int, how: str) -> dict:
    views = sum(per_image * batch[p] * s for p, s in steps.items())
    return {"steps": steps, "batch": batch, "image_views": int(views),
            "optimizer_steps": int(sum(steps.values())), "rounding": int(views - target), "how": how}


def _fedavg_entry(target: int, rounds: int, names: list[str], b_sites: list[int], V: int) -> dict:
    """Every site takes the same local steps in a round; the rounds' steps differ by at most one so
    that R rounds can spend the budget (R x E alone rounds to a multiple of R)."""
    total = max(rounds, int(round(target / (V * sum(b_sites)))))
    base, extra = divmod(total, rounds)
    per_round = [base + 1] * extra + [base] * (rounds - extra)
    E_txt = f"{base}" if not extra else f"{base}-{base + 1} ({extra} rounds of {base + 1})"
    entry = _entry({n: total for n in names}, dict(zip(names, b_sites)), V, target,
                   f"{rounds} rounds x {E_txt} local steps x {len(names)} sites, {V} views")
    entry["rounds"], entry["local_steps"] = rounds, per_round
    return entry


def plan_budget(config, site_sizes: list[int], proxy_size: int | None = None,
                site_names: list[str] | None = None) -> dict:
    """Splits one budget of student image-views among every row.

    The budget is that of token upload: V x B x compare.budget_steps, where V = msd.num_global +
    msd.num_local views per image and B the batch. Returns {"target_image_views", "views_per_image",
    row: {"steps": {party: steps}, "batch": {party: batch}, "image_views", "optimizer_steps", "how"}}.
    Whole steps leave a rounding error, reported as "rounding" (image-views minus target).
    `no_pretraining` spends nothing (0 image-views); `finetune_only` and `supervised_scratch` get the
    fine-tuning budget (compare.finetune_steps steps of batch eval.finetune_batch_size, 1 view)."""
    m, t, c = config.msd, config.train, config.compare
    V = int(m.num_global + m.num_local)
    B = int(t.batch_size)
    S = int(c.budget_steps)
    n_pool = int(sum(site_sizes))
    if n_pool < 1 or any(n < 1 for n in site_sizes):
        raise ValueError(f"plan_budget: site sizes {site_sizes}: every site needs >= 1 image")
    b_pool = _batch(B, n_pool)
    target = V * b_pool * S
    names = list(site_names) if site_names is not None else [f"site{i}" for i in range(len(site_sizes))]
    if len(names) != len(site_sizes):
        raise ValueError(f"plan_budget: {len(names)} site names for {len(site_sizes)} site sizes")
    b_sites = [_batch(B, n) for n in site_sizes]
    weights = site_sizes if c.site_split == "size" else [1] * len(site_sizes)
    plan: dict = {"target_image_views": target, "views_per_image": V}

    pooled_how = (f"{S} steps x batch {b_pool} x {V} student views on the pooled "
                  f"{n_pool} images")
    plan["msd_token_upload"] = _entry({"server": S}, {"server": b_pool}, V, target,
                                      "server trains on the uploaded tokens: " + pooled_how)
    plan["centralized_msd"] = _entry({"server": S}, {"server": b_pool}, V, target,
                                     "token views of raw pooled images, patch embedding trained: "
                                     + pooled_how)
    plan["centralized_dino"] = _entry({"server": S}, {"server": b_pool}, V, target,
                                      "DINO pixel multi-crop of raw pooled images: " + pooled_how)
    ft_steps = int(c.finetune_steps)
    b_ft = _batch(int(config.eval.finetune_batch_size), n_pool)
    plan["supervised_scratch"] = _entry({"server": ft_steps}, {"server": b_ft}, 1, target,
                                        f"{ft_steps} supervised steps x batch {b_ft} x 1 view on the "
                                        f"pooled labelled images (the fine-tuning budget)")
    plan["finetune_only"] = _entry({"finetune": ft_steps}, {"finetune": b_ft}, 1, target,
                                   f"no pretraining: the fine-tuning recipe, {ft_steps} steps x batch "
                                   f"{b_ft} x 1 view, from the random-init body with the sites' head")
    # model upload: a share of the budget for the one-shot merge, the rest split over the sites
    n_merge = int(proxy_size) if (config.merge.data == "proxy" and proxy_size) else n_pool
    b_merge = _batch(B, n_merge)
    merge_steps = max(1, int(round(float(c.merge_frac) * target / (V * b_merge))))
    site_steps = _split_steps(target - V * b_merge * merge_steps, weights, b_sites, V)
    plan["msd_model_upload"] = _entry(
        {**dict(zip(names, site_steps)), "merge": merge_steps},
        {**dict(zip(names, b_sites)), "merge": b_merge}, V, target,
        f"site steps {site_steps} ({c.site_split} split) + {merge_steps} merge steps on "
        f"{n_merge} {config.merge.data} token sets, {V} views")
    local_steps = _split_steps(target, weights, b_sites, V)
    plan["local_only"] = _entry(dict(zip(names, local_steps)), dict(zip(names, b_sites)), V, target,
                                f"each site alone, steps {local_steps} ({c.site_split} split), {V} views")
    plan["fedavg_msd"] = _fedavg_entry(target, int(c.fedavg_rounds), names, b_sites, V)
    plan["no_pretraining"] = {"steps": {}, "batch": {}, "image_views": 0, "optimizer_steps": 0,
                              "rounding": -target, "how": "no pretraining: random-init body, same head"}
    return plan


def budget_is_fair(plan: dict, tolerance: float = 0.0) -> bool:
    """Every pretraining row (not LABELS_ONLY) within `tolerance` (relative) of the target
    image-views."""
    t = plan["target_image_views"]
    return all(abs(plan[r]["image_views"] - t) <= tolerance * t + 1e-9 for r in ROWS
               if r not in LABELS_ONLY and r in plan)
