"""All command-line code lives in `captionlab.cli`; the library never imports it and has no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from captionlab.utils import REPO_ROOT

LIB = REPO_ROOT / "lib"
PKG = LIB / "captionlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """captionlab modules (and argparse) imported by a file; `top_level_only`: executed at import time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in found if m == "argparse" or m.startswith("captionlab")}


@pytest.mark.parametrize("name", [n for n in MODULES if not n.startswith("captionlab.cli")])
def test_library_module_neither_imports_cli_nor_parses_arguments(name: str) -> None:
    used = imports(MODULES[name])
    assert not {m for m in used if m.startswith("captionlab.cli")}, f"{MODULES[name]} imports the CLI"
    assert "argparse" not in used, f"{MODULES[name]}: argparse belongs in captionlab/cli/"


def test_no_import_cycles_at_import_time() -> None:
    graph = {name: {m for m in imports(p, top_level_only=True) if m in MODULES and m != name}
             for name, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_importing_train_loads_no_cli_module() -> None:
    code = "import captionlab.train, sys; assert not any(m.startswith('captionlab.cli') for m in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_lists_every_command_without_heavy_imports() -> None:
    code = ("import sys; from captionlab.cli import build_parser; p = build_parser(); "
            "cmds = p._subparsers._group_actions[0].choices; print(' '.join(sorted(cmds))); "
            "assert 'torch' not in sys.modules, 'the parser imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["attention", "caption", "evaluate", "llava", "prompt-study", "report", "train",
                                   "workers", "world", "zeroshot"]
