"""DVC stage `report`, the last: metrics, figures and the registered version of the run ->
reports/report.md (+ report.html); its end finishes the pipeline's MLflow parent run, whose
description becomes the report's first lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.report import build_report, headline, load_inputs, pipeline_headline, pipeline_tags, write_report
from drywall_qa.stage import Stage, run_stage
from drywall_qa.tracking import describe_run, dvc_lock_digest, git_commit, pipeline_stage_seconds, tag_run


def report(stage: Stage) -> str:
    inputs = load_inputs(
        source_json=paths.SOURCE_RECORD,
        conversion_json=paths.CONVERSION_METRICS,
        split_json=paths.SPLIT_METRICS,
        train_json=paths.TRAIN_METRICS,
        eval_json=paths.EVAL_METRICS,
        figures_dir=paths.FIGURES_DIR,
    )
    registration = json.loads(Path(paths.REGISTRY_RECORD).read_text(encoding="utf-8"))
    with stage.tracked() as run:
        parent_id = run.data.tags.get("mlflow.parentRunId")
        mlflow_ids = {
            "pipeline run": parent_id or "none",
            "report stage run": run.info.run_id,
            "registered model": f"models:/{registration['name']}/{registration['version']}"
            + (" (@champion)" if registration.get("champion") else " (gate not passed: not champion)"),
        }
        markdown = build_report(
            inputs,
            params=stage.params,  # all of params.yaml: dvc.yaml declares them all for the report
            git_commit=git_commit(stage.repo_root),
            raw_data_hash=dvc_lock_digest(paths.RAW_DIR),
            mlflow_ids=mlflow_ids,
            stage_seconds=pipeline_stage_seconds(parent_id) if parent_id else {},
        )
        written = write_report(markdown, paths.REPORT_DIR)
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="report")
        if parent_id:  # the pipeline run's description: the headline line, where the model is, the report's first lines
            model_lines = (
                f"Model: registered version `models:/{registration['name']}/{registration['version']}`, "
                f"logged model `{registration['model_uri']}` (logged by the `register` child run)."
            )
            describe_run(
                parent_id, "\n\n".join([pipeline_headline(inputs, registration), model_lines, headline(inputs)])
            )
            tag_run(parent_id, pipeline_tags(inputs, registration))
    return f"report: wrote {', '.join(str(p) for p in written)}"


if __name__ == "__main__":
    sys.exit(run_stage("report", report))
