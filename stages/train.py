"""DVC stage `train`: data/manifest.csv -> models/clipseg/{best,last}/, metrics/train.json and
plots/train_history.csv; MLflow gets per-epoch metrics, the history figure and the best checkpoint
as a registered pyfunc model.

A killed run resumes from models/clipseg/last/ when re-run with the same params and manifest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from drywall_qa.numerics import NumericsError, configure_cpu_numerics
from drywall_qa.params import load_stage_params

try:  # before anything below imports torch
    configure_cpu_numerics(load_stage_params("train")["cpu_numerics"])
except NumericsError as error:
    sys.exit(f"train: {error}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from drywall_qa.data import ManifestError  # noqa: E402
from drywall_qa.mlflow_model import log_pyfunc_model  # noqa: E402
from drywall_qa.model import ModelConfigError  # noqa: E402
from drywall_qa.tracking import TrackingUnavailableError, log_dataset, stage_run  # noqa: E402
from drywall_qa.train import TrainConfig, TrainConfigError, read_history, resumable_run_id, train  # noqa: E402

MANIFEST = "data/manifest.csv"
OUTPUT_DIR = "models/clipseg"
METRICS = "metrics/train.json"
HISTORY = "plots/train_history.csv"
# Not a DVC output: reusable across runs and experiments (keys include weights and preprocessing).
ACTIVATION_CACHE = "data/cache/activations"


def history_figure(history: list[dict]) -> plt.Figure:
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


def main() -> int:
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint in the stage log
    params = load_stage_params("train")
    stage_params = {key: params[key] for key in ("seed", "lr", "cpu_numerics", "model", "train", "inference", "prompts")}
    repo_root = Path(os.environ.get("DVC_ROOT") or ".")

    def log_epoch(row: dict) -> None:
        mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])

    try:
        config = TrainConfig.from_params(params)
        # A run killed mid-training resumes from last/ and continues its own MLflow run.
        resume_id = resumable_run_id(config, MANIFEST, OUTPUT_DIR)
        with stage_run("train", params=stage_params, all_params=params, resume_run_id=resume_id) as run:
            if resume_id is None:
                log_dataset(MANIFEST, name="manifest", context="train")
            summary = train(
                config,
                manifest_path=MANIFEST,
                output_dir=OUTPUT_DIR,
                metrics_path=METRICS,
                history_path=HISTORY,
                root=".",
                cache_dir=repo_root / ACTIVATION_CACHE if config.uses_cache else None,
                on_epoch=log_epoch,
                tracking_run_id=run.info.run_id,
            )
            mlflow.log_metrics({
                key: float(value) for key, value in summary.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            })
            mlflow.log_dict(summary, "train.json")
            mlflow.log_artifact(HISTORY)
            history = read_history(Path(HISTORY))  # every epoch, also those before a resume
            if history:
                figure = history_figure(history)
                mlflow.log_figure(figure, "train_history.png")
                plt.close(figure)
            log_pyfunc_model(Path(OUTPUT_DIR) / "best", registered_model_name=params["mlflow"]["registered_model"])
    except (ManifestError, TrainConfigError, ModelConfigError, TrackingUnavailableError) as error:
        print(f"train: {error}", file=sys.stderr)
        return 1
    print(
        f"train: best val mIoU {summary['best_val_miou']:.4f} (Dice {summary['best_val_dice']:.4f}) at epoch "
        f"{summary['best_epoch']} of {summary['epochs_run']}, {summary['seconds']:.0f}s on {summary['device']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
