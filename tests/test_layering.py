"""The packages depend one way: w2w (math) <- registry (storage) <- ingest, server <- cli. Storage never knows
training or importing; a circle would make each layer untestable without the others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("w2w", "registry", "ingest", "server", "cli")
MAY_IMPORT = {
    "w2w": {"w2w"},
    "registry": {"w2w", "registry"},
    "ingest": {"w2w", "registry", "ingest"},
    "server": {"w2w", "registry", "server"},
    "cli": set(PACKAGES),
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages a module imports anywhere (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) - MAY_IMPORT[package])
        for f in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {f: w for f, w in wrong.items() if w}, f"{package}/ may import only {sorted(MAY_IMPORT[package])}"
