"""The benchmark scripts are not imported by the library, so nothing else notices when a name they
use from clipa moves or disappears: every `from clipa... import NAME` in benchmarks/ must resolve."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_clipa_name_a_benchmark_imports_exists(script):
    tree = ast.parse(script.read_text(encoding="utf-8"))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.split(".")[0] == "clipa"]
    for node in imports:
        module = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                f"{script.name}:{node.lineno}: {node.module} has no {alias.name}"


def test_the_check_sees_the_benchmarks():
    assert len(BENCHMARKS) >= 10
