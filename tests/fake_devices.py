"""Runs a test script on N fake CPU devices in a subprocess: XLA's device count is read when jax is
imported, so it cannot change inside the test process."""
import os
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_script(tmp_path, text: str, num_devices: int, *args, timeout: int = 600):
    """Writes `text` to a file and runs it as `python FILE TESTS_DIR *args` on `num_devices` CPU
    devices; fails the test with the script's output if it exits non-zero."""
    script = tmp_path / f"on_{num_devices}_devices.py"
    script.write_text(text)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    proc = subprocess.run([sys.executable, str(script), TESTS_DIR, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
