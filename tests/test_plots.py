"""Tests for msd_jax.evaluation.plots (training curves, CLS attention maps) and the collapse monitor."""
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from msd_jax.evaluation import plots
from msd_jax.training import metrics, train
from msd_jax.models import vit
from conftest import mode_of, model_of, tiny_demo_config, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w > 0 and h > 0
    return w, h


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------
def write_jsonl(path, rows, extra=""):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(extra)


def test_read_metrics_keeps_last_value_per_step(tmp_path):
    rows = [{"party": "server", "step": s, "loss": 10.0 - s, "teacher_entropy": 3.0, "lr": 1e-3}
            for s in (2, 4, 6)]
    # A resumed run logs steps 4 and 6 again (after its checkpoint at step 2), with other values.
    rows += [{"party": "server", "step": s, "loss": 100.0 + s, "teacher_entropy": 2.0, "lr": 1e-3}
             for s in (4, 6, 8)]
    p = tmp_path / "server.jsonl"
    write_jsonl(p, rows, extra='{"party": "server", "st')  # a line cut by a killed run
    got = plots.read_metrics(str(p))
    assert [r["step"] for r in got] == [2, 4, 6, 8]
    assert [r["loss"] for r in got] == [8.0, 104.0, 106.0, 108.0]


def test_training_curves_writes_png(tmp_path):
    a = [{"party": "site0", "step": s, "loss": 5.0 / s, "teacher_entropy": 3.0 - 0.1 * s, "lr": 1e-3}
         for s in (1, 2, 3, 2, 3, 4)]  # repeated steps from a resume
    b = [{"party": "server_merge", "step": s, "loss": 1.0 / s, "teacher_entropy": 2.0, "lr": 1e-4,
          "collapse": {"kind": "uniform", "reason": "x"}} for s in (5, 10)]
    write_jsonl(tmp_path / "site0.jsonl", a)
    write_jsonl(tmp_path / "server_merge.jsonl", b)
    out = tmp_path / "plots" / "training_curves.png"
    ret = plots.training_curves({"site0": str(tmp_path / "site0.jsonl"),
                                 "server_merge": str(tmp_path / "server_merge.jsonl")}, str(out))
    assert ret == str(out)
    check_png(out)


# ---------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------
CFG = tiny_model(image_size=16, patch_size=4, channels=1, embed_dim=16, depth=1, num_heads=2,
                    out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)


def layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def numpy_cls_attention(head, body, images, mean, std):
    """Independent reference: head -> tokens (raster order) -> CLS -> LayerNorm -> qkv -> softmax."""
    x = (np.asarray(images, np.float64) - mean) / std
    b, p, g = len(x), CFG.patch_size, CFG.grid
    patches = np.stack([x[:, r * p:(r + 1) * p, c * p:(c + 1) * p, :].reshape(b, -1)
                        for r in range(g) for c in range(g)], axis=1)  # raster order
    h = {k: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v) for k, v in head.items()}
    bp = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), body)
    tokens = patches @ h["patch_embed"]["kernel"] + h["patch_embed"]["bias"] + h["pos_embed"]
    cls = np.broadcast_to(bp["cls_token"] + bp["cls_pos_embed"], (b, 1, CFG.embed_dim))
    z = np.concatenate([cls, tokens], axis=1)
    blk = bp["block0"]
    y = layer_norm(z, blk["norm1"]["scale"], blk["norm1"]["bias"])
    qkv = y @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]
    nh, hd = CFG.num_heads, CFG.embed_dim // CFG.num_heads
    qkv = qkv.reshape(b, -1, 3, nh, hd)
    q, k = qkv[:, :, 0], qkv[:, :, 1]                     # [b, n, h, hd]
    logits = np.einsum("bhd,bkhd->bhk", q[:, 0], k) / math.sqrt(hd)  # CLS query only
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    return w[:, :, 1:].mean(axis=1).reshape(b, g, g)


@pytest.fixture(scope="module")
def model():
    head = jax.device_get(vit.init_head(CFG, jax.random.key(1)))
    body = jax.device_get(vit.init_student(CFG, jax.random.key(2))["body"])
    # Sharpen the attention (random init attends almost uniformly), so the test can tell patches apart.
    body = jax.tree_util.tree_map(np.asarray, body)
    body["block0"]["attn"]["qkv"]["kernel"] = body["block0"]["attn"]["qkv"]["kernel"] * 40.0
    return head, body


def test_attention_maps_match_numpy_reference(model, tmp_path):
    head, body = model
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (10, 16, 16, 1)).astype(np.float32)
    images[:, 4:8, 8:12] = 1.0  # a bright patch at grid (1, 2)
    out = tmp_path / "attention.png"
    att = plots.attention_maps(head, body, CFG, images, str(out), mean=0.5, std=0.25, num=8)
    assert att.shape == (8, CFG.grid, CFG.grid)
    expected = numpy_cls_attention(head, body, images[:8], 0.5, 0.25)
    np.testing.assert_allclose(att, expected, atol=1e-5)
    # Not (close to) uniform: the reference check means something.
    assert np.abs(expected - 1 / CFG.num_patches).max() > 1e-3
    # Each head's CLS row sums to 1 over CLS + patches, so the patch share is <= 1.
    assert np.all(att.sum(axis=(1, 2)) <= 1 + 1e-6)
    check_png(out)


def test_attention_maps_fewer_images_than_num(model, tmp_path):
    head, body = model
    images = np.random.default_rng(1).uniform(0, 1, (3, 16, 16, 1)).astype(np.float32)
    att = plots.attention_maps(head, body, CFG, images, str(tmp_path / "a.png"), 0.5, 0.25)
    assert att.shape == (3, CFG.grid, CFG.grid)
    check_png(tmp_path / "a.png")


# ---------------------------------------------------------------------------------------------
# Collapse monitor
# ---------------------------------------------------------------------------------------------
def entropy(p):
    p = np.asarray(p, np.float64)
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum())


def test_collapse_check_flags_one_hot_and_uniform_only():
    k = 4096
    one_hot = np.zeros(k)
    one_hot[7] = 1.0
    flagged = train.collapse_check(entropy(one_hot), k, 0.1, 0.98)
    assert flagged is not None and flagged[0] == "one_hot"
    flagged = train.collapse_check(entropy(np.full(k, 1 / k)), k, 0.1, 0.98)
    assert flagged is not None and flagged[0] == "uniform" and "log(4096)" in flagged[1]
    # A healthy teacher: mass spread over ~50 prototypes.
    normal = np.zeros(k)
    normal[:50] = np.random.default_rng(0).dirichlet(np.ones(50))
    assert 0.1 < entropy(normal) < 0.98 * math.log(k)
    assert train.collapse_check(entropy(normal), k, 0.1, 0.98) is None
    assert train.collapse_check(float("nan"), k, 0.1, 0.98) is None


def test_read_collapse_warnings(tmp_path):
    rows = [{"party": "server", "step": 2, "teacher_entropy": 3.0},
            {"party": "server", "step": 4, "teacher_entropy": 0.01,
             "collapse": {"kind": "one_hot", "reason": "r"}},
            # resumed run: step 4 logged again, healthy this time; step 6 uniform
            {"party": "server", "step": 4, "teacher_entropy": 2.0},
            {"party": "server", "step": 6, "teacher_entropy": 8.3,
             "collapse": {"kind": "uniform", "reason": "r"}}]
    write_jsonl(tmp_path / "server.jsonl", rows)
    assert train.read_collapse_warnings(str(tmp_path / "server.jsonl")) == [
        {"party": "server", "step": 6, "teacher_entropy": 8.3, "kind": "uniform"}]


def test_train_records_collapse_warnings(tmp_path):
    """train.train flags logged steps after the teacher-temperature warm-up (thresholds forced so
    every entropy is 'one-hot'), in the progress line and in the metrics line."""
    c = tiny_demo_config()
    c.msd.num_local = 0
    c.msd.teacher_temp_warmup_frac = 0.5            # warm-up: steps 1-2 of 4 (indices 0, 1)
    c.train.update(batch_size=4, log_every=1, checkpoint_every=4, collapse_min_entropy=1e9)
    logs = []
    tokens = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    model_cfg = model_of(c)
    train.train(c, model_cfg, party="server", tokens=tokens, init_params=train.init_student_params(c, model_cfg),
                ckpt_dir=str(tmp_path / "ckpt"), metrics_path=str(tmp_path / "m.jsonl"),
                total_steps=4, log=logs.append)
    step_lines = [l for l in logs if " step " in l and "/4 loss" in l]
    assert len(step_lines) == 4
    assert ["COLLAPSE?" in l for l in step_lines] == [False, False, True, True]
    assert any("2 logged step(s)" in l for l in logs)
    warnings = train.read_collapse_warnings(str(tmp_path / "m.jsonl"))
    assert [(w["party"], w["step"], w["kind"]) for w in warnings] == [
        ("server", 3, "one_hot"), ("server", 4, "one_hot")]


def test_collapse_check_flags_few_effective_prototypes():
    k = 4096
    healthy = 3.0   # teacher entropy in nats, inside (0.1, 0.98 log k)
    flagged = train.collapse_check(healthy, k, 0.1, 0.98, effective_prototypes=1.3, min_prototypes=2.0)
    assert flagged is not None and flagged[0] == "prototypes" and "1.30 < 2" in flagged[1]
    assert train.collapse_check(healthy, k, 0.1, 0.98, effective_prototypes=40.0, min_prototypes=2.0) is None
    # without the metric (older metrics lines) or with the check off, nothing is flagged
    assert train.collapse_check(healthy, k, 0.1, 0.98) is None
    assert train.collapse_check(healthy, k, 0.1, 0.98, effective_prototypes=1.0, min_prototypes=1.0) is None
    assert train.collapse_check(healthy, k, 0.1, 0.98, effective_prototypes=float("nan"),
                                min_prototypes=2.0) is None
    # the entropy checks come first
    assert train.collapse_check(0.01, k, 0.1, 0.98, effective_prototypes=1.0, min_prototypes=2.0)[0] == "one_hot"


def test_train_flags_prototype_collapse(tmp_path):
    """With the entropy checks off and collapse_min_prototypes above any possible count, every
    logged step after the warm-up is flagged 'prototypes' in the log, the metrics and the warnings."""
    c = tiny_demo_config()
    c.msd.num_local = 0
    c.msd.teacher_temp_warmup_frac = 0.5
    c.train.update(batch_size=4, log_every=1, checkpoint_every=4, collapse_min_entropy=0.0,
                   collapse_max_entropy_frac=1.0, collapse_min_prototypes=33.0, tensorboard=False)
    logs = []
    tokens = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    model_cfg = model_of(c)
    train.train(c, model_cfg, party="server", tokens=tokens, init_params=train.init_student_params(c, model_cfg),
                ckpt_dir=str(tmp_path / "ckpt"), metrics_path=str(tmp_path / "m.jsonl"),
                tensorboard_dir=str(tmp_path / "tb"), total_steps=4, log=logs.append)
    step_lines = [l for l in logs if " step " in l and "/4 loss" in l]
    assert ["COLLAPSE? prototype collapse" in l for l in step_lines] == [False, False, True, True]
    rows = metrics.read_metrics(str(tmp_path / "m.jsonl"))
    assert all(1.0 <= r["effective_prototypes"] <= 32.0 + 1e-3 for r in rows)
    warnings = train.read_collapse_warnings(str(tmp_path / "m.jsonl"))
    assert [(w["step"], w["kind"], w["effective_prototypes"]) for w in warnings] == [
        (r["step"], "prototypes", r["effective_prototypes"]) for r in rows[2:]]
    assert not (tmp_path / "tb").exists()   # config.train.tensorboard=False writes no events


# ---------------------------------------------------------------------------------------------
# Accuracy per site (probes fitted on one site's labels, scored on the pooled test split)
# ---------------------------------------------------------------------------------------------
def test_site_accuracy_png(tmp_path):
    r = lambda a, b: {"knn": {"accuracy": a, "auc": 0.5}, "linear": {"accuracy": b, "auc": 0.5}}  # noqa: E731
    by_site = {"a": {"num_images": 6, **r(0.9, 0.8)}, "b": {"num_images": 4, **r(0.6, 0.6)},
               "c": {"num_images": 1, "knn": None, "linear": None, "skipped": "one class (no) among its 1 image"}}
    out = plots.site_accuracy(by_site, r(0.95, 0.9), r(0.5, 0.55), str(tmp_path / "p" / "s.png"), "cls")
    w_with, _ = check_png(out)
    w_without, _ = check_png(plots.site_accuracy(by_site, r(0.95, 0.9), None, str(tmp_path / "t.png")))
    assert w_with > w_without   # one more group of bars


def _eval_case(tmp_path):
    """Three sites (a: 6 images of both classes, b: 4 of class 0 only, c: 1 of class 1), a test split
    of 4 x class 0 + 2 x class 1, a tiny random backbone saved in the work directory; per-site probes
    need 6 images."""
    from msd_jax.config import base_config
    from msd_jax.data.sites import FederatedData
    from msd_jax.data.sources import ImageSet
    from msd_jax.protocols import model_io
    from msd_jax.layout import Workdir

    c = base_config()
    c.model.update(image_size=16, patch_size=4, channels=1, embed_dim=16, depth=1, num_heads=2,
                   out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)
    c.eval.update(features="cls", knn_k=1, linear_steps=30, batch_size=8, per_site_min_images=6, label_draws=2,
                  bootstrap_resamples=200)
    key = jax.random.key(0)
    rnd = lambda i, n: np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (n, 16, 16, 1)))  # noqa: E731

    def images(i, labels):
        labels = np.asarray(labels, np.int32)
        x = 0.15 * rnd(i, len(labels)) + 0.7 * labels[:, None, None, None]  # class 1 is brighter
        return ImageSet(x.astype(np.float32), labels, ("no", "yes"),
                        tuple(f"{i}_{j}" for j in range(len(labels))))

    data = FederatedData(sites=[("a", images(1, [0, 1, 0, 1, 0, 1])), ("b", images(2, [0, 0, 0, 0])),
                                ("c", images(4, [1]))],
                         test=images(3, [0, 0, 1, 0, 1, 0]), proxy=None)
    cfg = vit.ViTConfig.from_config(c.model)
    wd = Workdir(str(tmp_path))
    head = vit.init_head(cfg, jax.random.fold_in(key, 10))
    body = vit.init_student(cfg, jax.random.fold_in(key, 11))["body"]
    model_io.save_backbone(wd.backbone, head, body, cfg, protocol="token_upload", seed=0)
    return c, wd, data, cfg, head, body


def test_run_eval_by_site(tmp_path):
    from msd_jax import parties
    from msd_jax.evaluation.features import extract_features
    c, wd, data, cfg, head, body = _eval_case(tmp_path)
    logs = []
    report = parties.run_eval(c, model_of(c), mode_of(c), wd, data, log=logs.append)
    by_site = report["eval_by_site"]
    assert list(by_site) == ["a", "b", "c"]
    assert [by_site[s]["num_images"] for s in ("a", "b", "c")] == [6, 4, 1]
    # b knows one class, c has one image: no probes, and the reason instead of numbers
    need = "per-site probes need >= 2 classes and >= 6 images (config.eval.per_site_min_images)"
    assert by_site["b"] == {"num_images": 4, "knn": None, "linear": None,
                            "skipped": f"one class (no) among its 4 images; {need}"}
    assert by_site["c"] == {"num_images": 1, "knn": None, "linear": None,
                            "skipped": f"one class (yes) among its 1 image; {need}"}
    assert f"[eval] site 'c': no per-site probes: one class (yes) among its 1 image; {need}" in logs
    assert not [m for m in logs if "not written" in m or "not drawn" in m]  # every consumer took the nulls
    # site a meets the minimum: 1-nearest neighbour by cosine similarity, in float64
    kw = dict(mean=c.data.mean, std=c.data.std)
    fa = extract_features(head, body, cfg, data.sites[0][1].images, **kw)["cls"].astype(np.float64)
    ft = extract_features(head, body, cfg, data.test.images, **kw)["cls"].astype(np.float64)
    sim = (ft / np.linalg.norm(ft, axis=1, keepdims=True)) @ (fa / np.linalg.norm(fa, axis=1, keepdims=True)).T
    pred = data.sites[0][1].labels[sim.argmax(1)]
    assert by_site["a"]["knn"]["accuracy"] == pytest.approx(np.mean(pred == data.test.labels))
    assert 0.0 <= by_site["a"]["linear"]["accuracy"] <= 1.0
    with open(wd.report) as f:
        saved = json.load(f)["eval_by_site"]
    assert saved["b"]["num_images"] == 4 and saved["c"]["linear"] is None
    site_png = str(tmp_path / "plots" / "site_accuracy.png")
    assert site_png in report["plots"]
    check_png(site_png)
    table = parties.results_table(report)
    assert f"c (n=1): skipped: one class (yes) among its 1 image; {need}" in table
    assert f"a (n=6): kNN acc {by_site['a']['knn']['accuracy']:.4f}" in table
    # the accuracies also went to TensorBoard, for the probed site only
    from test_tensorboard import read_scalars
    scalars = read_scalars(wd.tensorboard("eval"))
    assert scalars["eval/cls/knn_accuracy"][0] == pytest.approx(report["eval"]["knn"]["accuracy"])
    assert scalars["eval_by_site_cls/a/linear_accuracy"][0] == pytest.approx(by_site["a"]["linear"]["accuracy"])
    assert not [k for k in scalars if k.startswith(("eval_by_site_cls/b/", "eval_by_site_cls/c/"))]
    assert "eval_random_init/cls/linear_auc" in scalars
    # every metric dict carries its 95% bootstrap intervals, and the table prints them
    for r in (report["eval"]["knn"], report["eval"]["linear"], report["baseline_random_init"]["linear"],
              by_site["a"]["knn"], by_site["a"]["linear"]):
        for metric in ("accuracy", "auc"):
            low, high = r[f"{metric}_ci95"]
            assert low <= r[metric] <= high
    acc = report["eval"]["linear"]
    assert (f"{acc['accuracy']:.3f} [{acc['accuracy_ci95'][0]:.3f}, {acc['accuracy_ci95'][1]:.3f}]"
            in table)
    # label efficiency: both backbones, both probes, every default fraction; the train split holds
    # 7 + 4 images, so every fraction below 1 takes the class minimum of 2 + 2
    block = saved_report(wd)["label_efficiency"]
    assert block["fractions"] == [0.01, 0.05, 0.1, 0.25, 1.0]
    assert {(r["backbone"], r["method"]) for r in block["rows"]} == {
        (b, m) for b in ("token_upload", "random init") for m in ("knn", "linear")}
    assert sorted({(r["fraction"], r["num_labelled"]) for r in block["rows"]}) == [
        (0.01, 4), (0.05, 4), (0.1, 4), (0.25, 4), (1.0, 11)]
    full = [r for r in block["rows"] if r["fraction"] == 1.0 and r["backbone"] == "token_upload"]
    assert {r["method"]: r["accuracy"] for r in full} == {
        m: pytest.approx(report["eval"][m]["accuracy"]) for m in ("knn", "linear")}
    assert "label efficiency (cls features" in table
    le_png = str(tmp_path / "plots" / "label_efficiency.png")
    assert le_png in report["plots"]
    check_png(le_png)


def saved_report(wd):
    with open(wd.report) as f:
        return json.load(f)


def test_run_eval_per_site_off(tmp_path):
    from msd_jax import parties
    c, wd, data, *_ = _eval_case(tmp_path)
    c.eval.update(per_site=False, random_init_baseline=False, label_fractions="")
    c.train.tensorboard = False
    report = parties.run_eval(c, model_of(c), mode_of(c), wd, data, log=lambda *_: None)
    assert "eval_by_site" not in report
    assert not any(p.endswith(("site_accuracy.png", "label_efficiency.png")) for p in report["plots"])
    assert "label_efficiency" not in report
    assert not os.path.exists(wd.tensorboard("eval"))
