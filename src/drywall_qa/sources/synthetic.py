"""The `synthetic` source: the seeded generator of `drywall_qa.synthetic` (the offline default)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drywall_qa.contracts.roboflow import describe_export
from drywall_qa.sources.base import DownloadError
from drywall_qa.synthetic import DATASET_SPECS, InvalidGeneratorParams, generate_exports


def fill_synthetic(staging: Path, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    generator_params = {
        "source_images": int(params["source_images"]),
        "augmented_copies": int(params["augmented_copies"]),
        "augmented_fraction": float(params["augmented_fraction"]),
        "negative_fraction": float(params["negative_fraction"]),
        "image_size": int(params["image_size"]),
    }
    try:
        generate_exports(staging, seed=seed, **generator_params)
    except InvalidGeneratorParams as error:
        raise DownloadError(str(error)) from None
    datasets = {}
    for name in ("cracks", "taping"):
        spec = DATASET_SPECS[name]
        datasets[name] = {
            "workspace": spec.workspace,
            "project": spec.project,
            "version": spec.version,
            **describe_export(staging / name),
        }
    return {"source": "synthetic", "seed": seed, "generator": generator_params, "datasets": datasets}
