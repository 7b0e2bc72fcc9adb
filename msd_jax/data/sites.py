"""The data each party sees, from the config: the sites' images, the labelled evaluation sets and
the server's proxy set."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from msd_jax.data import partition as partition_lib
from msd_jax.layout import check_site_name
from msd_jax.data import sources


@dataclasses.dataclass
class FederatedData:
    sites: list[tuple[str, sources.ImageSet]]   # (site name, its training images)
    test: sources.ImageSet                      # labelled test split
    proxy: Optional[sources.ImageSet]           # server-held proxy set (model-upload merging)

    @property
    def labelled_train(self) -> sources.ImageSet:
        """All sites' images with labels, pooled: what the kNN / linear probes are fitted on."""
        sets = [s for _, s in self.sites]
        return dataclasses.replace(
            sets[0], images=np.concatenate([s.images for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            ids=tuple(i for s in sets for i in s.ids))


def _split_names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def load(config) -> FederatedData:
    d, m = config.data, config.model
    cache = d.cache_dir or None
    if d.name == "br35h":
        train, test = sources.load_br35h(m.image_size, m.channels, d.test_fraction, config.seed,
                                         cache_dir=cache, min_side=m.patch_size)
        rng = np.random.default_rng(config.seed + 1)
        order = rng.permutation(len(train))
        n_proxy = int(round(d.proxy_fraction * len(train)))
        proxy = train.subset(np.sort(order[:n_proxy])) if n_proxy else None
        rest = train.subset(np.sort(order[n_proxy:]))
        parts = partition_lib.partition(rest.labels, d.num_sites, d.partition, d.alpha, config.seed)
        sites = [(f"site{i}", rest.subset(idx)) for i, idx in enumerate(parts)]
        return FederatedData(sites, test, proxy)
    dirs = _split_names(d.site_dirs)
    if _split_names(d.site_names):
        names = [check_site_name(n, "config.data.site_names") for n in _split_names(d.site_names)]
    else:
        names = [check_site_name(os.path.basename(os.path.abspath(x)),
                                 f"config.data.site_dirs: the name of folder {x!r} (set config.data.site_names)")
                 for x in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"config.data.site_names: {len(names)} names for {len(dirs)} site_dirs")
    if len(set(names)) != len(names):
        raise ValueError(f"config.data.site_names: site names must be unique, got {names} "
                         "(set config.data.site_names)")
    extra = [d.proxy_dir] if d.proxy_dir else []
    dicom_opts = sources.DicomOptions(d.dicom_window, d.dicom_frames)
    site_sets, test = sources.load_folders(dirs + extra, d.test_dir, m.image_size, m.channels,
                                           cache_dir=cache, min_side=m.patch_size,
                                           dicom_opts=dicom_opts)
    proxy = site_sets.pop() if extra else None
    return FederatedData(list(zip(names, site_sets)), test, proxy)
