"""DVC stage `convert`: data/raw/<dataset>/ (Roboflow COCO or YOLO exports) -> data/masks/,
data/interim/images.csv and metrics/conversion.json, for every dataset in params `prompts`."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.convert import ConversionError, convert_all
from drywall_qa.params import flatten, load_stage_params
from drywall_qa.tracking import TrackingUnavailableError, stage_run


def numeric_metrics(report: dict) -> dict[str, float]:
    """Every count of the report as a flat MLflow metric (`taping.annotations.skipped_by_reason.no_pixels`)."""
    flat = flatten(report["datasets"]) | flatten(report["totals"], "totals.")
    return {key: value for key, value in flat.items() if isinstance(value, int | float) and not isinstance(value, bool)}


def main() -> int:
    params = load_stage_params("convert")
    prompts = params["prompts"]
    try:
        with stage_run("convert", params={"prompts": prompts}, all_params=params):
            report = convert_all(
                raw_dir="data/raw",
                prompts=prompts,
                masks_dir="data/masks",
                images_csv="data/interim/images.csv",
                report_path="metrics/conversion.json",
                repo_root=".",
            )
            mlflow.log_metrics(numeric_metrics(report))
            mlflow.log_dict(report, "conversion.json")
    except (ConversionError, TrackingUnavailableError) as error:
        print(f"convert: {error}", file=sys.stderr)
        return 1
    totals = report["totals"]
    print(
        f"convert: {totals['images_converted']}/{totals['images_seen']} images, "
        f"{totals['annotations_converted']}/{totals['annotations_seen']} annotations, "
        f"{totals['masks_written']} masks (details: metrics/conversion.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
