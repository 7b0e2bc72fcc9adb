"""The comparison command (msd_jax/experiments/compare/, configs/compare.py): the budget split, the
aggregation, and every row end to end on tiny ImageFolder trees.

References are independent of the code under test: budgets recomputed from the config numbers and
the plan's own steps, hand-computed splits, numpy means, and file sizes read with os.stat.
"""
import copy
import json
import os

import numpy as np
import pytest

from msd_jax.data import sites as sites_lib
from msd_jax.experiments.compare import budget, command, report, settings
from msd_jax.experiments.compare import rows as compare_rows
from msd_jax.layout import Workdir
from msd_jax.training import train as train_lib
import conftest
from conftest import class_folder, mode_of, model_of

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def load_config(arg=None):
    return conftest.load_config("compare", arg)


def views_of(plan_row, V_pretrain, one_view=False):
    """Image-views recomputed from the plan's steps and batches."""
    v = 1 if one_view else V_pretrain
    return sum(v * plan_row["batch"][p] * s for p, s in plan_row["steps"].items())


# -- the budget ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["size", "equal"])
@pytest.mark.parametrize("sizes", [[475, 439, 1139, 106], [900, 20], [300] * 8])
def test_every_protocol_gets_the_same_image_views(split, sizes):
    c = settings.apply_quick(load_config())
    c.compare.site_split = split
    plan = budget.plan_budget(c, sizes, proxy_size=240)
    V = c.msd.num_global + c.msd.num_local
    target = V * min(c.train.batch_size, sum(sizes)) * c.compare.budget_steps
    assert plan["target_image_views"] == target
    for row in settings.ROWS:
        p = plan[row]
        if row == "no_pretraining":
            assert p["image_views"] == 0 and p["optimizer_steps"] == 0
            continue
        if row in ("finetune_only", "supervised_scratch"):
            # the fine-tuning budget: its steps and batch, one view per image
            assert p["optimizer_steps"] == c.compare.finetune_steps, row
            assert list(p["batch"].values()) == [min(c.eval.finetune_batch_size, sum(sizes))], row
            assert p["image_views"] == views_of(p, V, one_view=True), row
            continue
        got = views_of(p, V)
        assert got == p["image_views"], row
        assert p["optimizer_steps"] == sum(p["steps"].values())
        assert p["rounding"] == got - target
        # whole steps: at most half a step of every party off (plus the min-1-step floor)
        bound = sum(V * b for b in p["batch"].values())
        assert abs(got - target) <= bound, (row, got, target)
        assert abs(got - target) / target < 0.05, (row, got, target)
    assert budget.budget_is_fair(plan, tolerance=0.05)


def test_budget_exact_when_divisible():
    c = settings.apply_quick(load_config())
    c.msd.update(num_global=2, num_local=2)
    c.train.batch_size = 10
    c.compare.update(budget_steps=80, merge_frac=0.25, fedavg_rounds=4, site_split="equal")
    plan = budget.plan_budget(c, [100, 100, 100, 100], proxy_size=50)
    # 4 views x 10 images x 80 steps = 3200; merge 0.25 -> 20 steps; sites (3200 - 800) / 4 / 40 = 15
    assert plan["target_image_views"] == 3200
    assert plan["msd_model_upload"]["steps"] == {"site0": 15, "site1": 15, "site2": 15, "site3": 15,
                                                 "merge": 20}
    assert plan["local_only"]["steps"] == {f"site{i}": 20 for i in range(4)}
    assert plan["fedavg_msd"]["local_steps"] == [5] * 4 and plan["fedavg_msd"]["rounds"] == 4  # 3200/(4*4*40)
    # the labels-only rows: the fine-tuning steps, not the pretraining views
    assert plan["supervised_scratch"]["steps"] == {"server": c.compare.finetune_steps} == {"server": 300}
    assert plan["finetune_only"]["steps"] == {"finetune": 300}
    # eval.finetune_batch_size 64 of the 400 pooled images, not train.batch_size 10
    assert plan["supervised_scratch"]["batch"] == {"server": 64}
    assert plan["finetune_only"]["batch"] == {"finetune": 64}
    for row in settings.ROWS:
        if row not in budget.LABELS_ONLY:
            assert plan[row]["image_views"] == 3200 and plan[row]["rounding"] == 0, row


def test_budget_size_split_hand_computed():
    c = settings.apply_quick(load_config())
    c.msd.update(num_global=2, num_local=2)
    c.train.batch_size = 10
    c.compare.update(budget_steps=10, merge_frac=0.5, fedavg_rounds=5, site_split="size")
    plan = budget.plan_budget(c, [30, 10], proxy_size=20)
    # target 4 x 10 x 10 = 400; merge 0.5 x 400 / 40 = 5 steps; sites 200 split 3:1 -> 150 / 40 = 3.75
    # -> 4 steps and 50 / 40 = 1.25 -> 1 step; views 40 x (4 + 1 + 5) = 400
    assert plan["msd_model_upload"]["steps"] == {"site0": 4, "site1": 1, "merge": 5}
    assert plan["msd_model_upload"]["image_views"] == 400
    # local only: 300 / 40 = 7.5 -> 8 (round half to even), 100 / 40 = 2.5 -> 2
    assert plan["local_only"]["steps"] == {"site0": 8, "site1": 2}
    # FedAvg: 400 / (4 views x (10 + 10)) = 5 steps per site over 5 rounds: 1 local step each
    assert plan["fedavg_msd"]["local_steps"] == [1] * 5
    # 3 rounds: 5 steps -> 2, 2, 1
    c.compare.fedavg_rounds = 3
    assert budget.plan_budget(c, [30, 10], proxy_size=20)["fedavg_msd"]["local_steps"] == [2, 2, 1]


def test_small_site_uses_its_own_batch():
    c = settings.apply_quick(load_config())
    plan = budget.plan_budget(c, [500, 5], proxy_size=100)
    assert plan["fedavg_msd"]["batch"] == {"site0": c.train.batch_size, "site1": 5}


@pytest.mark.parametrize("field,value,match", [
    ("rows", "msd_token_upload,nope", "config.compare.rows"),
    ("site_split", "random", "config.compare.site_split"),
    ("merge_frac", 1.0, "config.compare.merge_frac"),
    ("fedavg_rounds", 0, "config.compare.fedavg_rounds"),
])
def test_bad_settings_are_named(field, value, match):
    c = load_config()
    c.compare[field] = value
    with pytest.raises(ValueError, match=match):
        settings.check_config(c)


def test_sweep_parsing():
    c = load_config()
    assert settings.parse_sweep("data.num_sites=2,4,8", c) == ("data.num_sites", [2, 4, 8])
    assert settings.parse_sweep("data.alpha=0.1,0.5,10", c) == ("data.alpha", [0.1, 0.5, 10.0])
    assert settings.parse_sweep("merge.data=proxy,uploaded", c) == ("merge.data", ["proxy", "uploaded"])
    with pytest.raises(ValueError, match="config.compare.sweep"):
        settings.parse_sweep("data.nope=1", c)
    with pytest.raises(ValueError, match="config.compare.sweep"):
        settings.parse_sweep("data.alpha", c)


def test_quick_settings_applied_only_in_quick_mode():
    c = load_config()
    full = settings.apply_quick(c)
    assert full.model.embed_dim == c.model.embed_dim
    c.quick = True
    q = settings.apply_quick(c)
    for section, values in c.quick_settings.items():
        for k, v in values.items():
            assert q[section][k] == v


def test_aggregate_mean_and_std():
    def res(seed, lin, up):
        r = {"seed": seed, "budget": {"how": "x"}, "bytes_up": up, "bytes_down": 0, "rounds": 1,
             "image_views": 10, "optimizer_steps": 2, "wall_s": 1.0, "eval_s": 1.0}
        for g in ("knn", "linear", "finetune"):
            r[g] = {"accuracy": lin, "auc": 1.0}
        return r
    rows = report.aggregate({"a": [res(0, 0.8, 100), res(1, 0.9, 300)]})
    assert rows[0]["name"] == "a" and rows[0]["seeds"] == [0, 1]
    assert rows[0]["linear_accuracy_mean"] == pytest.approx(0.85)
    assert rows[0]["linear_accuracy_std"] == pytest.approx(0.05)  # ddof=0: |0.8 - 0.85|
    assert rows[0]["bytes_up"] == pytest.approx(200)
    assert "finetune_per_site_accuracy_mean" not in rows[0]


# -- end to end ------------------------------------------------------------------------------------

PER_CLASS = 6


def dir_size(path):
    return sum(os.stat(os.path.join(r, f)).st_size for r, _, fs in os.walk(path) for f in fs)


def tiny_folders_config(root):
    """The tiny config on two hospitals' ImageFolder trees, a test and a proxy tree under `root`."""
    sites = [class_folder(root / "hospital_a", 1, PER_CLASS), class_folder(root / "hospital_b", 2, PER_CLASS)]
    c = load_config("tiny")
    c.data.update(name="folders", site_dirs=",".join(sites), test_dir=class_folder(root / "test", 9, PER_CLASS),
                  proxy_dir=class_folder(root / "proxy", 5, 4), cache_dir=str(root / "tfds"))
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_data")
    c = tiny_folders_config(root)
    # per-site fine-tuning (1 + sites fine-tunes per row) is left off to keep this test short;
    # the persistent compilation cache (in the tmp work directory) makes the repeated compiles cheap
    c.quick_settings.compare.finetune_per_site = False
    wd = str(root / "work")
    logs = []
    rows = command.run_compare(c, wd, log=logs.append)
    return c, wd, rows, logs


def test_every_row_runs_end_to_end(tiny_run):
    c, wd, rows, _ = tiny_run
    with open(os.path.join(wd, "comparison.json")) as f:
        out = json.load(f)
    names = [r["name"] for r in out["rows"]]
    assert names == list(settings.ROWS)
    assert os.path.getsize(os.path.join(wd, "comparison.png")) > 0
    md = open(os.path.join(wd, "comparison.md")).read()
    for name in settings.ROWS:
        assert f"| {name} |" in md
    for r in out["rows"]:
        for key in ("knn_accuracy_mean", "linear_accuracy_mean", "finetune_accuracy_mean",
                    "knn_auc_std", "bytes_up", "bytes_down", "rounds", "image_views", "wall_s"):
            assert key in r, (r["name"], key)
        assert 0.0 <= r["linear_accuracy_mean"] <= 1.0
    target = out["target_image_views"]
    by = {r["name"]: r for r in out["rows"]}
    for name in settings.ROWS:
        if name not in budget.LABELS_ONLY:
            assert abs(by[name]["image_views"] - target) <= 0.25 * target, name
    assert by["no_pretraining"]["image_views"] == 0 and by["no_pretraining"]["bytes_up"] == 0
    steps = c.quick_settings.compare.finetune_steps
    for name in ("finetune_only", "supervised_scratch"):
        assert by[name]["optimizer_steps"] == steps, name
    assert by["finetune_only"]["bytes_up"] == 0
    assert by["fedavg_msd"]["rounds"] == c.quick_settings.compare.fedavg_rounds
    assert by["msd_token_upload"]["rounds"] == by["msd_model_upload"]["rounds"] == 1
    assert by["local_only"]["bytes_up"] == 0
    assert "finetune_per_site_accuracy_mean" not in by["msd_token_upload"]
    assert "Per-site fine-tuning was off" in open(os.path.join(wd, "comparison.md")).read()


def _accuracy(probs, labels):  # independent of evaluation/metrics.py
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def test_paired_differences_of_the_headline_pairs(tiny_run):
    c, wd, _, _ = tiny_run
    with open(os.path.join(wd, "comparison.json")) as f:
        out = json.load(f)
    got = {(p["a"], p["b"], p["method"]): p for p in out["paired_differences"]}
    assert set(got) == {("msd_token_upload", "fedavg_msd", "linear"), ("msd_token_upload", "fedavg_msd", "finetune"),
                        ("msd_token_upload", "finetune_only", "finetune"),
                        ("msd_token_upload", "no_pretraining", "knn"), ("msd_token_upload", "no_pretraining", "linear"),
                        ("msd_token_upload", "supervised_scratch", "finetune")}
    preds = {row: np.load(os.path.join(wd, "runs", row, "seed0", "predictions.npz"))
             for row in ("msd_token_upload", "fedavg_msd", "finetune_only", "no_pretraining", "supervised_scratch")}
    by = {r["name"]: r for r in out["rows"]}
    for (a, b, method), p in got.items():
        labels = preds[a]["labels"]
        np.testing.assert_array_equal(labels, preds[b]["labels"])
        want = _accuracy(preds[a][method], labels) - _accuracy(preds[b][method], labels)
        assert p["accuracy"]["difference"] == pytest.approx(want, abs=1e-12)
        lo, hi = p["accuracy"]["ci"]
        assert lo <= p["accuracy"]["difference"] <= hi
        # the saved probabilities are the ones the table reports
        assert by[a][f"{method}_accuracy_mean"] == pytest.approx(_accuracy(preds[a][method], labels))
    assert "Paired differences" in open(os.path.join(wd, "comparison.md")).read()


def test_paired_differences_sign_and_pairs_on_hand_made_predictions(tmp_path):
    """a right on all 40 test images, b on the first 30: a - b = +0.25 exactly (hand-derived), and
    only the pairs whose rows and methods have predictions appear."""
    from msd_jax.experiments.compare.results import write_predictions, run_dir
    labels = np.array([0, 1] * 20)
    right = np.eye(2)[labels]
    b_probs = right.copy()
    b_probs[30:] = right[30:, ::-1]
    write_predictions(run_dir(str(tmp_path), "msd_token_upload", 0), {"linear": right, "finetune": right}, labels)
    write_predictions(run_dir(str(tmp_path), "fedavg_msd", 0), {"linear": b_probs}, labels)
    c = load_config("tiny")
    c.eval.bootstrap_resamples = 200
    out = report.paired_differences(c, str(tmp_path), ["msd_token_upload", "fedavg_msd", "finetune_only"], 1)
    assert [(p["a"], p["b"], p["method"]) for p in out] == [("msd_token_upload", "fedavg_msd", "linear")]
    assert out[0]["accuracy"]["difference"] == pytest.approx(0.25)
    lo, hi = out[0]["accuracy"]["ci"]
    assert 0.0 < lo <= 0.25 <= hi


def test_label_efficiency_rows_of_the_comparison(tiny_run):
    c, wd, _, _ = tiny_run
    with open(os.path.join(wd, "comparison.json")) as f:
        by = {r["name"]: r for r in json.load(f)["rows"]}
    q = c.quick_settings
    fractions = sorted(float(v) for v in q.eval.label_fractions.split(","))
    trained_at = [float(v) for v in q.compare.label_train_fractions.split(",")] + [1.0]
    # 2 sites x 2 classes x PER_CLASS labelled images; a fraction f takes round(f x 2 PER_CLASS) per class
    per_class = 2 * PER_CLASS
    want_methods = {"msd_token_upload": "finetune", "fedavg_msd": "finetune", "centralized_msd": "finetune",
                    "finetune_only": "finetune_only", "supervised_scratch": "supervised",
                    "no_pretraining": None, "local_only": None}
    for row, trained in want_methods.items():
        le = {(e["method"], e["fraction"]): e for e in by[row]["label_efficiency"]}
        probes = {"knn", "linear"} if row not in ("finetune_only", "supervised_scratch") else set()
        want = {(m, f) for m in probes for f in fractions} | ({(trained, f) for f in trained_at} if trained else set())
        assert set(le) == want, row
        for (m, f), e in le.items():
            assert e["num_labelled"] == 2 * min(per_class, max(round(f * per_class), q.eval.label_min_per_class
                                                                if "label_min_per_class" in q.eval else 2))
            assert 0.0 <= e["accuracy_ci95"][0] <= e["accuracy"] <= e["accuracy_ci95"][1] <= 1.0, (row, m, f)
        # with every label the curve ends at the row's own full-label numbers
        if probes:
            assert le[("linear", 1.0)]["accuracy"] == pytest.approx(by[row]["linear_accuracy_mean"])
        if trained:
            assert le[(trained, 1.0)]["accuracy"] == pytest.approx(by[row]["finetune_accuracy_mean"])
    assert os.path.getsize(os.path.join(wd, "label_efficiency.png")) > 0
    assert "Label efficiency" in open(os.path.join(wd, "comparison.md")).read()


def test_bytes_are_the_files_moved(tiny_run):
    _, wd, _, _ = tiny_run
    run = os.path.join(wd, "runs", "msd_token_upload", "seed0")
    with open(os.path.join(run, "result.json")) as f:
        r = json.load(f)
    shards = os.path.join(run, "shards")
    sites = sorted(d for d in os.listdir(shards) if not d.startswith("_") and not d.startswith("."))
    assert r["bytes_up"] == sum(dir_size(os.path.join(shards, s)) for s in sites) > 0
    head = sum(os.stat(os.path.join(run, "head", f)).st_size for f in ("head.msgpack", "head.json"))
    assert r["bytes_down"] == len(sites) * head
    # model upload: the uploaded models as written, plus head and initial model down
    run = os.path.join(wd, "runs", "msd_model_upload", "seed0")
    with open(os.path.join(run, "result.json")) as f:
        r = json.load(f)
    assert r["bytes_up"] == sum(dir_size(os.path.join(run, "uploads", s)) for s in sites)
    assert r["bytes_down"] == len(sites) * (head + dir_size(os.path.join(run, "initial")))
    # centralized: the raw uint8 image files
    run = os.path.join(wd, "runs", "centralized_msd", "seed0")
    with open(os.path.join(run, "result.json")) as f:
        r = json.load(f)
    assert r["bytes_up"] == dir_size(os.path.join(run, "raw_uploads")) > 0


def test_rerun_skips_finished_results(tiny_run):
    c, wd, rows, _ = tiny_run
    logs = []
    again = command.run_compare(c, wd, log=logs.append)
    assert sum("result exists, skipped" in m for m in logs) == len(settings.ROWS)
    assert again == rows


def test_report_only_uses_existing_results(tiny_run, tmp_path):
    import copy
    import shutil
    c, wd, rows, _ = tiny_run
    work = str(tmp_path / "work")
    shutil.copytree(wd, work)
    c = copy.deepcopy(c)
    c.compare.report_only = True
    c.quick_settings.compare.seeds = 2  # seed 1 was never run: it must not be trained here
    logs = []
    again = command.run_compare(c, work, log=logs.append)
    assert again == rows
    assert not os.path.isdir(os.path.join(work, "runs", "msd_token_upload", "seed1"))
    md = open(os.path.join(work, "comparison.md")).read()
    assert "msd_token_upload/seed1" in md and "report_only" in md


def test_planned_steps_reach_the_trainers_and_the_config_is_left_alone(tmp_path, monkeypatch):
    """Each party trains the steps its row's plan gives it (not the config's train.site_steps,
    train.num_steps or merge.num_steps), and running the rows changes nothing in the config."""
    c = settings.apply_quick(tiny_folders_config(tmp_path))
    data = sites_lib.load(c)
    before = copy.deepcopy(c.to_dict())
    real_train, seen = train_lib.train, []

    def recording_train(config, model, *, party, total_steps, **kw):
        seen.append((party, total_steps))
        return real_train(config, model, party=party, total_steps=total_steps, **kw)
    monkeypatch.setattr(train_lib, "train", recording_train)

    def run(row, steps):
        compare_rows.RUNNERS[row](c, model_of(c), mode_of(c), Workdir(str(tmp_path / row)), data,
                                  {"steps": steps}, lambda *_: None)
    run("msd_model_upload", {"hospital_a": 3, "hospital_b": 2, "merge": 4})
    run("msd_token_upload", {"server": 5})
    assert seen == [("hospital_a", 3), ("hospital_b", 2), ("server_merge", 4), ("server", 5)]
    with open(tmp_path / "msd_model_upload" / "uploads" / "hospital_b" / "model.json") as f:
        assert json.load(f)["steps"] == 2
    assert c.to_dict() == before


def test_finetune_only_fine_tunes_the_random_init_and_supervised_gets_the_finetune_budget(tmp_path, monkeypatch):
    """finetune_only runs the fine-tuning recipe from the random-init body (the one no_pretraining
    probes) for the plan's fine-tuning steps; supervised_scratch trains the same steps and batch."""
    c = settings.apply_quick(tiny_folders_config(tmp_path))
    data = sites_lib.load(c)
    plan = budget.plan_budget(c, [len(s) for _, s in data.sites], len(data.proxy), [n for n, _ in data.sites])
    assert plan["finetune_only"]["steps"] == {"finetune": c.compare.finetune_steps}
    assert plan["supervised_scratch"]["steps"] == {"server": c.compare.finetune_steps}
    seen = {}
    real_finetune = compare_rows.finetune

    def recording_finetune(config, model, head, body, train_set, test_set, *, steps, **kw):
        seen["finetune"] = (body, steps, len(train_set))
        return real_finetune(config, model, head, body, train_set, test_set, steps=steps, **kw)
    monkeypatch.setattr(compare_rows, "finetune", recording_finetune)
    real_supervised = compare_rows.supervised.train_supervised

    def recording_supervised(config, model, train_set, *, total_steps, **kw):
        seen["supervised"] = (total_steps, config.train.batch_size)
        return real_supervised(config, model, train_set, total_steps=total_steps, **kw)
    monkeypatch.setattr(compare_rows.supervised, "train_supervised", recording_supervised)
    model, mode = model_of(c), mode_of(c)
    backbones, traffic, extra = compare_rows.RUNNERS["finetune_only"](
        c, model, mode, Workdir(str(tmp_path / "ft")), data, plan["finetune_only"], lambda *_: None)
    body, steps, n = seen["finetune"]
    random_body = train_lib.init_student_params(c, model)["body"]
    for a, b in zip(jax_leaves(body), jax_leaves(random_body)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert steps == c.compare.finetune_steps and n == len(data.labelled_train)
    assert traffic == [] and np.shape(extra["own_finetune"]) == (len(data.test), 2)  # its test probabilities
    # the row's backbone is the fine-tuned body; per-site fine-tuning starts from the random init
    (_, tuned), = [(name, b) for name, _, b in backbones]
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
               for a, b in zip(jax_leaves(tuned), jax_leaves(random_body)))
    assert extra["finetune_start"][0][1] is body
    compare_rows.RUNNERS["supervised_scratch"](c, model, mode, Workdir(str(tmp_path / "sup")), data,
                                               plan["supervised_scratch"], lambda *_: None)
    assert seen["supervised"] == (c.compare.finetune_steps,
                                  min(c.eval.finetune_batch_size, len(data.labelled_train)))


def jax_leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_demo_mode_is_the_demo_model_and_recipe_for_one_seed():
    c = settings.apply_quick(load_config("demo"))
    demo = conftest.load_config("demo")
    for key in ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "out_dim", "matmul_dtype"):
        assert c.model[key] == demo.model[key], key
    assert (c.model.image_size, c.model.embed_dim, c.model.depth) == (64, 192, 4)
    assert c.compare.budget_steps == demo.train.num_steps == 600
    assert (c.optim.lr, c.msd.momentum_teacher, c.train.batch_size) == (demo.optim.lr, demo.msd.momentum_teacher,
                                                                        demo.train.batch_size)
    assert c.compare.seeds == 1 and not c.quick
    with pytest.raises(ValueError, match="unknown argument"):
        load_config("nope")
