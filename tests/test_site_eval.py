"""Evaluations fitted on one site's labels alone (report.eval_by_site, the comparison's per-site
fine-tuning) run only on two classes among config.eval.per_site_min_images images; the others get
their reason instead of numbers, and every consumer takes it. The run_eval end to end is in
test_plots.py (test_run_eval_by_site)."""
import numpy as np
import pytest

from msd_jax import config as config_lib
from msd_jax import parties
from msd_jax.data.sources import ImageSet
from msd_jax.experiments.compare import evaluate as compare_evaluate
from msd_jax.experiments.compare import report
import conftest

NEED = "per-site probes need >= 2 classes and >= 10 images (config.eval.per_site_min_images)"


def image_set(labels, names=("glioma", "meningioma", "none")):
    labels = np.asarray(labels, np.int32)
    return ImageSet(np.zeros((len(labels), 8, 8, 1), np.float32), labels, names,
                    tuple(str(i) for i in range(len(labels))))


@pytest.mark.parametrize("labels, reason", [
    ([0], f"one class (glioma) among its 1 image; {NEED}"),
    ([1] * 12, f"one class (meningioma) among its 12 images; {NEED}"),
    ([0, 2, 0, 2], f"only 4 images (2 classes: glioma, none); {NEED}"),
    ([], f"no labelled images; {NEED}"),
])
def test_a_site_below_the_minimum_gets_its_reason(labels, reason):
    c = config_lib.base_config()
    assert c.eval.per_site_min_images == 10
    assert parties.site_eval_skip_reason(c, image_set(labels)) == reason


def test_a_site_meeting_the_minimum_is_evaluated():
    c = config_lib.base_config()
    assert parties.site_eval_skip_reason(c, image_set([0] * 9 + [1])) is None
    c.eval.per_site_min_images = 2
    assert parties.site_eval_skip_reason(c, image_set([0, 1])) is None


def test_the_minimum_is_validated():
    c = config_lib.base_config()
    c.eval.per_site_min_images = 1
    with pytest.raises(ValueError, match=r"config.eval.per_site_min_images: expected >= 2"):
        config_lib.validate(c)


def test_per_site_fine_tuning_skips_a_site_below_the_minimum(monkeypatch):
    c = config_lib.base_config()
    c.eval.per_site_min_images = 4
    tuned = []

    def fake_finetune(config, model, head, body, train_set, test_set, log):
        tuned.append(len(train_set))
        return {"accuracy": 0.5 + 0.1 * len(tuned), "auc": 0.7}
    monkeypatch.setattr(compare_evaluate, "_finetune", fake_finetune)
    sets = [("a", image_set([0, 1, 0, 1])), ("b", image_set([0])), ("c", image_set([0, 1, 1, 1, 0]))]
    logs = []
    r = compare_evaluate._finetune_per_site(c, None, None, None, sets, image_set([0, 1]), logs.append)
    assert tuned == [4, 5]
    why = ("one class (glioma) among its 1 image; per-site fine-tuning needs >= 2 classes and >= 4 images "
           "(config.eval.per_site_min_images)")
    assert r["sites"]["b"] == {"accuracy": None, "auc": None, "skipped": why}
    assert r["accuracy"] == pytest.approx(np.mean([0.6, 0.7])) and r["auc"] == pytest.approx(0.7)
    assert logs == [f"[compare] site 'b': no per-site fine-tuning: {why}"]
    # no site meets it: no number, and the table shows '-'
    none = compare_evaluate._finetune_per_site(c, None, None, None, sets[1:2], image_set([0, 1]), logs.append)
    assert none["accuracy"] is None and none["auc"] is None


def test_the_comparison_aggregates_around_a_missing_per_site_number():
    def res(seed, per_site):
        r = {"seed": seed, "budget": {"how": "x"}, "bytes_up": 1, "bytes_down": 0, "rounds": 1,
             "image_views": 10, "optimizer_steps": 2, "wall_s": 1.0, "eval_s": 1.0,
             "finetune_per_site": {"accuracy": per_site, "auc": per_site}}
        for g in ("knn", "linear", "finetune"):
            r[g] = {"accuracy": 0.8, "auc": 0.9}
        return r
    rows = report.aggregate({"a": [res(0, 0.6), res(1, None)], "b": [res(0, None)]})
    assert rows[0]["finetune_per_site_accuracy_mean"] == pytest.approx(0.6)
    assert "finetune_per_site_accuracy_mean" not in rows[1]
    table = report.table_md(rows, conftest.load_config("compare"), 10)
    assert "| b | 1 |" in table and "| 0.800 ± 0.000 | 0.900 ± 0.000 | - |" in table
