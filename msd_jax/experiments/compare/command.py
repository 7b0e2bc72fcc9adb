"""The comparison command: every row of config.compare.rows for config.compare.seeds seeds, then
the report; or, with config.compare.sweep, the comparison once per value of one config key."""
from __future__ import annotations

import os
import time
from typing import Callable

import jax

from msd_jax.data import sites as sites_lib
from msd_jax.experiments.compare import label_curves
from msd_jax.experiments.compare.budget import plan_budget
from msd_jax.experiments.compare.needs import check_rows
from msd_jax.experiments.compare.report import aggregate, write_ablation, write_outputs
from msd_jax.experiments.compare.results import read_json, result_path, run_dir
from msd_jax.experiments.compare.rows import run_row
from msd_jax.experiments.compare.settings import (apply_quick, changed_config, check_config, parse_rows,
                                                  parse_sweep, seed_config, sweep_config)


def _enable_compile_cache(root: str) -> None:
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _num_devices() -> int:
    """The devices a batch is split over (every trainer shards its batch over all of them)."""
    return jax.device_count()


def _quiet(log, config):
    """The training loops' progress lines only when config.compare.verbose."""
    if config.compare.verbose:
        return log
    return lambda msg: None if ("step " in msg and "ETA" in msg) else log(msg)


def _plan_for(config, data, changed: dict) -> dict:
    """The budget plan; a row with changed settings is planned under them (the merge's token sets)."""
    def plan(cfg):
        return plan_budget(cfg, [len(s) for _, s in data.sites],
                           None if data.proxy is None else len(data.proxy), [n for n, _ in data.sites])
    out = plan(config)
    for row, change in changed.items():
        out[row] = plan(changed_config(config, change["settings"]))[row]
    return out


def _run_seed(config, workdir: str, k: int, rows: list[str], changed: dict, log,
              data=None) -> tuple[int, dict, list[str]]:
    """Every row of seed k: its result read where it exists, else trained (unless report only);
    `changed`: needs.check_rows' rows that run with changed settings; `data`: seed k's data when
    already loaded. Returns (the target image-views, {row: result}, ['row/seed<k>' of the rows
    without a result])."""
    cfg = seed_config(config, k)
    data = data if data is not None else sites_lib.load(cfg)
    plan = _plan_for(cfg, data, changed)
    results, missing = {}, []
    for row in rows:
        path = result_path(workdir, row, k)
        if os.path.isfile(path):
            results[row] = read_json(path)
            log(f"[compare] {row} seed {k}: result exists, skipped ({path})")
            continue
        if config.compare.report_only:
            missing.append(f"{row}/seed{k}")
            continue
        log(f"[compare] {row} seed {k}: {plan[row]['how']}")
        settings = changed.get(row, {}).get("settings", {})
        r = run_row(changed_config(cfg, settings), row, run_dir(workdir, row, k), data, plan,
                    log=_quiet(log, cfg), changed_settings=settings)
        results[row] = r
        log(f"[compare] {row} seed {k}: linear {r['linear']['accuracy']:.3f} fine-tune "
            f"{r['finetune']['accuracy']:.3f}, {(r['bytes_up'] + r['bytes_down']) / 2**20:.2f} MiB, "
            f"train {r['wall_s']:.0f} s, eval {r['eval_s']:.0f} s")
    return plan["target_image_views"], results, missing


def _check_rows(config, rows: list[str], log):
    """needs.check_rows on the first seed's data, logged; returns (the checks, that data)."""
    data = sites_lib.load(seed_config(config, 0))
    checks = check_rows(config, data, rows, _num_devices())
    for row, change in checks.changed.items():
        log(f"[compare] {row}: runs with {change['settings']}: it needs {'; '.join(change['why'])}")
    for row, why in checks.skipped.items():
        log(f"[compare] {row}: skipped, it needs {'; '.join(why)}")
    return checks, data


def _note(config, missing: list[str]) -> str:
    note = ("" if config.compare.finetune_per_site else
            "Per-site fine-tuning was off (config.compare.finetune_per_site=False) to fit the budget.")
    if missing:
        note += (f"\n\nReport only (config.compare.report_only=True): no result yet for "
                 f"{', '.join(missing)}; those rows average fewer seeds (see the seeds column).")
    return note


def run_compare(config, workdir: str, log: Callable[[str], None] = print) -> list[dict]:
    """Runs every row of config.compare.rows for config.compare.seeds seeds (or, with
    config.compare.sweep='section.key=v1,v2,...', the comparison once per value); writes
    comparison.json/.md/.png in `workdir`. Returns the aggregated rows."""
    config = apply_quick(config)
    check_config(config)
    label_curves.fractions(config)  # a bad fraction fails before any row trains
    os.makedirs(workdir, exist_ok=True)
    if config.compare.sweep:
        return run_sweep(config, workdir, log)
    if config.compare.compile_cache:
        _enable_compile_cache(workdir)
    t_all = time.perf_counter()
    asked = parse_rows(config.compare.rows)
    checks, first_data = _check_rows(config, asked, log)  # before any row trains
    rows = [r for r in asked if r not in checks.skipped]
    results: dict[str, list[dict]] = {r: [] for r in rows}
    target, missing = None, []
    for k in range(int(config.compare.seeds)):
        target, seed_results, seed_missing = _run_seed(config, workdir, k, rows, checks.changed, log,
                                                       data=first_data if k == 0 else None)
        for row, r in seed_results.items():
            results[row].append(r)
        missing += seed_missing
    agg = aggregate(results)
    write_outputs(config, workdir, agg, target, _note(config, missing), wall_s=time.perf_counter() - t_all,
                  changed=checks.changed, skipped=checks.skipped)
    return agg


def run_sweep(config, workdir, log) -> list[dict]:
    """The comparison once per value of config.compare.sweep, in DIR/sweep/<key>=<value>/; writes
    DIR/ablation.json and DIR/ablation.md (one table row per value and protocol)."""
    key, values = parse_sweep(config.compare.sweep, config)
    all_rows = []
    for v in values:
        d = os.path.join(workdir, "sweep", f"{key}={v}")
        log(f"[compare] sweep {key}={v} -> {d}")
        for r in run_compare(sweep_config(config, key, v), d, log):
            all_rows.append({key: v, **r})
    write_ablation(workdir, key, all_rows)
    return all_rows
