"""DVC stage `convert`: data/raw/<dataset>/ (Roboflow COCO or YOLO exports) -> data/masks/,
data/interim/images.csv and metrics/conversion.json, for every dataset in params `prompts`."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.convert import convert_all
from drywall_qa.params import flatten
from drywall_qa.stage import Stage, run_stage


def numeric_metrics(report: dict) -> dict[str, float]:
    """Every count of the report as a flat MLflow metric (`taping.annotations.skipped_by_reason.no_pixels`)."""
    flat = flatten(report["datasets"]) | flatten(report["totals"], "totals.")
    return {key: value for key, value in flat.items() if isinstance(value, int | float) and not isinstance(value, bool)}


def convert(stage: Stage) -> str:
    with stage.tracked():
        report = convert_all(
            raw_dir=paths.RAW_DIR,
            prompts=stage.params["prompts"],
            masks_dir=paths.MASKS_DIR,
            images_csv=paths.IMAGES_CSV,
            report_path=paths.CONVERSION_METRICS,
            repo_root=".",
        )
        mlflow.log_metrics(numeric_metrics(report))
        mlflow.log_dict(report, "conversion.json")
    totals = report["totals"]
    return (
        f"convert: {totals['images_converted']}/{totals['images_seen']} images, "
        f"{totals['annotations_converted']}/{totals['annotations_seen']} annotations, "
        f"{totals['masks_written']} masks (details: {paths.CONVERSION_METRICS})"
    )


if __name__ == "__main__":
    sys.exit(run_stage("convert", convert))
