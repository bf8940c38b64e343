"""DVC stage `visualize`: test predictions, per-image scores, threshold sweep and training history ->
plots/figures/*.png (examples, prompt sensitivity, failure cases, threshold sweep, training curves)."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.params import load_stage_params
from drywall_qa.tracking import TrackingUnavailableError, stage_run
from drywall_qa.visualize import VisualizationError, make_figures


def main() -> int:
    params = load_stage_params("visualize")
    visualize = params["visualize"]
    try:
        with stage_run("visualize", params={"visualize": visualize}, all_params=params):
            paths = make_figures(
                manifest_path="data/manifest.csv",
                per_image_csv="plots/eval_per_image.csv",
                per_prompt_csv="plots/eval_per_prompt.csv",
                threshold_sweep_csv="plots/threshold_sweep.csv",
                train_history_csv="plots/train_history.csv",
                predictions_dir="data/predictions",
                out_dir="plots/figures",
                examples_per_prompt=visualize["examples_per_prompt"],
                worst_k=visualize["worst_k"],
            )
            mlflow.log_artifacts("plots/figures", artifact_path="figures")
    except (VisualizationError, TrackingUnavailableError) as error:
        print(f"visualize: {error}", file=sys.stderr)
        return 1
    print(f"visualize: {len(paths)} figures in plots/figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
