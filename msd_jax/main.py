"""msd_jax command line: python -m msd_jax.main --config configs/demo.py --workdir DIR [--mode M]

--mode all (default) runs every party in turn; encrypt | site | server | eval run one party's part
on files in DIR, so each party can run on its own machine (see layout.py for the folders).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from msd_jax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory shared by the parties' folders.")
flags.DEFINE_enum("mode", "all", list(config_lib.MODES), "Which party's part to run.")
flags.DEFINE_list("sites", [], "encrypt / site modes: only these sites (default: every site).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    config = config_lib.validate(FLAGS.config)
    if config.multihost:
        import jax
        jax.distributed.initialize()
    from msd_jax import parties  # after the flags: importing jax-heavy modules is slow
    from msd_jax.layout import Workdir
    from msd_jax.data import sites as sites_lib
    wd = Workdir(FLAGS.workdir)
    os.makedirs(wd.root, exist_ok=True)
    mode = FLAGS.mode

    data = sites_lib.load(config) if mode in ("all", "encrypt", "eval") else None
    if data is not None and FLAGS.sites:
        unknown = set(FLAGS.sites) - {n for n, _ in data.sites}
        if unknown:
            raise app.UsageError(f"--sites: unknown {sorted(unknown)}; sites: {[n for n, _ in data.sites]}")
        data.sites = [(n, s) for n, s in data.sites if n in FLAGS.sites]
    if mode in ("all", "encrypt"):
        parties.run_encrypt(config, wd, data)
    if mode in ("all", "site"):
        if config.protocol == "model_upload":
            parties.run_sites(config, wd, FLAGS.sites or wd.uploaded_sites())
        elif mode == "site":
            print("protocol token_upload: sites only encrypt (--mode encrypt); nothing to train here")
    if mode in ("all", "server"):
        parties.run_server(config, wd)
    if mode in ("all", "eval"):
        report = parties.run_eval(config, wd, data)
        print(parties.results_table(report))
        print(wd.report)


if __name__ == "__main__":
    app.run(main)
