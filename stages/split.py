"""DVC stage `split`: data/interim/images.csv -> data/manifest.csv (one row per image and prompt)
and metrics/split.json, with a seeded train/val/test split grouped by source image."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.contracts.manifest import SPLITS
from drywall_qa.params import flatten
from drywall_qa.split import write_split
from drywall_qa.stage import Stage, run_stage
from drywall_qa.tracking import log_dataset


def split(stage: Stage) -> str:
    split_params = stage.params["split"]
    with stage.tracked():
        stats = write_split(
            images_csv=paths.IMAGES_CSV,
            prompts=stage.params["prompts"],
            fractions={name: split_params[name] for name in SPLITS},
            seed=stage.params["seed"],
            manifest_path=paths.MANIFEST,
            stats_path=paths.SPLIT_METRICS,
            masks_dir=paths.MASKS_DIR,
            repo_root=".",
            shuffles=split_params["shuffles"],
        )
        counts = flatten(stats["datasets"]) | flatten(stats["totals"], "totals.")
        mlflow.log_metrics({key: value for key, value in counts.items() if isinstance(value, int | float)})
        mlflow.log_dict(stats, "split.json")
        log_dataset(paths.MANIFEST, name="manifest", context="split")
    return "\n".join(
        f"split: {dataset}: " + ", ".join(f"{name} {per_split[name]['images']}" for name in SPLITS) + " images"
        for dataset, per_split in stats["datasets"].items()
    )


if __name__ == "__main__":
    sys.exit(run_stage("split", split))
