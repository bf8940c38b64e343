"""DVC stage `report`: metrics and figures of the run -> reports/report.md (+ report.html)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from drywall_qa.params import load_stage_params
from drywall_qa.report import ReportError, build_report, load_inputs, write_report
from drywall_qa.tracking import TrackingUnavailableError, dvc_lock_digest, git_commit, pipeline_stage_seconds, stage_run


def main() -> int:
    params = load_stage_params("report")
    try:
        inputs = load_inputs(
            source_json="data/raw/source.json",
            conversion_json="metrics/conversion.json",
            split_json="metrics/split.json",
            train_json="metrics/train.json",
            eval_json="metrics/eval.json",
            figures_dir="plots/figures",
        )
        with stage_run("report", params={"seed": params["seed"]}, all_params=params) as run:
            parent_id = run.data.tags.get("mlflow.parentRunId")
            mlflow_ids = {"pipeline run": parent_id or "none", "report stage run": run.info.run_id}
            stage_seconds = pipeline_stage_seconds(parent_id) if parent_id else {}
            markdown = build_report(
                inputs,
                params=params,
                git_commit=git_commit(Path.cwd()),
                raw_data_hash=dvc_lock_digest("data/raw"),
                mlflow_ids=mlflow_ids,
                stage_seconds=stage_seconds,
            )
            paths = write_report(markdown, "reports")
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path="report")
    except (ReportError, TrackingUnavailableError) as error:
        print(f"report: {error}", file=sys.stderr)
        return 1
    print(f"report: wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
