"""DVC stage `evaluate`: models/clipseg/best + data/manifest.csv -> metrics/eval.json, data/predictions/,
plots/eval_per_image.csv, plots/eval_per_prompt.csv, plots/threshold_sweep.csv.

Thresholds are chosen per prompt on val, test is scored with them; the untrained model gives the
zero-shot row; inference time and memory are measured on test images."""

from __future__ import annotations

import sys

from drywall_qa.numerics import NumericsError, configure_cpu_numerics
from drywall_qa.params import load_stage_params

try:  # before anything below imports torch
    configure_cpu_numerics(load_stage_params("evaluate")["cpu_numerics"])
except NumericsError as error:
    sys.exit(f"evaluate: {error}")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from drywall_qa.evaluate import EvaluationError, run_evaluation  # noqa: E402
from drywall_qa.tracking import TrackingUnavailableError, log_dataset, stage_run  # noqa: E402

PLOTS = ("plots/eval_per_image.csv", "plots/eval_per_prompt.csv", "plots/threshold_sweep.csv")


def main() -> int:
    params = load_stage_params("evaluate")
    evaluate = params["evaluate"]
    stage_params = {key: params[key] for key in ("seed", "cpu_numerics", "model", "evaluate", "prompts")}
    try:
        with stage_run("evaluate", params=stage_params, all_params=params):
            log_dataset("data/manifest.csv", name="manifest", context="evaluate")
            result = run_evaluation(
                model_dir="models/clipseg/best",
                manifest_path="data/manifest.csv",
                prompts=params["prompts"],
                model_params=params["model"],
                thresholds=evaluate["thresholds"],
                batch_size=evaluate["batch_size"],
                zero_shot=evaluate["zero_shot"],
                timing_images=evaluate["timing_images"],
                seed=params["seed"],
                predictions_dir="data/predictions",
                metrics_path="metrics/eval.json",
                plots_dir="plots",
            )
            numeric = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
            mlflow.log_metrics(numeric)
            mlflow.set_tag("device", result.metrics["runtime.device"])
            mlflow.log_table(pd.DataFrame(result.per_image), "eval_per_image.json")
            mlflow.log_artifact("metrics/eval.json")
            for path in PLOTS:
                mlflow.log_artifact(path, artifact_path="plots")
    except (EvaluationError, TrackingUnavailableError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    m = result.metrics
    print(f"evaluate: test mIoU {m['test.miou']:.4f}, Dice {m['test.dice']:.4f} on {m['test.pairs']} pairs")
    for row in result.per_prompt:
        print(f"evaluate:   {row['prompt']!r}: mIoU {row['test_miou']:.4f} at threshold {row['threshold']}")
    if "zero_shot.test.miou" in m:
        print(f"evaluate: zero-shot (untrained) test mIoU {m['zero_shot.test.miou']:.4f}")
    print(
        f"evaluate: {m['runtime.ms_per_image_1_prompt']:.1f} ms/image (1 prompt), "
        f"{m['runtime.ms_per_image_all_prompts']:.1f} ms/image ({m['runtime.n_prompts_all']} prompts) on {m['runtime.device']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
