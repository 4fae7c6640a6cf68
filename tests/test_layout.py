"""The package's layers: every import in ``jtml/`` (lazy ones inside functions included) points down.

Run alone with ``pytest tests/test_layout.py`` (a second, no data or torch needed). CONTRIBUTING.md
describes the layers; a new package must be added to ``LAYERS`` in its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jtml"
# lowest first; a module may import from its own package and from packages of a lower layer
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_moved"),
    ("io",),
    ("geometry",),
    ("sim",),
    ("kinematics",),
    ("data",),
    ("metrics",),
    ("registration",),
    ("models",),
    ("callbacks",),
    ("runs", "deploy"),
    ("track",),
    ("cli",),
    ("api",),
]
LAYER = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}


def _package(module: str) -> str | None:
    """``jtml.data.pose`` → ``data``; the root package ``jtml`` → None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jtml" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``jtml`` import in a file, at any depth (lazy ones too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "jtml"][:1]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jtml"]
    return found


def _python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_layer():
    packages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _python_files()}
    packages -= {"__init__"}
    assert packages <= set(LAYER), f"packages without a layer: {sorted(packages - set(LAYER))}"


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    here = _package(_module_name(path))
    if here is None:  # jtml/__init__.py: the root may only use the lowest layer
        allowed = set(LAYERS[0])
    else:
        allowed = {pkg for pkg, layer in LAYER.items() if layer < LAYER[here]} | {here}
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if (pkg := _package(module)) is not None and pkg not in allowed
    ]
    assert not upward, f"{path.relative_to(PACKAGE.parent)} ({here}) imports from a layer above it: {upward}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees lazy imports inside functions (a test that cannot fail is a defect)."""
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    from jtml.cli.lightning import JTMLCLI\n    import jtml.models.pose\n")
    assert [m for _, m in _imports(f)] == ["jtml.cli.lightning", "jtml.models.pose"]
