"""Tests for msd_jax.export: the exported backbone gives the Flax CLS feature in three independent
forwards (numpy float64 from the npz, torch.nn.functional from the .pt, timm's VisionTransformer),
plus the CLI and its errors.

The tiny model has 3 channels (so a wrong (py, px, c) -> (c, py, px) reordering of the patch kernel
shows) and every parameter perturbed away from its init (so zero biases or unit LayerNorm scales
cannot hide a wrong mapping).
"""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msd_jax import export
from msd_jax.protocols import model_io
from msd_jax.models import vit
from conftest import tiny_model

CFG = tiny_model(image_size=16, patch_size=4, channels=3, embed_dim=16, depth=2, num_heads=2,
                    mlp_ratio=2.0, pos_embed="random", out_dim=32, head_hidden_dim=16,
                    head_bottleneck_dim=8)
MEAN, STD = 0.5, 0.25
TOL = 1e-4


def perturbed(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        np.asarray(x + 0.1 * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A work directory with backbone/, the params, and test images [B, H, W, C] in [0, 1]."""
    root = tmp_path_factory.mktemp("export")
    key = jax.random.key(3)
    head = perturbed(vit.init_head(CFG, jax.random.fold_in(key, 0)), jax.random.fold_in(key, 1))
    body = perturbed(vit.init_student(CFG, jax.random.fold_in(key, 2))["body"], jax.random.fold_in(key, 3))
    model_io.save_backbone(str(root / "backbone"), head, body, CFG, protocol="token_upload", seed=0,
                           data_mean=MEAN, data_std=STD)
    images = np.asarray(jax.random.uniform(jax.random.fold_in(key, 4), (3, 16, 16, 3)), np.float32)
    return root, head, body, images


@pytest.fixture(scope="module")
def flax_cls(backbone):
    _, head, body, images = backbone
    tokens = vit.PatchHead(CFG).apply({"params": head}, (images - MEAN) / STD)
    return np.asarray(vit.encode_cls(CFG, body, tokens), np.float64)


# --------------------------------------------------------------------------------------------
# Independent float64 numpy ViT forward over timm-named arrays (NCHW input).
# --------------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf)


def np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_vit_cls(sd, x_nchw, num_heads, depth):
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x_nchw, np.float64)
    b, c, h, w = x.shape
    wconv = sd["patch_embed.proj.weight"]                      # [D, C, p, p]
    d, p = wconv.shape[0], wconv.shape[2]
    patches = [x[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(b, c * p * p)
               for gy in range(h // p) for gx in range(w // p)]   # raster order, (c, py, px) rows
    tok = np.stack(patches, 1) @ wconv.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    x = np.concatenate([np.repeat(sd["cls_token"], b, 0), tok], 1) + sd["pos_embed"]
    hd = d // num_heads
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = np_layer_norm(x, g("norm1.weight"), g("norm1.bias"))
        qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, -1, 3, num_heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))   # [b, h, n, hd]
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        x = x + o @ g("attn.proj.weight").T + g("attn.proj.bias")
        y = np_layer_norm(x, g("norm2.weight"), g("norm2.bias"))
        y = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        y = 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
        x = x + y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    return np_layer_norm(x, sd["norm.weight"], sd["norm.bias"])[:, 0]


def nchw(images, meta):
    mean = np.asarray(meta["mean"], np.float32)
    std = np.asarray(meta["std"], np.float32)
    return ((images - mean) / std).transpose(0, 3, 1, 2)


def load_npz(path):
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return {k: z[k] for k in z.files if k != "meta"}, meta


def test_npz_numpy_forward_matches_flax(backbone, flax_cls, tmp_path):
    root, _, _, images = backbone
    path = export.export(str(root / "backbone"), "npz", str(tmp_path / "b.npz"))
    sd, meta = load_npz(path)
    assert sd["patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    assert sd["pos_embed"].shape == (1, 1 + CFG.num_patches, 16)
    assert sd["blocks.1.attn.qkv.weight"].shape == (48, 16)
    assert all(v.dtype == np.float32 for v in sd.values())
    assert meta["image_size"] == 16 and meta["patch_size"] == 4 and meta["channels"] == 3
    assert meta["mean"] == [MEAN] * 3 and meta["std"] == [STD] * 3
    assert meta["model"]["depth"] == 2 and "out_dim" not in meta["model"]
    got = np_vit_cls(sd, nchw(images, meta), CFG.num_heads, CFG.depth)
    assert np.abs(flax_cls).max() > 0.1
    np.testing.assert_allclose(got, flax_cls, atol=TOL, rtol=0)


def test_workdir_is_accepted_and_default_out(backbone):
    root, *_ = backbone
    path = export.export(str(root), "npz")
    assert path == str(root / "backbone" / export.DEFAULT_NAMES["npz"])
    assert os.path.isfile(path)


def torch_functional_cls(sd, x, num_heads, depth):
    """timm-free forward with torch.nn.functional over the exported state dict."""
    import torch
    import torch.nn.functional as F
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1])
    b, d = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], 1) + sd["pos_embed"]
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (d,), g("norm1.weight"), g("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, g("attn.qkv.weight"), g("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, -1, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        x = x + F.linear(o, g("attn.proj.weight"), g("attn.proj.bias"))
        y = F.layer_norm(x, (d,), g("norm2.weight"), g("norm2.bias"), eps=1e-6)
        y = F.gelu(F.linear(y, g("mlp.fc1.weight"), g("mlp.fc1.bias")))
        x = x + F.linear(y, g("mlp.fc2.weight"), g("mlp.fc2.bias"))
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


@pytest.fixture(scope="module")
def torch_export(backbone, tmp_path_factory):
    pytest.importorskip("torch", reason="torch is needed for --format torch")
    root, *_ = backbone
    return export.export(str(root / "backbone"), "torch", str(tmp_path_factory.mktemp("pt") / "b.pt"))


def test_torch_functional_forward_matches_flax(backbone, flax_cls, torch_export):
    import torch
    _, _, _, images = backbone
    sd = torch.load(torch_export, weights_only=True)
    with open(torch_export + ".json") as f:
        meta = json.load(f)
    assert set(sd) == set(load_npz(export.export(str(backbone[0]), "npz"))[0])
    with torch.no_grad():
        got = torch_functional_cls(sd, torch.from_numpy(nchw(images, meta)), CFG.num_heads, CFG.depth)
    np.testing.assert_allclose(got.double().numpy(), flax_cls, atol=TOL, rtol=0)


def test_timm_vision_transformer_strict_load_matches_flax(backbone, flax_cls, torch_export):
    pytest.importorskip("timm", reason="timm is not installed (it needs torchvision); the "
                                       "torch.nn.functional test checks the same layout")
    import torch
    from timm.models.vision_transformer import VisionTransformer
    _, _, _, images = backbone
    with open(torch_export + ".json") as f:
        meta = json.load(f)
    model = VisionTransformer(**meta["timm_kwargs"])
    model.load_state_dict(torch.load(torch_export, weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(nchw(images, meta)))
    assert got.shape == (3, CFG.embed_dim)
    np.testing.assert_allclose(got.double().numpy(), flax_cls, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# CLI and errors
# --------------------------------------------------------------------------------------------
def test_cli_main_writes_npz(backbone, tmp_path, capsys):
    root, *_ = backbone
    out = tmp_path / "cli.npz"
    assert export.main(["--checkpoint", str(root), "--format", "npz", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    sd, meta = load_npz(out)
    assert "norm.weight" in sd and meta["timm_kwargs"]["global_pool"] == "token"


def test_cli_wrong_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notabackbone").mkdir()
    proc = subprocess.run([sys.executable, "-m", "msd_jax.export", "--checkpoint",
                           str(tmp_path / "notabackbone"), "--format", "npz"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "notabackbone" in proc.stderr and "neither a backbone folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_folder_and_bad_format(tmp_path):
    with pytest.raises(export.ExportError, match="no such folder"):
        export.export(str(tmp_path / "missing"), "npz")
    with pytest.raises(export.ExportError, match="--format"):
        export.export(str(tmp_path), "onnx")


def test_backbone_json_errors(backbone, tmp_path):
    root, head, body, _ = backbone
    bad = tmp_path / "bb"
    model_io.save_backbone(str(bad), head, body, CFG, protocol="token_upload", seed=0)  # no mean/std
    with pytest.raises(export.ExportError, match=r"backbone.json: fields 'data_mean'/'data_std'.*--mean"):
        export.export(str(bad), "npz", str(tmp_path / "x.npz"))
    # the --mean/--std fallback works
    path = export.export(str(bad), "npz", str(tmp_path / "x.npz"), mean=MEAN, std=STD)
    assert load_npz(path)[1]["std"] == [STD] * 3
    meta = json.loads((bad / "backbone.json").read_text())
    meta["model"]["patch_size"] = 5
    (bad / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(export.ExportError, match=r"backbone.json: field 'model' is not a valid model.*"
                                                 r"patch_size"):
        export.export(str(bad), "npz", str(tmp_path / "y.npz"))
    (bad / "backbone.json").write_text("{}")
    with pytest.raises(export.ExportError, match="field 'model' missing"):
        export.export(str(bad), "npz", str(tmp_path / "y.npz"))


def test_secret_head_backbone_is_refused(backbone, tmp_path):
    _, head, body, _ = backbone
    model_io.save_backbone(str(tmp_path / "bb"), head, body, CFG, encrypt_mode="secret_head",
                           data_mean=MEAN, data_std=STD)
    with pytest.raises(export.ExportError, match="encrypt_mode 'secret_head' keeps the head secret"):
        export.export(str(tmp_path / "bb"), "npz", str(tmp_path / "x.npz"))
