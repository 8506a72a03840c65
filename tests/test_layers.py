"""The package layers (docs/design.md §1): each package imports only from the layers below
it, and cloud/ and edge/ never import each other — checked on the source, every import
statement, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package → the project packages it must not import
FORBIDDEN = {
    "protocol": {"mole", "cloud", "edge", "simulation", "deploy"},
    "mole": {"cloud", "edge", "simulation", "deploy"},
    "cloud": {"edge", "simulation", "deploy"},
    "edge": {"cloud", "simulation", "deploy"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_the_layers_below_it(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
