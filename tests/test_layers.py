"""The layers of ../shared/DESIGN.md stay true as the code grows: imports run one way.

cli -> (command libraries: convert, inspection, demo) -> training -> sampling -> models -> wan -> io,
and lora -> wan -> io; sampling and training may use lora (LoRAs applied at load, adapters saved
as LoRA files); nothing imports cli; models never import sampling; io knows no model and no LoRA.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sftools"
BASE = {"errors", "devices", "__init__"}  # errors, device names and the version, usable everywhere
ALLOWED = {
    "io": {"io"},
    "wan": {"wan", "io"},
    "lora": {"lora", "wan", "io"},
    "models": {"models", "wan", "io"},
    "sampling": {"sampling", "models", "wan", "lora", "io"},
    "training": {"training", "sampling", "models", "wan", "lora", "io"},
    "commands": {"commands", "training", "sampling", "models", "wan", "lora", "io"},
    "cli": {"cli", "commands", "training", "sampling", "models", "wan", "lora", "io"},
}


def layer_of(module: str) -> str:
    """sftools.wan.keys -> wan; top-level modules (convert, inspection, demo) are command libraries."""
    parts = module.split(".")
    if parts[-1] == "__main__":  # `python -m sftools` is the command line
        return "cli"
    if module == "sftools" or (len(parts) == 2 and parts[1] in BASE):
        return "base"
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "commands"


def sftools_imports(path: pathlib.Path) -> set[str]:
    """Every sftools module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftools"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sftools"))
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts)


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_run_one_way(path):
    layer = layer_of(module_name(path))
    if layer == "base":
        assert all(layer_of(m) == "base" for m in sftools_imports(path))
        return
    for imported in sftools_imports(path):
        target = layer_of(imported)
        assert target == "base" or target in ALLOWED[layer], f"{module_name(path)} ({layer}) imports {imported} ({target})"


def test_no_module_is_named_like_a_standard_library_one():
    import sys

    clashes = [p for p in MODULES if p.stem in sys.stdlib_module_names]
    assert clashes == []


def test_the_layer_table_knows_every_package():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), packages - set(ALLOWED)
