"""The parties' own commands, run as the file-copy flow runs them (`python -m msd_jax.main --mode
...`), in a child process: the Flower apps only move folders, so a round over Flower computes
exactly what the same commands compute by hand (byte for byte), and this package stays below the
command line in the import order."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys


class PartyFailed(RuntimeError):
    """A party's command exited with an error; the message carries the end of its output."""


def split_overrides(text: str) -> list[str]:
    """`--config.key=value` arguments from one string (shell quoting rules)."""
    args = shlex.split(text or "")
    bad = [a for a in args if not a.startswith("--config.")]
    if bad:
        raise ValueError(f"overrides: {bad[:3]} are not --config.KEY=VALUE arguments")
    return args


def run_main(config: str, workdir: str, mode: str, overrides: list[str], *, sites: list[str] = (),
             log=print) -> None:
    """`python -m msd_jax.main --config CONFIG --workdir WORKDIR --mode MODE OVERRIDES` with this
    interpreter; raises PartyFailed with the tail of its output when it fails."""
    args = [sys.executable, "-m", "msd_jax.main", "--config", config, f"--workdir={workdir}",
            f"--mode={mode}", *overrides]
    if sites:
        args.append(f"--sites={','.join(sites)}")
    log(f"running: {shlex.join(args[1:])}")
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
        raise PartyFailed(f"`msd_jax.main --mode {mode}` failed (exit {proc.returncode}):\n{tail}")
    for line in proc.stdout.splitlines():
        log(line)
