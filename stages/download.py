"""DVC stage `download`: params `data.source` (synthetic | roboflow | local) -> data/raw/<dataset>/
(Roboflow exports as Roboflow ships them) and data/raw/source.json (provenance, never the API key)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import mlflow

from drywall_qa.convert import preview_grid, read_export
from drywall_qa.params import flatten, load_stage_params
from drywall_qa.sources import DownloadError, fetch_raw_data, roboflow_api_key
from drywall_qa.tracking import TrackingUnavailableError, stage_run

RAW_DIR = Path("data/raw")


def count_metrics(record: dict) -> dict[str, float]:
    """Image and annotation counts per dataset and split folder (`cracks.splits.valid.images`)."""
    counts = {
        name: {key: dataset[key] for key in ("images", "annotations", "splits")}
        for name, dataset in record["datasets"].items()
    }
    return {key: value for key, value in flatten(counts).items() if isinstance(value, int)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="download: %(message)s")
    params = load_stage_params("download")
    data = params["data"]
    try:
        # Read before any work: a missing key fails at once, with one line.
        api_key = roboflow_api_key(os.environ) if data.get("source") == "roboflow" else None
        with stage_run("download", params={"seed": params["seed"], "data": data}, all_params=params):
            # Relative local paths are the user's repo's: DVC_ROOT, also under `dvc exp run --temp`,
            # whose working copy lives in .dvc/tmp/exps/ where `../shared/...` would point elsewhere.
            repo_root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
            previews = {}

            def validate(dataset_dir: Path, name: str) -> None:
                # convert's own reader, before data/raw is replaced: a malformed export stops here
                # and the last good data/raw stays; the preview shows what conversion accepts.
                previews[name] = preview_grid(read_export(dataset_dir))

            record = fetch_raw_data(data, seed=params["seed"], raw_dir=RAW_DIR, repo_root=repo_root,
                                    api_key=api_key, validate=validate)
            mlflow.log_metrics(count_metrics(record))
            mlflow.log_dict(record, "source.json")
            for name, grid in previews.items():
                if grid is not None:  # a look at the first readable images and what becomes their masks
                    mlflow.log_image(grid, f"previews/{name}.png")
    except (DownloadError, TrackingUnavailableError) as error:
        raise SystemExit(f"download: {error}") from None
    for name, dataset in record["datasets"].items():
        folders = ", ".join(f"{split} {counts['images']}" for split, counts in dataset["splits"].items())
        print(
            f"download ({record['source']}): {name}: {dataset['images']} images ({folders}), "
            f"{dataset['annotations']} annotations, {dataset['format']} {dataset['geometry']}"
        )


if __name__ == "__main__":
    sys.exit(main())
