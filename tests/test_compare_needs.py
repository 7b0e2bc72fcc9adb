"""The comparison's check of every row's needs before any row trains (experiments/compare/needs.py):
on image folders without a proxy set, model upload merges on the uploaded tokens and says so; a row
that cannot run is skipped with its reason, in the table and in comparison.json."""
import json
import os

import numpy as np
from PIL import Image

from msd_jax.data.sites import FederatedData
from msd_jax.data.sources import ImageSet
from msd_jax.experiments.compare import command, needs, settings
import conftest

NO_PROXY = ("a server-held proxy set for the one-shot merge (config.merge.data='proxy'), but "
            "data.name='folders' without data.proxy_dir")


def write_folder(folder, seed, classes=("bright", "dark"), n=6):
    rng = np.random.default_rng(seed)
    for cls in classes:
        os.makedirs(folder / cls, exist_ok=True)
        base = 190 if cls == "bright" else 60
        for i in range(n):
            arr = np.clip(base + rng.normal(0, 25, (20, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(folder / cls / f"img{i:02d}.png")
    return str(folder)


def folders_config(root, rows, classes=("bright", "dark")):
    """configs/compare.py:tiny on two sites' and a test ImageFolder tree, no proxy folder."""
    c = conftest.load_config("compare", "tiny")
    sites = [write_folder(root / "hospital_a", 1, classes), write_folder(root / "hospital_b", 2, classes)]
    c.data.update(name="folders", site_dirs=",".join(sites), test_dir=write_folder(root / "test", 9, classes),
                  cache_dir=str(root / "tfds"))
    c.compare.rows = rows
    c.quick_settings.compare.finetune_per_site = False
    return c


def image_set(labels, names=("no", "yes")):
    labels = np.asarray(labels, np.int32)
    return ImageSet(np.zeros((len(labels), 8, 8, 1), np.float32), labels, names,
                    tuple(str(i) for i in range(len(labels))))


def test_row_lacks_names_what_is_missing():
    c = conftest.load_config("compare", "tiny")
    c.data.update(name="br35h", proxy_fraction=0.0)
    data = FederatedData(sites=[("s0", image_set([0, 1, 1])), ("s1", image_set([0, 1]))], test=image_set([0, 1]),
                         proxy=None)
    lacks = needs.row_lacks(c, data, list(settings.ROWS))
    no_proxy = ("a server-held proxy set for the one-shot merge (config.merge.data='proxy'), but "
                "data.proxy_fraction=0.0 leaves no proxy split of the br35h train images")
    assert lacks["msd_model_upload"] == [needs.Lack(no_proxy, {"merge.data": "uploaded"})]
    assert not any(lacks[r] for r in settings.ROWS if r != "msd_model_upload")
    checks = needs.check_rows(c, data, list(settings.ROWS))
    assert checks.changed == {"msd_model_upload": {"settings": {"merge.data": "uploaded"}, "why": [no_proxy]}}
    assert checks.skipped == {}
    # with a proxy set, or merging on the uploaded tokens already, model upload lacks nothing
    with_proxy = FederatedData(data.sites, data.test, proxy=image_set([0, 1]))
    assert needs.row_lacks(c, with_proxy, ["msd_model_upload"]) == {"msd_model_upload": []}
    c.merge.data = "uploaded"
    assert needs.row_lacks(c, data, ["msd_model_upload"]) == {"msd_model_upload": []}
    # 3 devices: s1's 2 images cannot fill a batch, so no row that trains at the sites can run
    checks = needs.check_rows(c, data, list(settings.ROWS), num_devices=3)
    assert sorted(checks.skipped) == sorted(needs.SITE_TRAINING)
    assert checks.skipped["local_only"] == ["at least one image per device (3) at every site, to train there, "
                                            "but sites s1 (2) have fewer"]


def test_one_class_leaves_no_row_to_run():
    c = conftest.load_config("compare", "tiny")
    data = FederatedData(sites=[("s0", image_set([0, 0])), ("s1", image_set([0]))], test=image_set([0, 1]),
                         proxy=image_set([0]))
    checks = needs.check_rows(c, data, list(settings.ROWS))
    why = ("labelled images of >= 2 classes for the evaluation (fine-tuning a classifier), but the "
           "sites' images hold 1 (no)")
    assert checks.skipped == {r: [why] for r in settings.ROWS} and checks.changed == {}


def test_model_upload_on_folders_without_proxy_merges_on_uploaded_tokens(tmp_path):
    c = folders_config(tmp_path, "msd_model_upload")
    wd = tmp_path / "work"
    logs = []
    rows = command.run_compare(c, str(wd), log=logs.append)
    assert [r["name"] for r in rows] == ["msd_model_upload"]
    model_up = rows[0]
    assert model_up["changed_settings"] == {"merge.data": "uploaded"}
    assert "on 24 uploaded token sets" in model_up["how"]
    run = wd / "runs" / "msd_model_upload" / "seed0"
    assert sorted(os.listdir(run / "shards")) == ["hospital_a", "hospital_b"]  # no proxy shards
    # the uploaded tokens travel with the models
    with open(run / "result.json") as f:
        result = json.load(f)
    assert result["changed_settings"] == {"merge.data": "uploaded"}
    shard_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(run / "shards") for f in fs)
    assert result["bytes_up"] > shard_bytes > 0
    with open(wd / "comparison.json") as f:
        out = json.load(f)
    assert out["changed_rows"] == {"msd_model_upload": {"settings": {"merge.data": "uploaded"},
                                                        "why": [NO_PROXY]}}
    assert out["skipped_rows"] == {}
    md = (wd / "comparison.md").read_text()
    assert ("- **msd_model_upload**: merge.data='uploaded' (not 'proxy'), because it needs "
            f"{NO_PROXY}.") in md
    assert md.index("Rows run with a changed setting") > md.index("| msd_model_upload |")
    assert any(m.startswith("[compare] msd_model_upload: runs with {'merge.data': 'uploaded'}") for m in logs)


def test_a_row_that_cannot_run_is_skipped_before_any_training(tmp_path, monkeypatch):
    """On 3 (pretended) devices hospital_b's 2 images cannot fill a batch: local_only is skipped
    before no_pretraining (which trains nothing at the sites) runs."""
    c = folders_config(tmp_path, "local_only,no_pretraining")
    c.data.site_dirs = ",".join([c.data.site_dirs.split(",")[0],
                                 write_folder(tmp_path / "hospital_small", 3, n=1)])
    monkeypatch.setattr(command, "_num_devices", lambda: 3)
    trained = []
    real_run_row = command.run_row
    monkeypatch.setattr(command, "run_row", lambda cfg, row, *a, **kw: trained.append(row) or
                        real_run_row(cfg, row, *a, **kw))
    wd = tmp_path / "work"
    rows = command.run_compare(c, str(wd), log=lambda *_: None)
    assert trained == ["no_pretraining"] and [r["name"] for r in rows] == ["no_pretraining"]
    why = ("at least one image per device (3) at every site, to train there, but sites "
           "hospital_small (2) have fewer")
    with open(wd / "comparison.json") as f:
        assert json.load(f)["skipped_rows"] == {"local_only": [why]}
    md = (wd / "comparison.md").read_text()
    assert "| local_only | skipped (below) | - |" in md
    assert f"- **local_only**: skipped, because it needs {why}." in md
    assert not os.path.exists(wd / "runs" / "local_only")
