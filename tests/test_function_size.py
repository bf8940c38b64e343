"""Functions a reader can hold: none in the product code (library and stages) or in the scripts and
benchmarks (scripts/, bench/) is over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
LIMIT = 80


def long_functions(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_product_function_is_over_80_lines():
    paths = sorted((REPO / "src" / "drywall_qa").rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    assert long_functions(paths) == []


# Files under scripts/ or bench/ another change is rewriting, with the reason; empty when none is.
ALLOWED: dict[str, str] = {}


def test_no_script_or_benchmark_function_is_over_80_lines():
    paths = sorted((REPO / "scripts").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    assert long_functions([path for path in paths if path.name not in ALLOWED]) == []


def test_the_size_check_counts_a_function_with_its_nested_ones(tmp_path):
    fits = "def fits():\n" + "    x = 1\n" * (LIMIT - 1)  # LIMIT lines
    nested = "def too_long():\n    def inner():\n" + "        x = 1\n" * (LIMIT - 1)  # LIMIT + 1 lines
    (tmp_path / "a.py").write_text(fits + "\n\n" + nested)
    assert [entry.split(" ", 1)[1] for entry in long_functions([tmp_path / "a.py"])] == [
        f"too_long ({LIMIT + 1} lines)"
    ]
