"""DVC stage `register`: models/clipseg/best + metrics/eval.json (+ the gate's metrics/headline.json) -> a new version of the registered
MLflow model (params `mlflow.registered_model`) that carries the val-chosen thresholds, marked
`champion` when the regression gate passes against the committed metrics; metrics/registry.json
records which version it is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from drywall_qa.contracts import paths
from drywall_qa.contracts.manifest import prompt_order
from drywall_qa.stage import Stage, run_stage


def register(stage: Stage) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per upload in a stage log
    from drywall_qa.registry import committed_metrics, register_checkpoint, run_context, write_registration

    gate = stage.params["gate"]
    metrics = json.loads(Path(paths.EVAL_METRICS).read_text(encoding="utf-8"))  # thresholds, description
    gated = json.loads(Path(gate["metrics_file"]).read_text(encoding="utf-8"))
    source = json.loads(Path(paths.SOURCE_RECORD).read_text(encoding="utf-8"))
    context = run_context() | {
        "data_source": str(source.get("source", "")),
        "weights": str(stage.params["model"]["weights"] or f"scratch ({stage.params['model']['preset']})"),
    }
    with stage.tracked():
        registration = register_checkpoint(
            paths.BEST_CHECKPOINT,
            metrics,
            prompt_order(stage.params["prompts"]),
            stage.params["mlflow"]["registered_model"],
            gate["keys"],
            gate["tolerance"],
            committed_metrics(gate["baseline_file"] or gate["metrics_file"], repo=Path.cwd()),
            context,
            gated_metrics=gated,
            onnx=True,  # the ONNX export rides along with the same version (drywall-qa predict --runtime onnx)
        )
    write_registration(paths.REGISTRY_RECORD, registration)
    alias = "now @champion" if registration.champion else "champion unchanged (gate did not pass)"
    return f"register: {registration.name} version {registration.version}, {alias}; {registration.gate_message.splitlines()[0]}"


if __name__ == "__main__":
    sys.exit(run_stage("register", register))
