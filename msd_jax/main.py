"""msd_jax command line: python -m msd_jax.main --config configs/demo.py --workdir DIR [--mode M]

--mode all (default) runs every party in turn; setup | encrypt | site | server | eval run one
party's part on files in DIR, so each party can run on its own machine (see layout.py for the
folders): setup is the server's preparation of the round (head/, and initial/ for model upload).
A config with `job='compare'` (configs/compare.py) or `job='audit'` (configs/audit.py) runs the
comparison of every protocol and baseline, or the privacy audit, instead.
"""
import os
import sys

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
    return vit.ViTConfig.from_config(config.model), EncryptionMode.parse(config.encrypt.mode)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    config = config_lib.validate(FLAGS.config, FLAGS.mode)
    if config.multihost:
        import jax
        jax.distributed.initialize()
    from msd_jax import parties  # after the flags: importing jax-heavy modules is slow
    from msd_jax.layout import Workdir
    from msd_jax.data import sites as sites_lib
    wd = Workdir(FLAGS.workdir)
    os.makedirs(wd.root, exist_ok=True)
    mode = FLAGS.mode
    if config.job == "compare":
        from msd_jax.experiments.compare.command import run_compare
        run_compare(config, wd.root)
        return
    if config.job == "audit":
        from msd_jax.experiments.privacy import audit
        audit.run_audit(config, wd.root)
        return

    model, encrypt_mode = resolve(config)
    if mode == "setup":
        parties.run_setup(config, model, encrypt_mode, wd)
        return
    data = sites_lib.load(config) if mode in ("all", "encrypt", "eval") else None
    if data is not None and FLAGS.sites:
        unknown = set(FLAGS.sites) - {n for n, _ in data.sites}
        if unknown:
            raise app.UsageError(f"--sites: unknown {sorted(unknown)}; sites: {[n for n, _ in data.sites]}")
        data.sites = [(n, s) for n, s in data.sites if n in FLAGS.sites]
    if mode in ("all", "encrypt"):
        parties.run_encrypt(config, model, encrypt_mode, wd, data)
    if mode in ("all", "site"):
        if config.protocol == "model_upload":
            parties.run_sites(config, model, encrypt_mode, wd, FLAGS.sites or wd.uploaded_sites())
        elif mode == "site":
            print("protocol token_upload: sites only encrypt (--mode encrypt); nothing to train here")
    if mode in ("all", "server"):
        parties.run_server(config, model, encrypt_mode, wd)
    if mode in ("all", "eval"):
        report = parties.run_eval(config, model, encrypt_mode, wd, data)
        print(parties.results_table(report))
        print(wd.report)


def parse_flags(argv):
    """absl parsing, with a clear message for an override of a key the config does not have."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        name = str(msg).split("\n")[0].strip("\"'")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and name in a.split("=")[0][len("--config."):].split(".")]
        where = bad[0][2:] if bad else f"config.*.{name}"
        hint = str(msg).split("\n", 1)[1] if "\n" in str(msg) else ""
        sys.exit(f"error: {where}: unknown config key {name!r}. {hint} (every key: msd_jax/config.py)")
    except flags.Error as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
