"""DVC stage `download`: params `data.source` (synthetic | roboflow | local) -> data/raw/<dataset>/
(Roboflow exports as Roboflow ships them) and data/raw/source.json (provenance, never the API key)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import mlflow

from drywall_qa.contracts import paths
from drywall_qa.convert import preview_grid, read_export
from drywall_qa.params import flatten
from drywall_qa.sources import fetch_raw_data, roboflow_api_key
from drywall_qa.stage import Stage, run_stage


def count_metrics(record: dict) -> dict[str, float]:
    """Image and annotation counts per dataset and split folder (`cracks.splits.valid.images`)."""
    counts = {
        name: {key: dataset[key] for key in ("images", "annotations", "splits")}
        for name, dataset in record["datasets"].items()
    }
    return {key: value for key, value in flatten(counts).items() if isinstance(value, int)}


def download(stage: Stage) -> str:
    logging.basicConfig(level=logging.INFO, format="download: %(message)s")
    data = stage.params["data"]
    # Read before any work: a missing key fails at once, with one line.
    api_key = roboflow_api_key(os.environ) if data["source"] == "roboflow" else None
    with stage.tracked():
        previews = {}

        def validate(dataset_dir: Path, name: str) -> None:
            # convert's own reader, before data/raw is replaced: a malformed export stops here
            # and the last good data/raw stays; the preview shows what conversion accepts.
            previews[name] = preview_grid(read_export(dataset_dir))

        # Relative local paths are the user's repo's (stage.repo_root), also under `dvc exp run --temp`,
        # whose working copy lives in .dvc/tmp/exps/ where `../shared/...` would point elsewhere.
        record = fetch_raw_data(
            data,
            seed=stage.params["seed"],
            raw_dir=Path(paths.RAW_DIR),
            repo_root=stage.repo_root,
            api_key=api_key,
            validate=validate,
        )
        mlflow.log_metrics(count_metrics(record))
        mlflow.log_dict(record, "source.json")
        for name, grid in previews.items():
            if grid is not None:  # a look at the first readable images and what becomes their masks
                mlflow.log_image(grid, f"previews/{name}.png")
    lines = []
    for name, dataset in record["datasets"].items():
        folders = ", ".join(f"{split} {counts['images']}" for split, counts in dataset["splits"].items())
        lines.append(
            f"download ({record['source']}): {name}: {dataset['images']} images ({folders}), "
            f"{dataset['annotations']} annotations, {dataset['format']} {dataset['geometry']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_stage("download", download))
