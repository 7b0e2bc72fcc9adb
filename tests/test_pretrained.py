"""Starting from pretrained weights (model.init_from) and stochastic depth (model.drop_path_rate).

The timm-layout files are built here with torch from names and shapes written out by hand (timm's
VisionTransformer names, DINO's wrappers), independent of msd_jax/models/timm_layout.py; the
position-table resize is checked against torch.nn.functional.interpolate.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from msd_jax import export, trust
from msd_jax.encryption import encrypt
from msd_jax.encryption.modes import EncryptionMode
from msd_jax.layout import Workdir
from msd_jax.models import state_files, timm_layout, vit
from msd_jax.protocols import model_io, pretrained
from msd_jax import parties
from conftest import SMALL_MODEL, model_of, tiny_config, tiny_model

CFG = tiny_model(image_size=16, patch_size=4, channels=3, embed_dim=16, depth=2, num_heads=2,
                 mlp_ratio=2.0, pos_embed="random", out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8)


def timm_vit_state(depth=2, dim=16, hidden=32, chans=3, patch=4, grid=4, seed=0) -> dict:
    """A randomly initialised timm VisionTransformer(num_classes=0, class token, qkv bias) state
    dict, written from timm's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
             "patch_embed.proj.weight": r(dim, chans, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": r(dim), b + "norm1.bias": r(dim),
                      b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                      b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                      b + "norm2.weight": r(dim), b + "norm2.bias": r(dim),
                      b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
                      b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim)})
    state.update({"norm.weight": r(dim), "norm.bias": r(dim)})
    return state


def write_safetensors(path, state: dict) -> None:
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in state.items():
        data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def load(path, cfg=CFG):
    return timm_layout.from_timm(cfg, state_files.read_state_dict(str(path)), str(path))


def assert_bit_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        w = want[k].numpy() if isinstance(want[k], torch.Tensor) else np.asarray(want[k])
        assert got[k].dtype == np.float32 and got[k].shape == w.shape, k
        assert got[k].tobytes() == w.astype(np.float32).tobytes(), k


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
def test_timm_file_imports_and_exports_back_bit_for_bit(tmp_path, fmt):
    state = timm_vit_state()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    elif fmt == "safetensors":
        write_safetensors(path, state)
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    imported = load(path)
    assert imported.notes == [] and sorted(imported.head) == ["patch_embed", "pos_embed"]
    assert_bit_equal(timm_layout.to_timm(CFG, imported.head, imported.body), state)


def test_the_kernel_layout_matches_a_hand_mapping(tmp_path):
    """kernel[(py * p + px) * C + c, d] = weight[d, c, py, px]; linear kernels are weight.T."""
    state = timm_vit_state()
    torch.save(state, tmp_path / "vit.pth")
    imported = load(tmp_path / "vit.pth")
    w = state["patch_embed.proj.weight"].numpy()
    kernel = imported.head["patch_embed"]["kernel"]
    for d, c, py, px in [(0, 0, 0, 0), (3, 2, 1, 3), (15, 1, 3, 2)]:
        assert kernel[(py * 4 + px) * 3 + c, d] == w[d, c, py, px]
    np.testing.assert_array_equal(imported.body["block1"]["mlp"]["fc1"]["kernel"],
                                  state["blocks.1.mlp.fc1.weight"].numpy().T)
    np.testing.assert_array_equal(imported.body["cls_pos_embed"][0, 0], state["pos_embed"][0, 0].numpy())
    np.testing.assert_array_equal(imported.head["pos_embed"][0], state["pos_embed"][0, 1:].numpy())


def test_dino_checkpoint_wrappers_and_projection_head_are_handled(tmp_path):
    state = timm_vit_state()
    wrapped = {"teacher": {f"backbone.{k}": v for k, v in state.items()},
               "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()}}
    wrapped["teacher"]["head.mlp.0.weight"] = torch.zeros(8, 16)  # DINO's projection head
    wrapped["teacher"]["head.last_layer.weight_g"] = torch.ones(1, 8)
    torch.save(wrapped, tmp_path / "dino.pth")
    imported = load(tmp_path / "dino.pth")
    assert_bit_equal(timm_layout.to_timm(CFG, imported.head, imported.body), state)  # the teacher


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_backbone")
    key = jax.random.key(5)
    head = jax.device_get(vit.init_head(CFG, jax.random.fold_in(key, 0)))
    body = jax.device_get(vit.init_student(CFG, jax.random.fold_in(key, 1))["body"])
    bump = lambda t, k: jax.tree_util.tree_map(  # noqa: E731 (no zero biases or unit scales)
        lambda x: np.asarray(x + 0.1 * jax.random.normal(k, x.shape), np.float32), t)
    head, body = bump(head, jax.random.fold_in(key, 2)), bump(body, jax.random.fold_in(key, 3))
    model_io.save_backbone(str(root / "backbone"), head, body, CFG, protocol="token_upload", seed=0,
                           data_mean=0.5, data_std=0.25)
    return root, head, body


def assert_tree_bit_equal(got, want):
    g, w = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in g] == [p for p, _ in w]
    for (path, a), (_, b) in zip(g, w):
        assert np.asarray(a).tobytes() == np.asarray(b, np.float32).tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("fmt", ["npz", "torch", "folder"])
def test_export_then_import_round_trips_exactly(backbone, tmp_path, fmt):
    root, head, body = backbone
    if fmt == "folder":
        path = str(root)
    else:
        path = export.export(str(root), fmt, str(tmp_path / f"out.{'npz' if fmt == 'npz' else 'pt'}"))
    config = tiny_config(model=dict(CFG.to_dict(), init_from=path))
    model = model_of(config)
    assert_tree_bit_equal(pretrained.initial_student(config, model)["body"], body)
    assert_tree_bit_equal(pretrained.initial_head(config, model), head)


def test_import_then_export_of_the_backbone_is_the_same_file(backbone, tmp_path):
    root, _, _ = backbone
    first = export.export(str(root), "npz", str(tmp_path / "a.npz"))
    imported = load(first)
    with np.load(first) as z:
        want = {k: z[k] for k in z.files if k != "meta"}
    assert_bit_equal(timm_layout.to_timm(CFG, imported.head, imported.body), want)


@pytest.mark.parametrize("change, name", [
    (lambda s: s.update({"blocks.1.mlp.fc1.weight": torch.zeros(33, 16)}), "blocks.1.mlp.fc1.weight"),
    (lambda s: s.pop("blocks.0.attn.proj.bias"), "blocks.0.attn.proj.bias"),
    (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(16)}), "blocks.2.norm1.weight"),
    (lambda s: s.update({"cls_token": torch.zeros(1, 1, 24)}), "cls_token"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 18, 16)}), "pos_embed"),
    (lambda s: s.update({"patch_embed.proj.weight": torch.zeros(16, 2, 4, 4)}), "patch_embed.proj.weight"),
    (lambda s: s.update({"reg_token": torch.zeros(1, 4, 16)}), "reg_token"),
])
def test_a_file_that_does_not_fit_is_rejected_naming_the_tensor(tmp_path, change, name):
    state = timm_vit_state()
    change(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(trust.InputError) as e:
        load(path)
    assert f"'{name}'" in str(e.value) and str(path) in str(e.value)


def test_unreadable_files_get_clear_errors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\xff" * 4)
    (tmp_path / "w.ckpt").write_bytes(b"")
    torch.save({"args": torch.nn.Linear(2, 2)}, tmp_path / "full.pth")  # not weights only
    for name, words in [("w.safetensors", "too short"), ("w.ckpt", "unknown weights format"),
                        ("full.pth", "weights_only"), ("missing.pth", "not found")]:
        with pytest.raises(trust.InputError, match=words):
            state_files.read_state_dict(str(tmp_path / name))


def torch_resized(table: np.ndarray, grid: int, new: int) -> np.ndarray:
    x = torch.from_numpy(table.astype(np.float64)).reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(new, new), mode="bicubic", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(new * new, -1).numpy()


@pytest.mark.parametrize("grid, new", [(4, 7), (8, 4), (14, 8), (3, 3)])
def test_position_table_resize_matches_torch_bicubic(grid, new):
    table = np.random.default_rng(grid * 100 + new).normal(size=(grid * grid, 5)).astype(np.float32)
    np.testing.assert_allclose(timm_layout.resize_pos_table(table, new), torch_resized(table, grid, new),
                               rtol=0, atol=2e-6)


def test_rgb_patch_embedding_into_grayscale_sums_the_channels(tmp_path):
    state = timm_vit_state(chans=3)
    torch.save(state, tmp_path / "rgb.pth")
    gray = dict(CFG.to_dict(), channels=1)
    imported = load(tmp_path / "rgb.pth", tiny_model(**gray))
    w = state["patch_embed.proj.weight"].numpy().astype(np.float64).sum(axis=1)  # [D, p, p]
    np.testing.assert_allclose(imported.head["patch_embed"]["kernel"],
                               w.transpose(1, 2, 0).reshape(16, 16), rtol=0, atol=1e-6)
    assert any("3 to 1 input channel" in n for n in imported.notes)


def test_setup_with_init_from_writes_the_files_head_and_initial_student(tmp_path):
    """--mode setup's head and initial student for a 1-channel 16 px / patch 4 model from an RGB
    file on an 8 x 8 grid: channels summed, table resized as torch does, body as the file's."""
    d, hidden = SMALL_MODEL["embed_dim"], 4 * SMALL_MODEL["embed_dim"]
    state = timm_vit_state(depth=1, dim=d, hidden=hidden, chans=3, patch=4, grid=8, seed=3)
    torch.save({"teacher": state}, tmp_path / "dino.pth")
    config = tiny_config(model=dict(init_from=str(tmp_path / "dino.pth")))
    config.protocol = "model_upload"
    model, wd = model_of(config), Workdir(str(tmp_path / "wd"))
    logs = []
    parties.run_setup(config, model, EncryptionMode.from_config(config.encrypt), wd, log=logs.append)
    head, _ = encrypt.load_head(wd.head, model)
    w = state["patch_embed.proj.weight"].numpy().astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(head["patch_embed"]["kernel"], w.transpose(1, 2, 0).reshape(16, d), atol=1e-6)
    np.testing.assert_array_equal(head["patch_embed"]["bias"], state["patch_embed.proj.bias"].numpy())
    np.testing.assert_allclose(head["pos_embed"][0], torch_resized(state["pos_embed"][0, 1:].numpy(), 8, 4),
                               atol=2e-6)
    template = pretrained.initial_student(tiny_config(), model)
    initial, _ = model_io.load_params(wd.initial, template, model)
    blk = initial["body"]["block0"]
    np.testing.assert_array_equal(blk["attn"]["qkv"]["kernel"], state["blocks.0.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(initial["body"]["norm"]["scale"], state["norm.weight"].numpy())
    np.testing.assert_array_equal(initial["body"]["cls_pos_embed"][0, 0], state["pos_embed"][0, 0].numpy())
    assert any("resized from a 8x8 to a 4x4 grid" in line for line in logs)


def test_patch_size_mismatch_keeps_the_random_patch_embedding(tmp_path):
    state = timm_vit_state(patch=8, grid=2)
    torch.save(state, tmp_path / "p8.pth")
    imported = load(tmp_path / "p8.pth")
    assert sorted(imported.head) == ["pos_embed"]
    assert any("patch_embed not loaded" in n for n in imported.notes)


# --------------------------------------------------------------------------------------------
# Stochastic depth
# --------------------------------------------------------------------------------------------
DP_CFG = tiny_model(**dict(SMALL_MODEL, depth=3))


def body_out(rate, params, tokens, key=None):
    body = vit.Body(DP_CFG, rate)
    if key is None:
        return np.asarray(body.apply({"params": params}, tokens))
    return np.asarray(body.apply({"params": params}, tokens, deterministic=False,
                                 rngs={vit.DROP_PATH_RNG: key}))


@pytest.fixture(scope="module")
def dp_case():
    tokens = jax.random.normal(jax.random.key(1), (16, 5, DP_CFG.embed_dim))
    params = vit.Body(DP_CFG).init(jax.random.key(2), tokens)["params"]
    return params, tokens


def test_rate_zero_changes_nothing(dp_case):
    params, tokens = dp_case
    ref = body_out(0.0, params, tokens)
    np.testing.assert_array_equal(body_out(0.0, params, tokens, jax.random.key(3)), ref)


def test_training_outputs_vary_with_the_key_and_eval_is_unchanged(dp_case):
    params, tokens = dp_case
    ref = body_out(0.0, params, tokens)
    np.testing.assert_array_equal(body_out(0.5, params, tokens), ref)  # evaluation
    a, b = (body_out(0.5, params, tokens, jax.random.key(k)) for k in (3, 4))
    assert not np.allclose(a, ref) and not np.allclose(a, b)
    np.testing.assert_array_equal(body_out(0.5, params, tokens, jax.random.key(3)), a)


def test_rates_rise_linearly_over_the_blocks():
    assert vit.drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert vit.drop_path_rates(0.1, 1) == [0.0]


def test_drop_path_keeps_samples_scaled_by_one_over_keep_prob():
    x = jnp.full((20000, 3), 2.0)
    out = np.asarray(vit.drop_path(x, 0.25, jax.random.key(0)))
    kept = out[:, 0] != 0
    assert set(np.unique(out).tolist()) == {0.0, np.float32(2.0) / np.float32(0.75)}  # dropped, or x / keep_prob
    assert (out == out[:, :1]).all()  # one decision per sample
    # binomial(20000, 0.75): 4 standard deviations = 245 samples
    assert abs(kept.sum() - 15000) < 245
    assert abs(out.mean() - 2.0) < 4 * (2.0 / 0.75) * np.sqrt(0.75 * 0.25 / 20000)


def test_a_block_with_both_branches_dropped_is_the_identity():
    cfg = tiny_model(**SMALL_MODEL)
    x = jax.random.normal(jax.random.key(1), (8, 5, cfg.embed_dim))
    block = vit.Block(cfg.num_heads, cfg.mlp_ratio, drop_path=1.0 - 1e-7)
    params = block.init(jax.random.key(2), x)["params"]
    out = block.apply({"params": params}, x, False, False, rngs={vit.DROP_PATH_RNG: jax.random.key(3)})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    kept = vit.Block(cfg.num_heads, cfg.mlp_ratio, drop_path=0.0)
    assert not np.allclose(kept.apply({"params": params}, x), x)


def test_config_rejects_a_rate_outside_zero_one():
    from msd_jax import config as config_lib
    c = config_lib.base_config()
    c.model.drop_path_rate = 1.0
    with pytest.raises(ValueError, match="config.model.drop_path_rate"):
        config_lib.validate(c, mode="setup")


def test_init_from_a_folder_that_is_no_backbone_is_an_error(tmp_path):
    config = tiny_config(model=dict(init_from=str(tmp_path)))
    with pytest.raises(trust.InputError, match="not an msd_jax backbone"):
        pretrained.initial_student(config, model_of(config))
    assert os.path.isdir(tmp_path)


def test_msd_step_drops_paths_in_the_student_only():
    """Same state, batch and key: with drop_path_rate the student's loss changes and the teacher's
    statistics (never dropped) do not."""
    from msd_jax.msd import step as step_lib
    n = (SMALL_MODEL["image_size"] // SMALL_MODEL["patch_size"]) ** 2
    tokens = np.random.default_rng(0).normal(size=(4, n, SMALL_MODEL["embed_dim"])).astype(np.float32)
    ids = np.arange(4, dtype=np.int32)
    metrics = {}
    for rate in (0.0, 0.5):
        c = tiny_config(model=dict(drop_path_rate=rate, depth=2), msd=dict(num_local=0))
        cfg = model_of(c)
        sc = step_lib.StepConfig.from_config(c, n, 10, 10, 4)
        assert sc.drop_path_rate == rate
        params = jax.device_get(vit.init_student(cfg, jax.random.key(0)))
        fn = jax.jit(step_lib.make_train_step(cfg, sc))
        for k in (1,):
            state = step_lib.init_state(params, 1, cfg.out_dim, sc)
            metrics[rate, k] = jax.device_get(fn(state, tokens, ids, jax.random.key(k))[1])
    for k in (1,):
        assert metrics[0.5, k]["teacher_entropy"] == metrics[0.0, k]["teacher_entropy"]
        assert metrics[0.5, k]["loss"] != metrics[0.0, k]["loss"]


def test_safetensors_half_precision_tensors_read_exactly(tmp_path):
    values = np.array([[1.5, -2.0, 0.0], [3.0, -0.25, 96.0]], np.float32)  # exact in bf16 and f16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    f16 = values.astype("<f2").tobytes()
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                         "b": {"dtype": "F16", "shape": [2, 3], "data_offsets": [12, 24]}}).encode()
    path = tmp_path / "half.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bf16 + f16)
    got = state_files.read_state_dict(str(path))
    np.testing.assert_array_equal(got["a"], values)
    np.testing.assert_array_equal(got["b"].astype(np.float32), values)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bf16)  # 'b' runs past the end
    with pytest.raises(trust.InputError, match="tensor 'b'"):
        state_files.read_state_dict(str(bad))
