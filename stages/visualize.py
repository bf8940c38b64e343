"""DVC stage `visualize`: test predictions, per-image scores, threshold sweep and training history ->
plots/figures/*.png (examples, prompt sensitivity, failure cases, threshold sweep, training curves)."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.stage import Stage, run_stage
from drywall_qa.visualize import make_figures


def visualize(stage: Stage) -> str:
    settings = stage.params["visualize"]
    with stage.tracked():
        figures = make_figures(
            manifest_path=paths.MANIFEST,
            per_image_csv=paths.EVAL_PER_IMAGE,
            per_prompt_csv=paths.EVAL_PER_PROMPT,
            threshold_sweep_csv=paths.THRESHOLD_SWEEP,
            train_history_csv=paths.TRAIN_HISTORY,
            predictions_dir=paths.PREDICTIONS_DIR,
            out_dir=paths.FIGURES_DIR,
            examples_per_prompt=settings["examples_per_prompt"],
            worst_k=settings["worst_k"],
        )
        mlflow.log_artifacts(paths.FIGURES_DIR, artifact_path="figures")
    return f"visualize: {len(figures)} figures in {paths.FIGURES_DIR}/"


if __name__ == "__main__":
    sys.exit(run_stage("visualize", visualize))
