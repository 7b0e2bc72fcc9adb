"""Executes the Colab notebooks top to bottom at tiny size (nbclient, a python3 kernel of this
interpreter) and checks what they wrote: the pipeline notebook's report.json and reloaded backbone,
the features notebook's features (recomputed here from the backbone and the image files).

The notebooks read SIZE / WORKDIR / BACKBONE_DIR from MSD_JAX_NOTEBOOK_* environment variables in
their `parameters` cell; the kernel inherits this process's environment.
"""
import json
import os

import nbclient  # the test extras (setup.cfg) install nbclient, nbformat, ipykernel
import nbformat
import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
COLAB = os.path.join(REPO, "colab")
PIPELINE = os.path.join(COLAB, "msd_jax_tpu.ipynb")
FEATURES = os.path.join(COLAB, "msd_jax_features.ipynb")
KERNEL = "msd_jax_test_python3"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that starts this very interpreter (so the kernel sees the installed msd_jax),
    installed into a temporary prefix found through JUPYTER_PATH: nothing in the user's home."""
    from ipykernel import kernelspec

    prefix = tmp_path_factory.mktemp("jupyter")
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", os.path.join(str(prefix), "share", "jupyter"))
    mp.setenv("MSD_JAX_NOTEBOOK_SIZE", "tiny")
    mp.setenv("PYTHONWARNINGS", "ignore")
    # identical steps (two sites, the merge) compile once: a persistent cache shared by the kernels
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(prefix / "jax_cache"))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield mp
    mp.undo()


def _execute(path, cwd, env: pytest.MonkeyPatch, **variables):
    for k, v in variables.items():
        env.setenv(k, str(v))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


@pytest.mark.parametrize("path", [PIPELINE, FEATURES])
def test_notebook_is_stored_clean_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    with_outputs = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not with_outputs, f"{path}: code cells {with_outputs} hold outputs (store notebooks without outputs)"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path}: expected exactly one code cell tagged 'parameters', got {len(tagged)}"
    assert "SIZE" in tagged[0].source and "WORKDIR" in tagged[0].source
    assert "MSD_JAX_NOTEBOOK_SIZE" in tagged[0].source


@pytest.fixture(scope="module")
def pipeline_run(kernel_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("nb_pipeline")
    workdir = root / "run"
    nb = _execute(PIPELINE, root, kernel_env, MSD_JAX_NOTEBOOK_WORKDIR=workdir)
    return workdir, nb


def test_pipeline_notebook(pipeline_run):
    workdir, nb = pipeline_run
    report_path = workdir / "report.json"
    assert report_path.is_file(), f"{report_path}: the notebook wrote no report"
    report = json.loads(report_path.read_text())
    assert report["protocol"] == "model_upload"
    assert len(report["sites"]) == 2 and all(s["bytes_uploaded"] > 0 for s in report["sites"])
    for probe in ("knn", "linear"):
        for metric in ("accuracy", "auc"):
            v = report["eval"][probe][metric]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (probe, metric, v)
    assert report["model"]["image_size"] == 32  # tiny size, not the full demo
    for site in ("site0", "site1"):
        assert (workdir / "uploads" / site / "params.msgpack").is_file()
        assert (workdir / "shards" / site / "manifest.json").is_file()
    # the results table and the plots were shown inline
    text = _text_outputs(nb)
    assert "linear acc" in text and "model_upload" in text
    shown = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    pngs = sorted((workdir / "plots").glob("*.png"))
    assert pngs and len(shown) == len(pngs), (len(shown), pngs)


def test_pipeline_notebook_reloaded_backbone(pipeline_run):
    """The notebook's own check, and the same check redone here on the two backbone folders."""
    workdir, _ = pipeline_run
    check = json.loads((workdir / "reload_check.json").read_text())
    assert check["features_equal"] == {"cls": True, "avgpool": True, "cls_avgpool": True}
    from msd_jax.evaluation.features import extract_features
    from msd_jax.protocols import model_io
    from msd_jax.models import vit

    meta = json.loads((workdir / "backbone" / "backbone.json").read_text())
    cfg = vit.ViTConfig(**{k: v for k, v in meta["model"].items() if k in vit.ViTConfig.__dataclass_fields__})
    images = np.random.default_rng(0).uniform(size=(5, cfg.image_size, cfg.image_size, cfg.channels))
    feats = []
    for d in (workdir / "backbone", workdir / "release" / "backbone"):
        head, body, _ = model_io.load_backbone(str(d), cfg)
        feats.append(extract_features(head, body, cfg, images, mean=0.5, std=0.25, batch_size=8))
    for k in feats[0]:
        np.testing.assert_array_equal(feats[0][k], feats[1][k])
    assert feats[0]["cls"].shape == (5, cfg.embed_dim)


def test_features_notebook(pipeline_run, kernel_env, tmp_path):
    workdir, _ = pipeline_run
    backbone = workdir / "release" / "backbone"
    out = tmp_path / "features"
    _execute(FEATURES, tmp_path, kernel_env, MSD_JAX_NOTEBOOK_WORKDIR=out, MSD_JAX_BACKBONE_DIR=backbone)
    saved = np.load(out / "features.npz")
    names = list(saved["names"])
    files = sorted(p.name for p in (out / "images").iterdir())
    assert names == files and len(names) == 6, (names, files)

    from PIL import Image

    from msd_jax.evaluation.features import extract_features
    from msd_jax.protocols import model_io
    from msd_jax.models import vit

    meta = json.loads((backbone / "backbone.json").read_text())
    cfg = vit.ViTConfig(**{k: v for k, v in meta["model"].items() if k in vit.ViTConfig.__dataclass_fields__})
    d = cfg.embed_dim
    assert saved["cls"].shape == (6, d) and saved["avgpool"].shape == (6, d)
    assert saved["cls_avgpool"].shape == (6, 2 * d)
    # recomputed from the image files, independently of the notebook's loader
    images = np.stack([
        np.asarray(Image.open(out / "images" / n).convert("L").resize((cfg.image_size, cfg.image_size),
                                                                       Image.BILINEAR), np.float32)[..., None] / 255
        for n in names])
    head, body, _ = model_io.load_backbone(str(backbone), cfg)
    ref = extract_features(head, body, cfg, images, mean=meta.get("data_mean", 0.5),
                           std=meta.get("data_std", 0.25), batch_size=8)
    for k in ("cls", "avgpool", "cls_avgpool"):
        np.testing.assert_allclose(saved[k], ref[k], rtol=1e-5, atol=1e-5)
    assert (out / "attention.png").stat().st_size > 1000
