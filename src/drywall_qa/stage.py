"""The one way a DVC stage entry point runs: params read once, the stage's own keys handed to it, its
MLflow child run opened with them, and every error reported alike.

    def body(stage: Stage) -> str:
        with stage.tracked():
            ...
        return "split: cracks: train 700, val 150, test 150 images"   # printed on success

    if __name__ == "__main__":
        sys.exit(run_stage("split", body))

`params.yaml` is read and checked once (`drywall_qa.params`: YAML 1.2, as DVC reads it). The stage gets
exactly the keys that dvc.yaml declares for it (`params:`; `params.yaml:` alone means all), so what
the stage reads is what DVC tracks. With `cpu_numerics` among them, the CPU kernels are pinned before
the body runs, so a stage imports torch inside its body. Any `DrywallQAError` (a bad input or
parameter) ends the stage with one line `<stage>: <message>` on stderr and exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from drywall_qa.errors import DrywallQAError
from drywall_qa.params import ParamsError, load_params


@dataclass(frozen=True)
class Stage:
    name: str
    params: dict[str, Any]  # the keys dvc.yaml declares for this stage (nested as in params.yaml)
    all_params: dict[str, Any]  # all of params.yaml: logged once on the pipeline's parent run
    repo_root: Path  # the user's repo: DVC_ROOT under `dvc exp run --temp`, else the working folder
    run_ids: list[str] = field(default_factory=list)  # the MLflow runs `tracked` opened

    @contextlib.contextmanager
    def tracked(self, resume_run_id: str | None = None) -> Iterator[Any]:
        """This stage's MLflow child run under the pipeline's parent, with this stage's params."""
        from drywall_qa.tracking import stage_run

        with stage_run(
            self.name,
            params=self.params,
            all_params=self.all_params,
            experiment=self.all_params["mlflow"]["experiment"],
            resume_run_id=resume_run_id,
        ) as run:
            self.run_ids.append(run.info.run_id)
            yield run


def declared_params(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str] | None:
    """The params keys dvc.yaml lists for `stage` (dotted for nested keys); None when it takes them all."""
    dvc_yaml = Path(dvc_yaml)
    try:
        stages = YAML(typ="safe", pure=True).load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    except (OSError, KeyError, TypeError) as error:
        raise ParamsError(f"cannot read the stages of {dvc_yaml}: {error}") from None
    if stage not in stages:
        raise ParamsError(f"{dvc_yaml} has no stage {stage!r}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, Mapping) and set(entry) == {"params.yaml"} and not entry["params.yaml"]:
            return None
        elif isinstance(entry, Mapping) and set(entry) == {"params.yaml"}:
            keys += list(entry["params.yaml"])
        else:
            raise ParamsError(f"{dvc_yaml}: stage {stage!r} reads params from {entry}; only params.yaml is supported")
    return keys


def select_params(params: Mapping[str, Any], keys: list[str] | None) -> dict[str, Any]:
    """The sub-tree of `params` that `keys` (dotted, e.g. `train.epochs`) name; all of it for None."""
    if keys is None:
        return dict(params)
    selected: dict[str, Any] = {}
    for key in keys:
        source, target = params, selected
        *parents, leaf = key.split(".")
        for part in parents:
            source = source[part]
            target = target.setdefault(part, {})
        if leaf not in source:
            raise ParamsError(f"dvc.yaml declares param {key!r}, which params.yaml does not have")
        target[leaf] = source[leaf]
    return selected


def load_stage(name: str, params_path: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml") -> Stage:
    all_params = load_params(params_path)
    params = select_params(all_params, declared_params(name, dvc_yaml))
    if "cpu_numerics" in params:
        from drywall_qa.numerics import configure_cpu_numerics

        configure_cpu_numerics(params["cpu_numerics"])
    return Stage(name, params, all_params, Path(os.environ.get("DVC_ROOT") or Path.cwd()))


def run_stage(
    name: str,
    body: Callable[[Stage], str | None],
    params_path: str | Path = "params.yaml",
    dvc_yaml: str | Path = "dvc.yaml",
) -> int:
    """Run one stage: 0 on success (the body's summary printed), 1 with one line for a user error."""
    try:
        stage = load_stage(name, params_path, dvc_yaml)
        summary = body(stage)
    except DrywallQAError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    if summary:
        print(summary)
        if stage.run_ids:  # the stage run's description in the MLflow UI: what it did, in its own words
            from drywall_qa.tracking import describe_run

            describe_run(stage.run_ids[-1], summary)
    return 0
