"""Start the single round on a running Flower deployment (one SuperLink, one SuperNode per site):

    python -m msd_jax.protocols.flower.launch --config configs/demo.py --workdir W \\
        --num-sites 2 --superlink 127.0.0.1:8000 --insecure [--config.KEY=VALUE ...]

It writes a Flower app (W/.flower/app/pyproject.toml, whose components are this package's
ServerApp and ClientApp and whose run-config holds these arguments), submits it with `flwr run`,
waits until the run ends and exits 0 when the round completed, 1 with the ServerApp's error
otherwise (a site that dropped out, a file that failed verification). The SuperLink must run where
W is (the ServerApp writes W), with msd_jax importable there and at every SuperNode.
docs/hospitals.md, "The Flower way", gives the commands for every party."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

APP_NAME = "msd-jax-round"
PUBLISHER = "msd-jax"
FLWR_CLI = "from flwr.cli.app import app; app()"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def app_pyproject(run_config: dict) -> str:
    """The Flower app's pyproject.toml: this package's components and the round's run-config."""
    lines = ["[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
             'description = "MS-DINO single round: encrypted tokens (or site models) from every site"',
             'license = "Apache-2.0"', "dependencies = []", "",
             "[tool.flwr.app]", f'publisher = "{PUBLISHER}"', "",
             "[tool.flwr.app.components]",
             'serverapp = "msd_jax.protocols.flower.apps:server_app"',
             'clientapp = "msd_jax.protocols.flower.apps:client_app"', "",
             "[tool.flwr.app.config]"]
    for key, value in run_config.items():
        lines.append(f"{key} = {_toml_string(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def flower_home_config(superlink: str, insecure: bool, root_certificates: str) -> str:
    """A Flower CLI configuration with one SuperLink connection, `round`."""
    lines = ["[superlink]", 'default = "round"', "", "[superlink.round]",
             f"address = {_toml_string(superlink)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {_toml_string(os.path.abspath(root_certificates))}")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m msd_jax.protocols.flower.launch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the config file (path[:arg]), as for msd_jax.main")
    p.add_argument("--workdir", required=True, help="the server's work directory")
    p.add_argument("--num-sites", type=int, required=True, help="SuperNodes the round waits for")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's address (HOST:PORT)")
    p.add_argument("--insecure", action="store_true", help="no TLS (tests, one machine)")
    p.add_argument("--root-certificates", default="", help="CA certificate of the SuperLink's TLS certificate")
    p.add_argument("--upload", default="shards",
                   help="what sites send: shards (token upload), uploads (model upload), shards,uploads")
    p.add_argument("--chunk-mib", type=float, default=4.0, help="largest chunk of an upload per message")
    p.add_argument("--max-upload-mib", type=float, default=65536.0, help="largest upload a site may offer")
    p.add_argument("--site-timeout", type=float, default=24 * 3600.0,
                   help="seconds a site may take to encrypt (and train)")
    p.add_argument("--chunk-timeout", type=float, default=300.0, help="seconds a site may take per chunk")
    p.add_argument("--connect-timeout", type=float, default=600.0,
                   help="seconds to wait for --num-sites SuperNodes")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {bad}")
    return args, rest


def _flwr(args: list[str], home: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=home)
    return subprocess.run([sys.executable, "-c", FLWR_CLI, *args], capture_output=True, text=True, env=env)


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        raise RuntimeError(f"`flwr {what}` failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from None


def submit(app_dir: str, home: str, timeout: float) -> str:
    """`flwr run`, retried while the SuperLink is not reachable yet (up to `timeout` s); the run's id."""
    deadline = time.monotonic() + timeout
    while True:
        out = _json_out(_flwr(["run", app_dir, "round", "--format", "json"], home), "run")
        if out.get("success"):
            return str(out["run-id"])
        if "unavailable" not in str(out.get("error-message")) or time.monotonic() > deadline:
            raise RuntimeError(f"`flwr run` did not start the round: {out.get('error-message', out)}")
        time.sleep(1.0)


def wait(run_id: str, home: str, poll_s: float = 3.0) -> dict:
    """The run's final entry of `flwr list` (status finished:...); each poll starts the Flower CLI, so
    not too often."""
    while True:
        out = _json_out(_flwr(["list", "--run-id", run_id, "--format", "json"], home), "list")
        run = out["runs"][0]
        if run["status"].startswith("finished"):
            return run
        time.sleep(poll_s)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = os.path.abspath(args.workdir)
    config = args.config
    path, sep, arg = config.partition(":")
    if os.path.exists(path):  # the SuperLink's ServerApp may run in another folder
        config = os.path.abspath(path) + sep + arg
    run_config = {"config": config, "overrides": " ".join(overrides), "workdir": workdir,
                  "num-sites": args.num_sites, "upload": args.upload, "chunk-mib": args.chunk_mib,
                  "max-upload-mib": args.max_upload_mib, "site-timeout": args.site_timeout,
                  "chunk-timeout": args.chunk_timeout, "connect-timeout": args.connect_timeout}
    app_dir, home = os.path.join(workdir, ".flower", "app"), os.path.join(workdir, ".flower", "home")
    for folder, name, text in ((app_dir, "pyproject.toml", app_pyproject(run_config)),
                               (home, "config.toml", flower_home_config(args.superlink, args.insecure,
                                                                        args.root_certificates))):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    t0 = time.perf_counter()
    run_id = submit(app_dir, home, args.connect_timeout)
    print(f"[flower] run {run_id} started on {args.superlink}; waiting for it to finish", flush=True)
    run = wait(run_id, home)
    traffic = run.get("network-traffic", {})
    print(f"[flower] run {run_id}: {run['status']} after {time.perf_counter() - t0:.1f} s; "
          f"traffic in {traffic.get('inbound-bytes')} B, out {traffic.get('outbound-bytes')} B", flush=True)
    if run["status"] != "finished:completed":
        print(f"error: the round failed: {run.get('status-details') or run['status']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
