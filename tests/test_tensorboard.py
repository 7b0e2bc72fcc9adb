"""TensorBoard events: read back with tensorboardX's protobuf classes (TFRecord framing parsed
here: 8-byte length, 4-byte crc, data, 4-byte crc) and compared with the metrics JSON lines."""
import glob
import os
import struct

import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from msd_jax.training import metrics, tensorboard, train
from msd_jax.layout import Workdir
from conftest import model_of, tiny_demo_config


def masked_crc(data):
    """TFRecord's masked CRC-32C: rotate right by 15, add 0xa282ead8."""
    x = crc32c(data) & 0xFFFFFFFF
    return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_scalars(logdir):
    """{tag: {step: value}} over every event file in `logdir` (later files win)."""
    out = {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no event file in {logdir}"
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            record = data[pos + 12:pos + 12 + length]
            (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert len(record) == length, f"{path}: truncated record"
            assert (header_crc, record_crc) == (masked_crc(header), masked_crc(record)), path
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
        assert pos == len(data)
    return out


def demo_config():
    c = tiny_demo_config()
    c.msd.num_local = 0
    c.train.update(batch_size=4, log_every=2, checkpoint_every=6)
    return c


def test_train_scalars_equal_metrics_lines(tmp_path):
    c = demo_config()
    wd = Workdir(str(tmp_path))
    tokens = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    model = model_of(c)
    train.train(c, model, party="server", tokens=tokens, init_params=train.init_student_params(c, model),
                ckpt_dir=wd.checkpoints("server"), metrics_path=wd.metrics("server"),
                tensorboard_dir=wd.tensorboard("server"), total_steps=6, log=lambda *_: None)
    assert wd.tensorboard("server") == os.path.join(str(tmp_path), "tensorboard", "server")
    scalars = read_scalars(wd.tensorboard("server"))
    rows = metrics.read_metrics(wd.metrics("server"))
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert set(scalars) == {f"train/{k}" for k in tensorboard.TRAIN_SCALARS}
    for name in tensorboard.TRAIN_SCALARS:
        got = scalars[f"train/{name}"]
        assert sorted(got) == [2, 4, 6], name
        for r in rows:   # events hold float32
            assert got[r["step"]] == pytest.approx(r[name], rel=1e-6, abs=1e-30), (name, r["step"])
    assert rows[0]["momentum"] != rows[-1]["momentum"]   # a schedule, not a constant


def test_eval_results_and_off_switch(tmp_path):
    results = {"cls": {"knn": {"accuracy": 0.75, "auc": 0.8}, "linear": {"accuracy": 0.5,
                                                                        "auc": float("nan")}}}
    with tensorboard.ScalarWriter(str(tmp_path / "eval")) as w:
        w.eval_results(results, "eval/")
    assert read_scalars(str(tmp_path / "eval")) == {
        "eval/cls/knn_accuracy": {0: 0.75}, "eval/cls/knn_auc": {0: pytest.approx(0.8)},
        "eval/cls/linear_accuracy": {0: 0.5}}   # nan is not written
    with tensorboard.ScalarWriter(None) as w:     # off: no folder, no error
        w.eval_results(results, "eval/")
