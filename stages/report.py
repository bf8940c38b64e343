"""DVC stage `report`: metrics and figures of the run -> reports/report.md (+ report.html)."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.report import build_report, load_inputs, write_report
from drywall_qa.stage import Stage, run_stage
from drywall_qa.tracking import dvc_lock_digest, git_commit, pipeline_stage_seconds


def report(stage: Stage) -> str:
    inputs = load_inputs(
        source_json=paths.SOURCE_RECORD,
        conversion_json=paths.CONVERSION_METRICS,
        split_json=paths.SPLIT_METRICS,
        train_json=paths.TRAIN_METRICS,
        eval_json=paths.EVAL_METRICS,
        figures_dir=paths.FIGURES_DIR,
    )
    with stage.tracked() as run:
        parent_id = run.data.tags.get("mlflow.parentRunId")
        mlflow_ids = {"pipeline run": parent_id or "none", "report stage run": run.info.run_id}
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
    return f"report: wrote {', '.join(str(p) for p in written)}"


if __name__ == "__main__":
    sys.exit(run_stage("report", report))
