"""msd_jax command line: python -m msd_jax.main --config configs/demo.py --workdir DIR [--mode M]

--mode all (default) runs every party in turn; setup | encrypt | site | server | eval run one
party's part on files in DIR, so each party can run on its own machine (see layout.py for the
folders): setup is the server's preparation of the round (head/, and initial/ for model upload).
A config with `job='compare'` (configs/compare.py) or `job='audit'` (configs/audit.py) runs the
comparison of every protocol and baseline, or the privacy audit, instead.
"""
import difflib
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from msd_jax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory shared by the parties' folders.")
flags.DEFINE_enum("mode", "all", list(config_lib.MODES), "Which party's part to run.")
flags.DEFINE_list("sites", [], "encrypt / site modes: only these sites (default: every site).")
flags.mark_flags_as_required(["config", "workdir"])


def resolve(config):
    """(model, encryption mode) of a validated config, built once here and handed to every party."""
    from msd_jax.encryption.modes import EncryptionMode
    from msd_jax.models import vit
    return vit.ViTConfig.from_config(config.model), EncryptionMode.from_config(config.encrypt)


def _validated(config, mode: str):
    """`config` checked (config.validate, and the comparison's own keys for its job); ValueError
    names the key and what was expected."""
    config = config_lib.validate(config, mode)
    if config.job == "compare":
        from msd_jax.experiments.compare import settings  # noqa: PLC0415 (no jax in there)
        settings.check_config(settings.apply_quick(config))
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    try:
        config = _validated(FLAGS.config, FLAGS.mode)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # ml_collections reports a config file it could not load on first use
        sys.exit(f"error: --config: {' '.join(str(e).split())}")
    from msd_jax.trust import InputError
    # bad or untrusted input (a folder, a shard, a checkpoint) is the user's to fix, named in the
    # message: one line, not a traceback; anything else is a bug and keeps its traceback
    try:
        run(config, FLAGS.mode, FLAGS.workdir, FLAGS.sites)
    except InputError as e:
        sys.exit(f"error: {e}")


def run(config, mode: str, workdir: str, only_sites: list[str]) -> None:
    """The work of one command on a validated config: `mode`'s parties, or the config's job; with
    several processes (config.distributed, config.multihost), this process's share of it."""
    from msd_jax import distributed
    started = distributed.start(config)
    run_parties(config, mode, workdir, only_sites)
    if started:
        distributed.finish()


def run_parties(config, mode: str, workdir: str, only_sites: list[str]) -> None:
    """`mode`'s parties, or the config's job."""
    from msd_jax import distributed, parties  # after the flags: importing jax-heavy modules is slow
    from msd_jax.layout import Workdir
    from msd_jax.data import sites as sites_lib
    wd = Workdir(workdir)
    os.makedirs(wd.root, exist_ok=True)
    if config.job == "compare":
        from msd_jax.experiments.compare.command import run_compare
        run_compare(config, wd.root)
        return
    if config.job == "audit":
        from msd_jax.experiments.privacy import audit
        audit.run_audit(config, wd.root)
        return

    model, encrypt_mode = resolve(config)
    from msd_jax.encryption.modes import exposure
    if distributed.is_writer():
        print(exposure(encrypt_mode))
    if mode == "setup":
        parties.run_setup(config, model, encrypt_mode, wd)
        return
    data = sites_lib.load(config) if mode in ("all", "encrypt", "eval") else None
    if data is not None and only_sites:
        unknown = set(only_sites) - {n for n, _ in data.sites}
        if unknown:
            raise app.UsageError(f"--sites: unknown {sorted(unknown)}; sites: {[n for n, _ in data.sites]}")
        data.sites = [(n, s) for n, s in data.sites if n in only_sites]
    if mode in ("all", "encrypt"):
        parties.run_encrypt(config, model, encrypt_mode, wd, data)
    if mode in ("all", "site"):
        if config.protocol == "model_upload":
            parties.run_sites(config, model, encrypt_mode, wd, only_sites or wd.uploaded_sites())
        elif mode == "site":
            print("protocol token_upload: sites only encrypt (--mode encrypt); nothing to train here")
    if mode in ("all", "server"):
        parties.run_server(config, model, encrypt_mode, wd)
    if mode in ("all", "eval"):
        report = parties.run_eval(config, model, encrypt_mode, wd, data)
        print(parties.results_table(report))
        print(wd.report)


KEYS_HINT = "every key: msd_jax/config.py"


def _config_file_arg(argv) -> str | None:
    """The value of --config in `argv` ('FILE[:ARG]'), or None."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_keys(argv) -> list[str]:
    """The dotted keys of every --config.KEY override in `argv`, in order."""
    return [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]


def _unknown_key(config, key: str) -> str | None:
    """Why `key` ('section.field') is not a key of `config`, with the nearest name, or None."""
    node, path = config, "config"
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config.{key}: unknown config key {part!r} ({path} is a value, not a section)"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"config.{key}: unknown config key {part!r}{hint}"
        node, path = node[part], f"{path}.{part}"
    return None


def _unknown_key_message(argv, error: Exception) -> str:
    """One line naming the first --config.KEY override that the config file does not have, found by
    reading the config file again (absl's own message holds the key escaped three times over)."""
    arg = _config_file_arg(argv)
    try:
        config = FLAGS["config"].parser.parse(arg) if arg else None
    except Exception:  # noqa: BLE001 (the config file's own error is not the one to report here)
        config = None
    if config is not None:
        for key in _override_keys(argv):
            problem = _unknown_key(config, key)
            if problem:
                return f"{problem}; {KEYS_HINT}"
    while isinstance(error, (AttributeError, KeyError)) and error.args \
            and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = " ".join(str(error.args[0] if error.args else error).split())
    return f"config override: {text}; {KEYS_HINT}"


def parse_flags(argv):
    """absl parsing, with one clear line for an override of a key the config does not have."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"error: {_unknown_key_message(argv, e)}")
    except OSError as e:  # the config file cannot be read
        sys.exit(f"error: --config {_config_file_arg(argv)}: {' '.join(str(e).split())}")
    except flags.Error as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
