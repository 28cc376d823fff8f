"""The package layering of docs/ARCHITECTURE.md, read off the import statements.

input_pipeline, models -> training -> evaluation -> serving: a package imports
only packages to its left (input_pipeline and models never each other), and
models/ never imports tensorflow (it runs on JAX).
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("input_pipeline", "models", "training", "evaluation", "serving")
ALLOWED = {
    "input_pipeline": set(),
    "models": set(),
    "training": {"input_pipeline", "models"},
    "evaluation": {"input_pipeline", "models", "training"},
    "serving": {"input_pipeline", "models", "training", "evaluation"},
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Top-level names of every module `path` imports (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_reads_nested_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os.path\nfrom a.b import c\n\ndef f():\n    import serving\n"
                      "    from . import sibling\n")
    assert imported_modules(source) == {"os", "a", "serving"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_or_sideways_imports(package):
    forbidden = set(PACKAGES) - ALLOWED[package] - {package}
    if package == "models":
        forbidden.add("tensorflow")
    offenders = {f"{path.relative_to(REPO)}: {sorted(imported_modules(path) & forbidden)}"
                 for path in sorted((REPO / package).rglob("*.py"))
                 if imported_modules(path) & forbidden}
    assert not offenders, offenders
