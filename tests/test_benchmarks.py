"""The PyTorch reference of benchmarks/ does the same work as msd_jax: the same forward on the same
weights (Flax parameters copied into the torch modules), the same MSD loss on the same logits, the
same step (loss, update, EMA, centre) on the same views; and `step_throughput.py --smoke` writes the
JSON the README's table is built from. Speed itself is never asserted."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from msd_jax.config import base_config  # noqa: E402
from msd_jax.models import vit  # noqa: E402
from msd_jax.msd import loss as loss_lib  # noqa: E402
from msd_jax.msd import step as step_lib  # noqa: E402
from msd_jax.msd import views as views_lib  # noqa: E402
from conftest import tiny_model
from np_reference import np_dino_loss  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_benchmark(name):
    """benchmarks/<name>.py as a module: the scripts import each other by file name (their folder is
    sys.path[0] when run), and the folder is no package, so it is loaded from its path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tr = load_benchmark("torch_reference")
stepbuild = load_benchmark("stepbuild")

N_TOKENS, DIM = 16, 32


def tiny_model_cfg(**kw):
    base = dict(embed_dim=DIM, depth=2, num_heads=4, out_dim=64, head_hidden_dim=48,
                head_bottleneck_dim=16, head_layers=3, image_size=16, patch_size=4)
    base.update(kw)
    return tiny_model(**base)


def perturbed_params(cfg, seed=0):
    """Seeded student parameters with every leaf moved off its init (norm scales != 1, biases !=
    0), so a leaf copied to the wrong place or not at all changes the output."""
    params = vit.init_student(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.device_get(jax.tree_util.tree_unflatten(treedef, leaves))


@pytest.mark.parametrize("head_layers", [3, 1])
def test_torch_forward_matches_flax(head_layers):
    cfg = tiny_model_cfg(head_layers=head_layers)
    params = perturbed_params(cfg)
    tokens = np.random.default_rng(0).normal(size=(5, 11, DIM)).astype(np.float32)
    model = tr.load_flax_params(tr.Student.from_vit_config(cfg), params).eval()
    with torch.no_grad():
        t_feat = model.features(torch.from_numpy(tokens)).numpy()
        t_logits = model(torch.from_numpy(tokens)).numpy()
    j_feat = np.asarray(vit.encode_cls(cfg, params["body"], tokens))
    j_logits = np.asarray(vit.Student(cfg).apply({"params": params}, tokens))[0]
    assert np.abs(j_feat).max() > 0.1 and np.abs(j_logits).std() > 1e-3  # not a trivial output
    np.testing.assert_allclose(t_feat, j_feat, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t_logits, j_logits, rtol=1e-4, atol=1e-4)
    # and the copy matters: a torch model with its own random weights disagrees
    with torch.no_grad():
        other = tr.Student.from_vit_config(cfg)(torch.from_numpy(tokens)).numpy()
    assert np.abs(other - j_logits).max() > 1e-2


def test_torch_loss_matches_project_loss():
    rng = np.random.default_rng(1)
    g, v, b, k = 2, 5, 6, 40
    s = rng.normal(size=(1, v, b, k)).astype(np.float32)
    t = rng.normal(size=(1, g, b, k)).astype(np.float32)
    c = rng.normal(size=(1, k)).astype(np.float32) * 0.1
    ours, _ = loss_lib.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), 0.1, 0.05)
    theirs, _ = tr.dino_loss(torch.from_numpy(s[0]), torch.from_numpy(t[0]), torch.from_numpy(c[0]),
                             0.1, 0.05)
    ref = np_dino_loss(s, t, c, 0.1, 0.05)
    np.testing.assert_allclose(float(theirs), ref, rtol=1e-5)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


def test_torch_views_are_distinct_token_subsets():
    tokens = torch.arange(3 * N_TOKENS, dtype=torch.float32).reshape(3, N_TOKENS, 1).expand(3, N_TOKENS, 4)
    gen = torch.Generator().manual_seed(0)
    idx = tr.sample_view_indices(gen, 3, N_TOKENS, 4, 6)
    views = tr.gather_views(tokens, idx)  # [4 * 3, 6, 4], view-major
    assert views.shape == (12, 6, 4)
    for vi in range(4):
        for bi in range(3):
            got = views[vi * 3 + bi, :, 0].numpy()
            assert len(set(got.tolist())) == 6  # distinct tokens
            np.testing.assert_array_equal(got, bi * N_TOKENS + idx[bi, vi].numpy())


def test_torch_step_matches_jax_step():
    """One step from the same parameters on the same views: same loss, centre, teacher and
    student parameters (the comparison of the benchmark is of equal work)."""
    c = base_config()
    c.model.update(dict(embed_dim=DIM, depth=1, num_heads=2, out_dim=64, head_hidden_dim=32,
                        head_bottleneck_dim=16, image_size=16, patch_size=4))
    c.msd.update(dict(num_global=2, ratio_global=0.5, num_local=3, ratio_local=0.25,
                      teacher_temp=0.05, warmup_teacher_temp=0.05, momentum_teacher=0.9))
    c.optim.update(dict(lr=2.56e-2 * 32 / 8, warmup_frac=0.0, freeze_last_layer_epochs=0.0,
                        weight_decay=0.3, clip_grad=0.5))
    b = 8
    cfg = vit.ViTConfig.from_config(c.model)
    sc = step_lib.StepConfig.from_config(c, N_TOKENS, 100, 10, b)
    params = perturbed_params(cfg, seed=3)
    mesh = step_lib.make_mesh()
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, sc), mesh)
    state = step_lib.replicate(mesh, step_lib.init_state(params, 1, cfg.out_dim, sc))
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(b, N_TOKENS, DIM)).astype(np.float32)
    ids = np.arange(b, dtype=np.int32) * 7
    key = jax.random.key(5)
    new_state, metrics = fn(state, *step_lib.shard_batch(mesh, tokens, ids), key)
    g_views, l_views = views_lib.make_views(jax.random.fold_in(key, 0), jnp.asarray(tokens),
                                            jnp.asarray(ids), sc.num_global, sc.size_global,
                                            sc.num_local, sc.size_local)

    model = tr.load_flax_params(tr.Student.from_vit_config(cfg), params)
    step = tr.TorchMSDStep(model, num_global=sc.num_global, size_global=sc.size_global,
                           num_local=sc.num_local, size_local=sc.size_local, lr=sc.lr,
                           weight_decay=sc.weight_decay, momentum=sc.momentum_teacher,
                           student_temp=sc.student_temp, teacher_temp=sc.teacher_temp,
                           center_momentum=sc.center_momentum, clip_grad=sc.clip_grad)
    loss = step.step(None, torch.tensor(np.asarray(g_views)), torch.tensor(np.asarray(l_views)))
    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(step.center.numpy(), np.asarray(new_state.center)[0], rtol=1e-4, atol=1e-6)

    def torch_as_flax(module):
        return jax.device_get(_to_flax(module))

    want_p, want_e = jax.device_get(new_state.params), jax.device_get(new_state.ema_params)
    got_p, got_e = torch_as_flax(step.student), torch_as_flax(step.teacher)
    moved = jax.tree_util.tree_map(lambda a, b_: np.abs(a - b_).max(), want_p, params)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4  # every tensor took a real step
    # Adam's first step is lr * g / (|g| + eps), about +-lr whatever |g|: where a gradient is within
    # float noise of 0 its sign may differ between the frameworks. The key part of the qkv bias has
    # an exactly-zero gradient (softmax ignores a constant added to a row of logits), so it is
    # compared only within the bound. Elsewhere nearly every element is equal to float precision,
    # and none is further apart than the one step (2 lr; EMA: 2 lr (1 - m)).
    def close(got, want, bound):
        for path, a in jax.tree_util.tree_flatten_with_path(got)[0]:
            b_ = _at(want, path)
            err = np.abs(a - b_)
            assert err.max() <= bound, jax.tree_util.keystr(path)
            ok = err <= 1e-6 + 1e-5 * np.abs(b_)
            if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
                ok = np.concatenate([ok[:DIM], ok[2 * DIM:]])
            assert np.mean(ok) >= 0.97, (jax.tree_util.keystr(path), err.max())
    close(got_p, want_p, 2 * sc.lr)
    close(got_e, want_e, 2 * sc.lr * (1 - sc.momentum_teacher))


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _to_flax(model):
    """Inverse of tr.load_flax_params for the tests."""
    def n(t):
        return t.detach().numpy().copy()

    def dense(lin):
        return {"kernel": n(lin.weight).T, "bias": n(lin.bias)}

    def norm(ln):
        return {"scale": n(ln.weight), "bias": n(ln.bias)}

    body = {"cls_token": n(model.body.cls_token), "cls_pos_embed": n(model.body.cls_pos_embed),
            "norm": norm(model.body.norm)}
    for i, blk in enumerate(model.body.blocks):
        body[f"block{i}"] = {"norm1": norm(blk.norm1), "norm2": norm(blk.norm2),
                             "attn": {"qkv": dense(blk.attn.qkv), "proj": dense(blk.attn.proj)},
                             "mlp": {"fc1": dense(blk.mlp.fc1), "fc2": dense(blk.mlp.fc2)}}
    head = {f"mlp{i}": dense(lin) for i, lin in enumerate(model.head.mlp)}
    head["last_layer"] = n(model.head.last_layer).T
    return {"body": body, "heads_0": head}


def test_torch_no_decay_set_matches_project():
    cfg = tiny_model_cfg()
    params = vit.init_student(cfg, jax.random.key(0))
    flax_no_decay = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                        if not vit.is_decay_param(p))
    model = tr.Student.from_vit_config(cfg)
    torch_no_decay = sum(p.numel() for name, p in model.named_parameters() if not tr.is_decay_param(name))
    assert torch_no_decay == flax_no_decay
    assert tr.num_params(model) == vit.count_params(params)


def test_step_throughput_smoke_writes_json(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for field in ("images_per_s", "torch_images_per_s", "ratio_vs_torch", "peak_rss_mb",
                  "torch_peak_rss_mb", "compile_s", "device", "flops_per_step", "achieved_flops",
                  "student_views_per_s", "torch_student_views_per_s", "threads", "jax_version",
                  "torch_version", "config"):
        assert field in r, field
    assert r["images_per_s"] > 0 and r["torch_images_per_s"] > 0 and r["flops_per_step"] > 0
    assert r["peak_rss_mb"] > 0 and r["torch_peak_rss_mb"] > 0
    assert len(r["runs"]["jax"][0]["step_times_s"]) == 2
    assert "msd_jax" in proc.stdout and "PyTorch" in proc.stdout  # the table
    # both steps trained the same kind of model to a finite loss
    assert np.isfinite(r["runs"]["jax"][0]["loss"]) and np.isfinite(r["runs"]["torch"][0]["loss"])


def test_bench_step_is_the_configs_step_on_a_seeded_batch():
    """The benchmarks' step builder: the config's numbers for the given batch (DINO's lr scaling,
    views from the ratios over (32 / 8)^2 tokens of the smoke model), no warm-up or freeze in a
    steady step, the standard-normal batch of seed 0, a step that runs; and the shapes-only build
    compiles to the same program size."""
    c = stepbuild.load_config("demo", smoke=True)
    batch_before = c.train.batch_size
    bench = stepbuild.build_step(c, 4, dtype="float32", matmul_dtype="float32")
    sc = bench.step_config
    assert c.train.batch_size == batch_before  # the caller's config is left alone
    assert (bench.config.train.batch_size, bench.config.model.matmul_dtype) == (4, "float32")
    assert bench.model.num_patches == 16 and bench.batch == 4
    assert sc.size_global == round(16 * c.msd.ratio_global) and sc.num_global == c.msd.num_global
    assert sc.size_local == round(16 * c.msd.ratio_local) and sc.num_local == c.msd.num_local
    assert sc.lr == pytest.approx(c.optim.lr * 4 / 256)
    assert sc.warmup_steps == 0 and sc.freeze_last_layer_steps == 0
    want = np.random.default_rng(0).normal(size=(4, 16, 32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(bench.tokens), want)
    np.testing.assert_array_equal(np.asarray(bench.ids), np.arange(4))

    compiled = bench.compile()
    metrics = bench.run(compiled)
    assert int(bench.state.step) == 1 and np.isfinite(float(metrics["loss"]))

    c.optim.warmup_frac = 0.25
    assert stepbuild.resolve(c, 4, steady=False)[2].warmup_steps == 250  # of TOTAL_STEPS = 1000
    shapes = stepbuild.build_step(c, 4, dtype="float32", matmul_dtype="float32", abstract=True)
    assert isinstance(shapes.tokens, jax.ShapeDtypeStruct)
    flops = [_flops(x) for x in (compiled, shapes.compile())]
    assert flops[0] > 0 and flops[0] == flops[1]


def _flops(compiled):
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
