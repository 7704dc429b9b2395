"""The GPU suite (tests_gpu/) and the tools run only where a GPU or a long benchmark is at hand: every name
they import from this package must still exist, so that a renamed class is caught here and not first on a
lent GPU machine (where tests_gpu/test_gpu.py once failed to import a class renamed months before)."""

from __future__ import annotations

import ast
import importlib

import pytest

from conftest import REPO

FILES = sorted([*(REPO / "tests_gpu").glob("*.py"), *(REPO / "tools").glob("*.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_imported_package_names_exist(path):
    imported = [(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_prm")
                for alias in node.names]
    missing = []
    for module, name in imported:
        found = importlib.import_module(module)
        if not hasattr(found, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module}.{name}")
    assert not missing, missing
