"""What each row needs from the data, checked before any row trains. A row that lacks something runs
with a stand-in setting where one exists, or is skipped; either way the table and comparison.json
say which rows and why, so that a comparison on the user's own folders runs every row it can instead
of stopping at the first one that cannot run.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Lack:
    what: str   # what the row needs and the data does not give, and where that comes from
    # {'section.key': value}: the setting the row runs with instead; empty: none, the row is skipped
    stand_in: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RowChecks:
    changed: dict   # {row: {"settings": {'section.key': value}, "why": [what it lacks]}}
    skipped: dict   # {row: [what it lacks]}


def _no_proxy_because(config) -> str:
    d = config.data
    if d.name == "folders":
        return "data.name='folders' without data.proxy_dir"
    return f"data.proxy_fraction={d.proxy_fraction} leaves no proxy split of the {d.name} train images"


# the rows that train a model at each site on that site's images alone
SITE_TRAINING = ("msd_model_upload", "local_only", "fedavg_msd")


def _classes_present(data) -> list[str]:
    train = data.labelled_train
    return [train.class_names[i] for i in np.unique(train.labels)]


def _small_sites(data, num_devices: int) -> list[str]:
    return [f"{name} ({len(s)})" for name, s in data.sites if len(s) < num_devices]


def row_lacks(config, data, rows: list[str], num_devices: int = 1) -> dict[str, list[Lack]]:
    """Per row of `rows`, what it lacks from `data` ([] when nothing); `num_devices`: the devices a
    batch is split over. `data` may be any seed's: a seed changes the partition, not whether a proxy
    set exists nor which classes the sites hold (a site's size, checked against the devices, can
    change: a seed with a smaller site still fails in training)."""
    out: dict[str, list[Lack]] = {row: [] for row in rows}
    classes = _classes_present(data)
    if len(classes) < 2:  # every row is scored by fine-tuning a classifier (and supervised trains one)
        for row in rows:
            out[row].append(Lack(f"labelled images of >= 2 classes for the evaluation (fine-tuning a "
                                 f"classifier), but the sites' images hold {len(classes)} ({', '.join(classes)})"))
    if "msd_model_upload" in out and config.merge.data == "proxy" and (data.proxy is None or not len(data.proxy)):
        out["msd_model_upload"].append(Lack(
            f"a server-held proxy set for the one-shot merge (config.merge.data='proxy'), but "
            f"{_no_proxy_because(config)}", {"merge.data": "uploaded"}))
    small = _small_sites(data, num_devices)
    for row in SITE_TRAINING:
        if row in out and small:
            out[row].append(Lack(f"at least one image per device ({num_devices}) at every site, to train "
                                 f"there, but sites {', '.join(small)} have fewer"))
    return out


def check_rows(config, data, rows: list[str], num_devices: int = 1) -> RowChecks:
    """Which rows run with a changed setting and which cannot run, from row_lacks."""
    changed, skipped = {}, {}
    for row, lacks in row_lacks(config, data, rows, num_devices).items():
        if not lacks:
            continue
        if all(lack.stand_in for lack in lacks):
            settings = {k: v for lack in lacks for k, v in lack.stand_in.items()}
            changed[row] = {"settings": settings, "why": [lack.what for lack in lacks]}
        else:
            skipped[row] = [lack.what for lack in lacks if not lack.stand_in]
    return RowChecks(changed, skipped)
