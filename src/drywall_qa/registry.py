"""The registered model: after evaluation, the best checkpoint is logged as a pyfunc carrying the
val-chosen per-prompt thresholds, registered as a new version with its headline metrics, and marked
`champion` only when the regression gate passes against the committed baseline metrics.

So `models:/<name>@champion` is never a run that regressed, and every version says what it is:
description (data, weights, DVC experiment, headline scores), tags (metrics, thresholds, gate result).

With `onnx=True` (the `register` stage) the version also carries the checkpoint exported to ONNX
(`drywall_qa.onnx_export`, the same prompts and rules) as the pyfunc's `onnx` artifact: its ONNX
Runtime path, `drywall-qa predict --runtime onnx` and `drywall-qa export` read it from there. The tag
`onnx` says whether it is there, or why not (a checkpoint whose inference mode the export does not cover).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drywall_qa.contracts.atomic import write_json_atomic
from drywall_qa.contracts.mask_rule import describe_rule
from drywall_qa.contracts.naming import prompt_slug
from drywall_qa.contracts.thresholds import (
    THRESHOLDS_FILE,
    arms_key,
    boxed_from_eval_metrics,
    boxes_key,
    from_eval_metrics,
    write_thresholds,
)
from drywall_qa.gate import GateError, compare, gate

CHAMPION_ALIAS = "champion"
ONNX_FILE = "model.onnx"
REGISTERED_MODEL_DESCRIPTION = (
    "drywall-qa: text-prompted drywall segmentation (CLIPSeg). Input: a photo (base64) and a prompt such as "
    "`segment crack` or `segment taping area`; output: a {0, 255} mask at the photo's size, thresholded with the "
    "val-chosen rule of that prompt (`thresholds.json`). Each version is one pipeline execution: its description "
    "says which data and weights produced it and its test scores. `@champion` is the latest version that passed "
    "the regression gate; load it with `mlflow.pyfunc.load_model('models:/<name>@champion')`."
)
HEADLINE_KEYS = ("test.miou", "test.dice", "val.miou", "cross_prompt.test.pred_fg_fraction")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    model_uri: str
    thresholds: dict[str, float]
    gate_passed: bool
    gate_message: str
    champion: bool


def committed_metrics(metrics_file: str, revision: str = "HEAD", repo: str | Path = ".") -> dict[str, Any]:
    """`metrics_file` as committed at `revision` ({} when git or the file is not there: a first run)."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{revision}:{metrics_file}"], cwd=repo, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if shown.returncode != 0:
        return {}
    try:
        document = json.loads(shown.stdout)
    except json.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}


def gate_result(
    baseline: Mapping[str, Any], metrics: Mapping[str, Any], keys: Sequence[str], tolerance: float
) -> tuple[bool, str]:
    """(passed, message) of the regression gate; it fails when the gated metrics are absent."""
    try:
        checks = compare(dict(baseline), dict(metrics), keys, tolerance)
    except GateError as error:
        return False, str(error)
    if not any(check.new is not None for check in checks):
        return False, f"no gated metric ({list(keys)}) in this evaluation"
    code, message = gate(checks)
    return code == 0, message


def version_description(metrics: Mapping[str, Any], thresholds: Mapping[str, float], context: Mapping[str, str]) -> str:
    scores = ", ".join(
        f"{key} {metrics[key]:.4f}" for key in HEADLINE_KEYS if isinstance(metrics.get(key), int | float)
    )
    boxed = boxed_from_eval_metrics(metrics, list(thresholds))
    chosen = ", ".join(f"{prompt!r} {describe_rule(value, boxed.get(prompt))}" for prompt, value in thresholds.items())
    where = ", ".join(f"{key} {value}" for key, value in context.items() if value)
    return f"{scores}. Val-chosen thresholds: {chosen}. {where}."


def logged_model_name(client: Any, run: Any) -> str:
    """`clipseg-<pipeline run name>`: the logged model is named after the execution it came from
    (the stage's parent run), so the model list in the MLflow UI tells versions apart."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    run_name = client.get_run(parent_id).info.run_name if parent_id else run.info.run_name
    return "clipseg-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "").strip("-") or run.info.run_id)


def register_checkpoint(
    checkpoint_dir: str | Path,
    metrics: Mapping[str, Any],
    prompts: Sequence[str],
    registered_model_name: str,
    gate_keys: Sequence[str],
    gate_tolerance: float,
    baseline: Mapping[str, Any],
    context: Mapping[str, str],
    gated_metrics: Mapping[str, Any] | None = None,
    onnx: bool = False,
) -> Registration:
    """Log and register the checkpoint from the active MLflow run (see the module docstring).

    `metrics` (eval.json) give the thresholds, description and tags; the gate compares
    `gated_metrics` (default `metrics`) with `baseline`, the same file as committed. `onnx`: log
    the ONNX export beside the checkpoint.
    """
    import mlflow

    from drywall_qa.mlflow_model import log_pyfunc_model

    thresholds = from_eval_metrics(metrics, prompts)
    boxed = boxed_from_eval_metrics(metrics, prompts)
    client = mlflow.MlflowClient()
    name = logged_model_name(client, mlflow.active_run())
    with tempfile.TemporaryDirectory(prefix="drywall-qa-thresholds-") as scratch:
        thresholds_file = Path(scratch) / THRESHOLDS_FILE
        write_thresholds(thresholds_file, thresholds, boxed)
        onnx_file, onnx_tag = (
            exported_onnx(checkpoint_dir, Path(scratch), prompts, thresholds, boxed) if onnx else (None, None)
        )
        info = log_pyfunc_model(
            checkpoint_dir, thresholds_file, registered_model_name=registered_model_name, name=name, onnx_file=onnx_file
        )
    version = str(info.registered_model_version)
    passed, message = gate_result(
        baseline, gated_metrics if gated_metrics is not None else metrics, gate_keys, gate_tolerance
    )
    client.update_model_version(
        registered_model_name, version, description=version_description(metrics, thresholds, context)
    )
    client.update_registered_model(registered_model_name, description=REGISTERED_MODEL_DESCRIPTION)
    tags = {key: f"{metrics[key]:.4f}" for key in HEADLINE_KEYS if isinstance(metrics.get(key), int | float)}
    tags |= {f"threshold.{prompt_slug(p)}": f"{t:g}" for p, t in thresholds.items()}
    tags |= {boxes_key(p): "true" for p in sorted(boxed)}
    tags |= {arms_key(p): "true" for p in sorted(boxed) if boxed[p] == "arms"}
    tags |= {"gate": "passed" if passed else "failed", **{k: v for k, v in context.items() if v}}
    tags |= {"onnx": onnx_tag} if onnx_tag else {}
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    if passed:
        client.set_registered_model_alias(registered_model_name, CHAMPION_ALIAS, version)
    return Registration(
        registered_model_name,
        version,
        mlflow.active_run().info.run_id,
        info.model_uri,
        thresholds,
        passed,
        message,
        passed,
    )


def exported_onnx(
    checkpoint_dir: str | Path, folder: Path, prompts: Sequence[str], thresholds: Mapping[str, float], boxed
) -> tuple[Path | None, str]:
    """(the ONNX file in `folder`, the version's `onnx` tag); no file, and the reason in the tag, when
    the export does not cover the checkpoint."""
    from drywall_qa.model import load_model
    from drywall_qa.onnx_export import OnnxExportError, export_onnx

    path = folder / ONNX_FILE
    model, processor = load_model(checkpoint_dir)
    try:
        export_onnx(model, processor, path, prompts, thresholds, boxed)
    except OnnxExportError as error:
        return None, f"not exported: {error}"[:5000]
    return path, f"{ONNX_FILE} ({path.stat().st_size / 1e6:.1f} MB)"


def write_registration(path: str | Path, registration: Registration) -> None:
    write_json_atomic(path, asdict(registration))


def run_context() -> dict[str, str]:
    """What a version came from, for its description and tags."""
    return {"dvc_experiment": os.environ.get("DVC_EXP_NAME", "")}
