"""FedAvg-MSD (protocols/fedavg.py) and communication accounting (protocols/comm.py).

References are independent of the code under test: plain `train.train` runs, numpy float64 averages,
hand-computed numbers, and file sizes read with os.stat.
"""
import os

import jax
import numpy as np
import pytest

from msd_jax.encryption import encrypt, shards
from msd_jax.training import train
from msd_jax.protocols import comm, fedavg, model_io
from msd_jax.layout import Workdir
from conftest import mode_of, model_of, tiny_demo_config
from msd_jax.models import vit

T, D = 16, 16


def make_config():
    c = tiny_demo_config(embed_dim=D)
    c.msd.num_local = 0
    c.train.update(batch_size=4, log_every=100, checkpoint_every=100)
    return c


def make_workdir(root, config, site_sizes, seed=0):
    """A work directory with the head and float32 shards of random tokens for each site."""
    wd = Workdir(str(root))
    model_cfg = model_of(config)
    _, fp = encrypt.get_or_create_head(wd.head, model_cfg, train.party_key(config.seed, "head"))
    rng = np.random.default_rng(seed)
    for i, n in enumerate(site_sizes):
        shards.write_shards(wd.shards(f"site{i}"), f"site{i}", rng.normal(size=(n, T, D)).astype(np.float32),
                            dtype="float32", head_fingerprint=fp)
    return wd


def quiet(*_):
    pass


def assert_trees_close(a, b, atol, rtol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
    assert len(la) > 10
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(p))


# -- weighted averaging ----------------------------------------------------------------------------

def test_weighted_average_hand_computed():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": {"c": np.array(3.0, np.float32)}}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": {"c": np.array(-1.0, np.float32)}}
    # weights 1 and 3: w = (1*1 + 3*3) / 4 = 2.5, (1*2 + 3*6) / 4 = 5; c = (1*3 + 3*(-1)) / 4 = 0
    for weights in ([1, 3], [25, 75], [0.1, 0.3]):
        out = fedavg.weighted_average([a, b], weights)
        np.testing.assert_allclose(out["w"], [2.5, 5.0], rtol=1e-7)
        np.testing.assert_allclose(out["b"]["c"], 0.0, atol=1e-7)
        assert out["w"].dtype == np.float32
    # three models, one with weight 0: (2*1 + 0*3 + 1*7) / 3 = 3
    out = fedavg.weighted_average([{"x": np.float32(1)}, {"x": np.float32(3)}, {"x": np.float32(7)}],
                                  [2, 0, 1])
    np.testing.assert_allclose(out["x"], 3.0, rtol=1e-7)


@pytest.mark.parametrize("weights,match", [([1], "one weight per model"), ([1, -1], ">= 0"),
                                           ([0, 0], "positive sum"), ([1, float("nan")], "finite")])
def test_weighted_average_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg.weighted_average([{"x": np.float32(1)}, {"x": np.float32(2)}], weights)


def test_weighted_average_rejects_different_trees():
    with pytest.raises(ValueError, match="different parameter trees"):
        fedavg.weighted_average([{"x": np.float32(1)}, {"y": np.float32(2)}], [1, 1])


# -- FedAvg against plain training -----------------------------------------------------------------

E = 3


@pytest.fixture(scope="module")
def one_site(tmp_path_factory):
    config = make_config()
    wd = make_workdir(tmp_path_factory.mktemp("fedavg_one"), config, [10])
    out = fedavg.run_fedavg(config, model_of(config), mode_of(config), wd, rounds=1, local_steps=E,
                            keep_rounds=True, log=quiet)
    return config, wd, out


def test_one_site_one_round_is_plain_training(one_site, tmp_path):
    config, wd, out = one_site
    tokens, _ = shards.load_shards(wd.shards("site0"))
    model = model_of(config)
    ref = train.train(config, model, party="site0", tokens=tokens, init_params=train.init_student_params(config, model),
                      ckpt_dir=str(tmp_path / "ref"), total_steps=E, log=quiet)
    assert_trees_close(out["teacher"], ref.ema_params, atol=1e-6, rtol=1e-6)
    assert_trees_close(out["student"], ref.params, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(out["center"], np.asarray(ref.center), atol=1e-7)
    # and the global model did move away from the initial one
    init = train.init_student_params(config, model)
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(out["student"]), jax.tree_util.tree_leaves(init)))
    assert diff > 1e-5  # 10x the tolerance above
    assert out["optimizer_steps"] == E


def test_two_sites_one_round_is_weighted_average_of_plain_training(tmp_path):
    config = make_config()
    sizes = [8, 12]
    wd = make_workdir(tmp_path / "wd", config, sizes, seed=1)
    out = fedavg.run_fedavg(config, model_of(config), mode_of(config), wd, rounds=1, local_steps=E, log=quiet)
    refs = []
    for i in range(2):
        tokens, _ = shards.load_shards(wd.shards(f"site{i}"))
        refs.append(train.train(config, model_of(config), party=f"site{i}", tokens=tokens,
                                init_params=train.init_student_params(config, model_of(config)),
                                ckpt_dir=str(tmp_path / f"ref{i}"), total_steps=E, log=quiet))
    w = np.array(sizes, np.float64) / sum(sizes)
    expected = jax.tree_util.tree_map(lambda a, b: w[0] * np.asarray(a, np.float64) + w[1] * np.asarray(b, np.float64),
                                      refs[0].ema_params, refs[1].ema_params)
    assert_trees_close(out["teacher"], expected, atol=1e-6, rtol=1e-5)
    assert out["site_sizes"] == sizes


def test_resume_skips_finished_rounds(tmp_path):
    """A second call after a finished run trains nothing and returns the same global model."""
    config = make_config()
    wd = make_workdir(tmp_path / "wd", config, [8, 8])
    a = fedavg.run_fedavg(config, model_of(config), mode_of(config), wd, rounds=2, local_steps=2, log=quiet)
    logs = []
    b = fedavg.run_fedavg(config, model_of(config), mode_of(config), wd, rounds=2, local_steps=2,
                          log=logs.append)
    assert not any("training" in m for m in logs)
    assert_trees_close(a["teacher"], b["teacher"], atol=0)
    assert len(b["traffic"]) == len(a["traffic"]) == 2 * 2 * 2  # rounds x sites x (down, up)


# -- communication accounting ----------------------------------------------------------------------

def files_size(folder):
    return sum(os.stat(os.path.join(folder, f)).st_size for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))


def test_fedavg_bytes_are_file_sizes(one_site):
    config, wd, out = one_site
    gdir = os.path.join(wd.root, "fedavg", "round0000", "global")
    udir = os.path.join(wd.root, "fedavg", "round0000", "uploads", "site0")
    down = [t for t in out["traffic"] if t["direction"] == "down"]
    up = [t for t in out["traffic"] if t["direction"] == "up"]
    assert len(down) == len(up) == 1
    assert down[0]["bytes"] == files_size(gdir) > 0
    assert up[0]["bytes"] == files_size(udir) > 0
    # the model that travels holds student + teacher (float32) + centre: at least 2 x the student
    n_student = sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(out["student"]))
    assert up[0]["bytes"] > 2 * 4 * n_student
    rec = comm.fedavg_traffic(wd, out["traffic"])
    head = files_size(wd.head)
    tot = comm.totals(rec)
    assert tot["bytes_down"] == head + files_size(gdir)
    assert tot["bytes_up"] == files_size(udir)
    assert tot["rounds"] == 1


def test_token_and_model_upload_bytes_are_file_sizes(tmp_path):
    config = make_config()
    wd = make_workdir(tmp_path / "wd", config, [6, 9])
    head = files_size(wd.head)
    rec = comm.token_upload_traffic(wd)
    tot = comm.totals(rec)
    assert tot["bytes_up"] == files_size(wd.shards("site0")) + files_size(wd.shards("site1"))
    assert tot["bytes_down"] == 2 * head
    assert tot["per_site"]["site1"]["up"] == files_size(wd.shards("site1"))
    # float32 tokens: at least 4 bytes per value
    assert files_size(wd.shards("site1")) >= 9 * T * D * 4
    model_cfg = vit.ViTConfig.from_config(config.model)
    init = train.init_student_params(config, model_of(config))
    model_io.save_params(wd.initial, init, model_cfg)
    for s in ("site0", "site1"):
        model_io.save_params(wd.upload(s), init, model_cfg, site=s)
    tot = comm.totals(comm.model_upload_traffic(wd, "proxy"))
    assert tot["bytes_up"] == files_size(wd.upload("site0")) + files_size(wd.upload("site1"))
    assert tot["bytes_down"] == 2 * (head + files_size(wd.initial))
    tot_u = comm.totals(comm.model_upload_traffic(wd, "uploaded"))
    assert tot_u["bytes_up"] == tot["bytes_up"] + files_size(wd.shards("site0")) + files_size(wd.shards("site1"))


def test_raw_images_bytes(tmp_path):
    imgs = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    path = comm.write_raw_images(str(tmp_path), "a", imgs)
    back = np.load(path)
    assert back.dtype == np.uint8 and back.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(back, np.rint(imgs.astype(np.float64) * 255).astype(np.uint8))
    tot = comm.totals(comm.raw_upload_traffic(str(tmp_path), ["a"], labels=True, label_counts={"a": 5}))
    assert tot["bytes_up"] == os.stat(path).st_size + 5 * 4
    assert os.stat(path).st_size >= 5 * 8 * 8


def test_totals_hand_computed():
    rec = [{"round": 0, "site": "a", "direction": "down", "what": "x", "bytes": 10},
           {"round": 0, "site": "a", "direction": "up", "what": "x", "bytes": 7},
           {"round": 1, "site": "a", "direction": "up", "what": "x", "bytes": 5},
           {"round": 1, "site": "b", "direction": "down", "what": "x", "bytes": 3}]
    tot = comm.totals(rec)
    assert (tot["bytes_up"], tot["bytes_down"], tot["rounds"]) == (12, 13, 2)
    assert tot["per_site"] == {"a": {"up": 12, "down": 10}, "b": {"up": 0, "down": 3}}
    with pytest.raises(ValueError, match="direction"):
        comm.totals([{"round": 0, "site": "a", "direction": "sideways", "what": "x", "bytes": 1}])


def test_server_run_uses_the_model_and_mode_it_is_given(tmp_path, monkeypatch):
    """The command line builds the model config and parses the encryption mode once; a server run
    (token upload) builds neither again."""
    from msd_jax import parties
    from msd_jax.encryption.modes import EncryptionMode
    config = make_config()
    config.protocol = "token_upload"
    wd = make_workdir(tmp_path / "wd", config, [8])
    model, mode = model_of(config), mode_of(config)
    rebuilt = []
    real_from_config, real_parse = vit.ViTConfig.from_config.__func__, EncryptionMode.parse.__func__

    def counting_from_config(cls, *args, **kw):
        rebuilt.append("model")
        return real_from_config(cls, *args, **kw)

    def counting_parse(cls, *args, **kw):
        rebuilt.append("mode")
        return real_parse(cls, *args, **kw)
    monkeypatch.setattr(vit.ViTConfig, "from_config", classmethod(counting_from_config))
    monkeypatch.setattr(EncryptionMode, "parse", classmethod(counting_parse))
    parties.run_server(config, model, mode, wd, log=quiet, num_steps=1)
    assert os.path.isfile(os.path.join(wd.backbone, "backbone.json"))
    assert rebuilt == []
