"""DVC stage `train`: data/manifest.csv -> models/clipseg/best/, metrics/train.json and
plots/train_history.csv; MLflow gets per-epoch metrics, the history figure and the best checkpoint
(the `register` stage registers it once evaluation has chosen its thresholds).

A killed run resumes from data/cache/train/last/ (not a DVC output) when re-run with the same params
and manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path

from drywall_qa.contracts import paths
from drywall_qa.stage import Stage, run_stage

SUMMARY_SCORES = ("best_val_miou", "best_val_dice", "final_train_loss")  # the run's metrics besides the per-epoch ones


def history_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(epochs, [row["train_loss"] for row in history], label="train loss")
    losses.plot(epochs, [row["val_loss"] for row in history], label="val loss")
    losses.set_xlabel("epoch")
    losses.legend()
    scores.plot(epochs, [row["val_miou"] for row in history], label="val mIoU")
    scores.plot(epochs, [row["val_dice"] for row in history], label="val Dice")
    scores.set_xlabel("epoch")
    scores.set_ylim(0, 1)
    scores.legend()
    figure.tight_layout()
    return figure


def train_stage(stage: Stage) -> str:
    # imported here: the stage helper pins the CPU kernels (params cpu_numerics) before torch loads
    import matplotlib.pyplot as plt
    import mlflow
    from transformers.utils import logging as hf_logging

    from drywall_qa.tracking import log_dataset, log_to_pipeline
    from drywall_qa.training.checkpoint import read_history
    from drywall_qa.training.config import TrainConfig
    from drywall_qa.training.loop import resumable_run_id, train

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint in the stage log

    logged_epochs: set[int] = set()

    def log_epoch(row: dict) -> None:
        # a resume replays the epochs before it: log only those a kill kept from reaching MLflow
        if row["epoch"] not in logged_epochs:
            mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])

    config = TrainConfig.from_params(stage.params)
    # A run killed mid-training resumes from last/ and continues its own MLflow run.
    resume_id = resumable_run_id(config, paths.MANIFEST, paths.TRAIN_WORK_DIR)
    with stage.tracked(resume_run_id=resume_id) as run:
        if resume_id is None:
            log_dataset(paths.MANIFEST, name="manifest", context="train")
        else:
            history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
            logged_epochs.update(metric.step for metric in history)
        summary = train(
            config,
            manifest_path=paths.MANIFEST,
            output_dir=paths.MODEL_DIR,
            metrics_path=paths.TRAIN_METRICS,
            history_path=paths.TRAIN_HISTORY,
            root=".",
            cache_dir=stage.repo_root / paths.ACTIVATION_CACHE if config.uses_cache else None,
            on_epoch=log_epoch,
            tracking_run_id=run.info.run_id,
            work_dir=paths.TRAIN_WORK_DIR,
        )
        mlflow.log_metrics({key: float(summary[key]) for key in SUMMARY_SCORES})
        # counts and totals are tags: as metrics each is a one-bar chart among the per-epoch curves, and the
        # total `seconds` shared its name with the per-epoch one
        mlflow.set_tags(
            {
                f"summary.{key}": value
                for key, value in summary.items()
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in SUMMARY_SCORES
            }
        )
        mlflow.log_dict(summary, "train.json")
        summary_keys = ("best_val_miou", "best_val_dice", "best_epoch", "epochs_run", "seconds", "params")
        log_to_pipeline({f"train.{key}": summary[key] for key in summary_keys})
        mlflow.log_artifact(paths.TRAIN_HISTORY)
        # the checkpoint itself, beside the curves that chose it (`register` logs it again as the servable model)
        mlflow.log_artifacts(paths.BEST_CHECKPOINT, artifact_path="checkpoint")
        history = read_history(Path(paths.TRAIN_HISTORY))  # every epoch, also those before a resume
        if history:
            figure = history_figure(history)
            mlflow.log_figure(figure, "train_history.png")
            plt.close(figure)
    return (
        f"train: best val mIoU {summary['best_val_miou']:.4f} (Dice {summary['best_val_dice']:.4f}) at epoch "
        f"{summary['best_epoch']} of {summary['epochs_run']}, {summary['seconds']:.0f}s on {summary['device']}"
    )


if __name__ == "__main__":
    sys.exit(run_stage("train", train_stage))
