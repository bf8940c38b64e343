"""Getting the raw Roboflow exports into `data/raw/<dataset>/`, from one of three sources, a module each.

- `synthetic`: the seeded generator of `drywall_qa.synthetic` (offline default);
- `roboflow_sdk`: the real `roboflow` SDK, API key from `ROBOFLOW_API_KEY` only;
- `local`: an export downloaded by hand, a folder or a `.zip`, COCO or YOLO, copied unchanged
  (optionally a seeded slice of it, `limit_per_dataset`);
- `guards`: what an import refuses (zip-slip, links, images over `max_image_pixels`);
- `base`: the error base and the user's names for staged files.

Everything is written into a temporary folder beside `data/raw` that replaces it only when
complete, with `source.json` (provenance, never the key). The API key is removed from every
message, captured SDK output and downloaded text file before any of them can reach a log.
Exports are read (described, listed, sliced) through the one reader, `contracts.roboflow`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from drywall_qa.contracts.atomic import replace_dir
from drywall_qa.contracts.roboflow import ExportFormatError, find_export_root
from drywall_qa.errors import DrywallQAError
from drywall_qa.sources.base import DownloadError, download_wording, name_user_files
from drywall_qa.sources.guards import ImageTooLargeError, UnsafeArchiveError
from drywall_qa.sources.local import fill_local
from drywall_qa.sources.roboflow_sdk import (
    API_KEY_ENV,
    MissingApiKeyError,
    RoboflowDownloadError,
    RoboflowUnavailableError,
    fill_roboflow,
    roboflow_api_key,
)
from drywall_qa.sources.synthetic import fill_synthetic

__all__ = [
    "API_KEY_ENV",
    "SOURCES",
    "SOURCE_FILE",
    "DownloadError",
    "ExportFormatError",
    "ImageTooLargeError",
    "MissingApiKeyError",
    "RoboflowDownloadError",
    "RoboflowUnavailableError",
    "UnsafeArchiveError",
    "fetch_raw_data",
    "roboflow_api_key",
    "user_origin",
    "write_raw_atomically",
]

SOURCE_FILE = "source.json"
SOURCES = ("synthetic", "roboflow", "local")


def fetch_raw_data(
    data_params: Mapping[str, Any],
    seed: int,
    raw_dir: str | Path,
    repo_root: str | Path,
    api_key: str | None = None,
    validate: Callable[[Path, str], Any] | None = None,
) -> dict[str, Any]:
    """Fill `raw_dir` from `data_params["source"]`; returns the provenance written to `source.json`.

    `api_key` is only used by the `roboflow` source (the stage reads it from the environment).
    `validate(dataset_dir, name)` runs on each new dataset folder before `raw_dir` is touched (the
    stage passes convert's reader); an error it raises keeps `raw_dir` as it was, and a path of the
    temporary folder in its message is replaced by the file the user knows (source path, zip member).
    """
    source = data_params.get("source")
    if source not in SOURCES:
        raise DownloadError(f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "roboflow" and not api_key:
        raise MissingApiKeyError(f"data.source is roboflow but {API_KEY_ENV} is not set; export your Roboflow API key")

    def fill(staging: Path) -> dict[str, Any]:
        if source == "synthetic":
            return fill_synthetic(staging, data_params["synthetic"], seed)
        if source == "roboflow":
            return fill_roboflow(staging, data_params["roboflow"], str(api_key), data_params["local"])
        return fill_local(staging, data_params["local"], seed, Path(repo_root))

    def in_user_terms(message: str, staging: Path) -> str:
        for name in (data_params.get("local") or {}).get("datasets") or {}:
            message = name_user_files(message, staging / name, user_origin(data_params, name, Path(repo_root)))
        return message

    def checked_fill(staging: Path) -> dict[str, Any]:
        try:
            # fill() reads the staging copy too (describe_export): its errors must name the user's files
            with download_wording():
                record = fill(staging)
        except DrywallQAError as error:
            raise type(error)(in_user_terms(str(error), staging)) from None
        if validate is not None:
            for name in record["datasets"]:
                try:
                    validate(staging / name, name)
                except Exception as error:
                    message = name_user_files(
                        str(error), staging / name, user_origin(data_params, name, Path(repo_root))
                    )
                    raise ExportFormatError(f"{name}: {message}") from None
        return record

    return write_raw_atomically(Path(raw_dir), checked_fill)


def user_origin(data_params: Mapping[str, Any], name: str, repo_root: Path) -> str:
    """What the user knows dataset `name` as: its folder, `<zip>:` for a zip, else data/raw/<name>."""
    if data_params.get("source") != "local":
        return f"data/raw/{name}"
    configured = Path(data_params["local"]["datasets"][name])
    source = configured if configured.is_absolute() else repo_root / configured
    if source.is_file():
        return f"{source}:"  # members follow: cracks.zip:train/_annotations.coco.json
    if not source.is_dir():
        return str(source)
    try:
        return str(find_export_root(source))
    except ExportFormatError:
        return str(source)


def write_raw_atomically(raw_dir: Path, fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `fill(staging)` in a temp folder beside `raw_dir`, add `source.json`, swap it in.

    On any error the temp folder is removed and `raw_dir` is left as it was.
    """
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp's 0700 mode would stay on data/raw after the rename
    staging = raw_dir.parent / f".{raw_dir.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        record = fill(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # the same lock as every other folder swap: two downloads take turns, the last one wins
        replace_dir(staging, raw_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
