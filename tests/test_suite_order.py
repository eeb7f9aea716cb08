"""The suite's own scheduling hints (conftest) name tests that exist."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import FIRST_IN_STAGE

TESTS = Path(__file__).resolve().parent


def test_first_in_stage_names_existing_tests() -> None:
    for name in FIRST_IN_STAGE:
        file, func = name.split("::")
        tree = ast.parse((TESTS / file).read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert func in names, f"conftest.FIRST_IN_STAGE: {name} is not a test of {file} (renamed?)"
