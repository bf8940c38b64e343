"""dvc.yaml lists, for every stage, each `drywall_qa` module its entry point reaches: a change to
code a stage runs must re-run that stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "src" / "drywall_qa"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """`drywall_qa` modules imported anywhere in `path` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "drywall_qa":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("drywall_qa."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("drywall_qa."))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def reached_modules(entry: Path) -> set[str]:
    seen: set[str] = set()
    pending = imported_modules(entry)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending |= imported_modules(PACKAGE / f"{name}.py") - seen
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    entry = REPO / "stages" / f"{stage}.py"
    deps = set(STAGES[stage].get("deps", []))
    assert f"stages/{stage}.py" in deps
    missing = sorted(f"src/drywall_qa/{name}.py" for name in reached_modules(entry)
                     if f"src/drywall_qa/{name}.py" not in deps)
    assert missing == [], f"dvc.yaml stage {stage!r} lacks deps {missing}"


def test_the_import_walk_sees_imports_inside_functions():
    assert "inference" in imported_modules(PACKAGE / "evaluate.py")  # imported inside run_evaluation
    assert {"model", "inference", "data"} <= reached_modules(REPO / "stages" / "train.py")
