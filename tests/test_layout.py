"""The package layout: every msd_jax import points down the data flow (msd_jax/__init__.py)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "msd_jax"
# Stage of each top-level package or module, in data-flow order.
STAGES = {
    "trust": 0, "layout": 0, "distributed": 0, "data": 1, "models": 2, "encryption": 3, "msd": 4, "training": 5, "protocols": 6,
    "evaluation": 7, "parties": 8, "experiments": 9, "config": 10, "main": 10, "export": 10,
}


def stage_of(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "msd_jax", module
    if len(parts) == 1:
        raise AssertionError("import of the msd_jax package itself")
    if parts[1] not in STAGES:
        raise AssertionError(f"msd_jax.{parts[1]} has no stage in tests/test_layout.py")
    return STAGES[parts[1]]


def imported_modules(path: pathlib.Path):
    """(line, module) of every msd_jax import in a file, function-local ones included."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("msd_jax"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("msd_jax"):
            if node.module == "msd_jax":  # from msd_jax import parties
                for alias in node.names:
                    yield node.lineno, f"msd_jax.{alias.name}"
            else:
                yield node.lineno, node.module


def modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_has_a_stage():
    for path in modules():
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        if name != "msd_jax":
            stage_of(name)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_data_flow(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    name = ".".join(p for p in rel.parts if p != "__init__")
    if name == "msd_jax":
        return
    own = stage_of(name)
    upward = [(line, m) for line, m in imported_modules(path) if stage_of(m) > own]
    assert not upward, f"{path}: imports from a later stage: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from msd_jax.experiments import compare\n")
    assert [m for _, m in imported_modules(bad)] == ["msd_jax.experiments"]
    assert stage_of("msd_jax.experiments.compare") > stage_of("msd_jax.training.loop")
