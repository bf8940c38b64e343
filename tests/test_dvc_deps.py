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


def module_file(name: str) -> Path | None:
    """`contracts.paths` -> src/drywall_qa/contracts/paths.py, `training` -> its `__init__.py`
    (None for a name that is no module, like an imported function)."""
    path = PACKAGE.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path) -> set[str]:
    """`drywall_qa` modules (dotted below the package) imported anywhere in `path`, also inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drywall_qa":
            package = node.module.removeprefix("drywall_qa").removeprefix(".")
            found.add(package)
            found.update(f"{package}.{alias.name}".lstrip(".") for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("drywall_qa.") for alias in node.names if alias.name.startswith("drywall_qa.")
            )
    parents = {".".join(name.split(".")[:depth]) for name in found for depth in range(1, name.count(".") + 1)}
    return {name for name in found | parents if module_file(name)}  # importing a.b runs package a first


def reached_modules(entry: Path) -> set[str]:
    seen: set[str] = set()
    pending = imported_modules(entry)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending |= imported_modules(module_file(name)) - seen
    return seen


def covered(path: str, deps: set[str]) -> bool:
    """A dep names the file itself or a folder above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    entry = REPO / "stages" / f"{stage}.py"
    deps = set(STAGES[stage].get("deps", []))
    assert f"stages/{stage}.py" in deps
    files = (module_file(name).relative_to(REPO).as_posix() for name in reached_modules(entry))
    missing = sorted(path for path in files if not covered(path, deps))
    assert missing == [], f"dvc.yaml stage {stage!r} lacks deps {missing}"


def test_the_import_walk_sees_imports_inside_functions():
    assert "inference" in imported_modules(PACKAGE / "evaluate.py")  # imported inside run_evaluation
    assert {"model", "inference", "data"} <= reached_modules(REPO / "stages" / "train.py")
    assert "contracts.paths" in imported_modules(
        REPO / "stages" / "train.py"
    )  # `from drywall_qa.contracts import paths`


def test_a_folder_dep_covers_the_modules_below_it_only():
    assert covered("src/drywall_qa/contracts/masks.py", {"src/drywall_qa/contracts"})
    assert not covered("src/drywall_qa/contracts_extra.py", {"src/drywall_qa/contracts"})


def test_every_pipeline_path_is_declared_by_dvc_yaml_and_every_declared_output_is_a_contract_path():
    from drywall_qa.contracts import paths

    declared = set()
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                declared.add(entry if isinstance(entry, str) else next(iter(entry)))
    contract = {value for name, value in vars(paths).items() if name.isupper()}
    assert declared <= contract, f"dvc.yaml outputs not in contracts.paths: {sorted(declared - contract)}"
    not_outputs = {paths.ACTIVATION_CACHE, paths.TRAIN_WORK_DIR}  # work folders DVC must neither hash nor delete
    produced = contract - not_outputs - {paths.BEST_CHECKPOINT, paths.REPORT, paths.SOURCE_RECORD}
    assert produced <= declared, f"contracts.paths not declared as outputs in dvc.yaml: {sorted(produced - declared)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_imports_the_code_of_the_checkout_it_runs_in(stage):
    """Under `dvc exp run --temp` and queue workers the checkout is a copy in .dvc/tmp/exps/: its own
    src/ must come first, not the editable install's (the workspace, edits in progress included)."""
    assert STAGES[stage]["cmd"] == f"PYTHONPATH=src python stages/{stage}.py"


def dep_is_reached(dep: str, reached: set[str]) -> bool:
    """A `src/drywall_qa` dep (a module or a folder of them) holds a module the stage reaches."""
    return any(covered(path, {dep}) for path in reached)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_code_dependency_is_code_the_stage_runs(stage):
    """The other direction: a declared module the stage never imports would re-run it for nothing."""
    reached = {
        module_file(name).relative_to(REPO).as_posix() for name in reached_modules(REPO / "stages" / f"{stage}.py")
    }
    code_deps = [dep for dep in STAGES[stage].get("deps", []) if dep.startswith("src/drywall_qa/")]
    unused = sorted(dep for dep in code_deps if not dep_is_reached(dep, reached))
    assert unused == [], f"dvc.yaml stage {stage!r} depends on code it does not run: {unused}"


def names_in(path: Path) -> set[str]:
    """String constants, attribute names and annotated field names: how code names a params key."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_declared_param_is_named_by_code_the_stage_runs(stage):
    """A declared param the stage never reads would re-run it for nothing (renaming the registered
    model must not retrain). params.py is left out: the schema names every key without reading it."""
    declared = [entry for entry in STAGES[stage].get("params", []) if isinstance(entry, str)]
    modules = {name for name in reached_modules(REPO / "stages" / f"{stage}.py") if name != "params"}
    names = names_in(REPO / "stages" / f"{stage}.py").union(*(names_in(module_file(name)) for name in modules))
    unread = sorted(key for key in declared if key.split(".")[-1] not in names)
    assert unread == [], f"dvc.yaml stage {stage!r} declares params its code never names: {unread}"


def test_the_reverse_checks_can_fail():
    assert not dep_is_reached("src/drywall_qa/metrics.py", {"src/drywall_qa/model.py"})
    assert dep_is_reached("src/drywall_qa/training", {"src/drywall_qa/training/loop.py"})
    assert "registered_model" not in names_in(REPO / "stages" / "train.py")
