"""DVC stage `split`: data/interim/images.csv -> data/manifest.csv (one row per image and prompt)
and metrics/split.json, with a seeded train/val/test split grouped by source image."""

from __future__ import annotations

import sys

import mlflow

from drywall_qa.params import flatten, load_stage_params
from drywall_qa.split import SPLITS, SplitError, write_split
from drywall_qa.tracking import TrackingUnavailableError, log_dataset, stage_run

MANIFEST = "data/manifest.csv"


def main() -> int:
    params = load_stage_params("split")
    split_params = params["split"]
    stage_params = {"seed": params["seed"], "split": split_params, "prompts": params["prompts"]}
    try:
        with stage_run("split", params=stage_params, all_params=params):
            stats = write_split(
                images_csv="data/interim/images.csv",
                prompts=params["prompts"],
                fractions={name: split_params[name] for name in SPLITS},
                seed=params["seed"],
                manifest_path=MANIFEST,
                stats_path="metrics/split.json",
                masks_dir="data/masks",
                repo_root=".",
                shuffles=split_params["shuffles"],
            )
            counts = flatten(stats["datasets"]) | flatten(stats["totals"], "totals.")
            mlflow.log_metrics({key: value for key, value in counts.items() if isinstance(value, int | float)})
            mlflow.log_dict(stats, "split.json")
            log_dataset(MANIFEST, name="manifest", context="split")
    except (SplitError, TrackingUnavailableError) as error:
        print(f"split: {error}", file=sys.stderr)
        return 1
    for dataset, per_split in stats["datasets"].items():
        counts = ", ".join(f"{name} {per_split[name]['images']}" for name in SPLITS)
        print(f"split: {dataset}: {counts} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
