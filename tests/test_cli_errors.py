"""The command line's errors: a misspelt config key and bad input each end the command with one clean
line on stderr (`error: ...`, exit status 1), never a traceback nor absl's escaped key text.
Each command fails before any training, so these subprocesses take a few seconds."""
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
KEYS_HINT = "every key: msd_jax/config.py"


def command(tmp_path, *extra, config="configs/demo.py"):
    args = [sys.executable, "-m", "msd_jax.main", "--config", config, f"--workdir={tmp_path / 'w'}",
            *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def one_error_line(proc) -> str:
    assert proc.returncode == 1, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("--config.msd.num_globl=2",
     "config.msd.num_globl: unknown config key 'num_globl' (did you mean 'num_global'?)"),
    ("--config.protocl=model_upload",
     "config.protocl: unknown config key 'protocl' (did you mean 'protocol'?)"),
    ("--config.trian.batch_size=4",
     "config.trian.batch_size: unknown config key 'trian' (did you mean 'train'?)"),
    ("--config.train.batchsize=8",  # docs/troubleshooting.md's example
     "config.train.batchsize: unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ("--config.train.batch_size.x=3",
     "config.train.batch_size.x: unknown config key 'x' (config.train.batch_size is a value, not a section)"),
])
def test_a_misspelt_key_is_one_clean_line(tmp_path, override, expected):
    line = one_error_line(command(tmp_path, override, "--config.seed=1"))
    assert line == f"error: {expected}; {KEYS_HINT}"
    assert "\\" not in line


def test_the_troubleshooting_page_shows_the_real_message(tmp_path):
    line = one_error_line(command(tmp_path, "--config.train.batchsize=8"))
    with open(os.path.join(REPO, "docs", "troubleshooting.md")) as f:
        assert line in f.read()


def test_a_missing_image_folder_is_one_clean_line(tmp_path):
    missing = str(tmp_path / "nonexistent")
    line = one_error_line(command(tmp_path, "--config.data.name=folders", f"--config.data.site_dirs={missing}",
                                  f"--config.data.test_dir={missing}"))
    assert line.startswith("error: ") and missing in line


def test_a_bad_config_value_is_one_clean_line(tmp_path):
    line = one_error_line(command(tmp_path, "--config.eval.per_site_min_images=1"))
    assert line == ("error: config.eval.per_site_min_images: expected >= 2 (a probe needs two classes, so "
                    "two images at least), got 1")


def test_a_bad_comparison_value_is_one_clean_line(tmp_path):
    line = one_error_line(command(tmp_path, "--config.compare.seeds=0", config="configs/compare.py"))
    assert line == "error: config.compare.seeds: expected >= 1, got 0"
