"""DVC stage `evaluate`: models/clipseg/best + data/manifest.csv -> metrics/eval.json (with
metrics/train.json also the DVC metrics file metrics/headline.json), data/predictions/,
plots/eval_per_image.csv, plots/eval_per_prompt.csv, plots/threshold_sweep.csv.

Thresholds are chosen per prompt on val, test is scored with them; the untrained model gives the
zero-shot row; inference time and memory are measured on test images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from drywall_qa.contracts import paths
from drywall_qa.contracts.headline import pipeline_metrics, write_headline
from drywall_qa.contracts.mask_rule import describe_rule
from drywall_qa.stage import Stage, run_stage


def evaluate(stage: Stage) -> str:
    # imported here: the stage helper pins the CPU kernels (params cpu_numerics) before torch loads
    import mlflow
    import pandas as pd

    from drywall_qa.evaluate import EvaluateSettings, run_evaluation
    from drywall_qa.tracking import log_dataset, log_to_pipeline

    settings = EvaluateSettings.from_params(stage.params)
    with stage.tracked():
        log_dataset(paths.MANIFEST, name="manifest", context="evaluate")
        result = run_evaluation(
            model_dir=paths.BEST_CHECKPOINT,
            manifest_path=paths.MANIFEST,
            settings=settings,
            predictions_dir=paths.PREDICTIONS_DIR,
            metrics_path=paths.EVAL_METRICS,
            plots_dir="plots",
        )
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if isinstance(v, int | float)})
        train_summary = json.loads(Path(paths.TRAIN_METRICS).read_text(encoding="utf-8"))
        write_headline(paths.HEADLINE_METRICS, result.metrics, train_summary)
        log_to_pipeline(pipeline_metrics(result.metrics))  # the parent run: what executions are compared on
        mlflow.log_artifact(paths.HEADLINE_METRICS)
        mlflow.set_tag("device", result.metrics["runtime.device"])
        mlflow.log_table(pd.DataFrame(result.per_image), "eval_per_image.json")
        mlflow.log_artifact(paths.EVAL_METRICS)
        for path in (paths.EVAL_PER_IMAGE, paths.EVAL_PER_PROMPT, paths.THRESHOLD_SWEEP):
            mlflow.log_artifact(path, artifact_path="plots")
    m = result.metrics
    lines = [f"evaluate: test mIoU {m['test.miou']:.4f}, Dice {m['test.dice']:.4f} on {m['test.pairs']} pairs"]
    lines += [
        f"evaluate:   {row['prompt']!r}: mIoU {row['test_miou']:.4f} at threshold "
        f"{describe_rule(row['threshold'], result.boxed.get(row['prompt']))}"
        for row in result.per_prompt
    ]
    if "zero_shot.test.miou" in m:
        lines.append(f"evaluate: zero-shot (untrained) test mIoU {m['zero_shot.test.miou']:.4f}")
    lines.append(
        f"evaluate: {m['runtime.ms_per_image_1_prompt']:.1f} ms/image (1 prompt), "
        f"{m['runtime.ms_per_image_all_prompts']:.1f} ms/image ({m['runtime.n_prompts_all']} prompts) on {m['runtime.device']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", evaluate))
