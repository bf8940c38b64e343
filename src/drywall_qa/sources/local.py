"""The `local` source: an export downloaded by hand, a folder or a `.zip`, COCO or YOLO, copied
unchanged (optionally a seeded slice of it, `limit_per_dataset`, whole source groups at a time)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from drywall_qa.contracts.naming import image_id_of, source_group
from drywall_qa.contracts.roboflow import (
    COCO_ANNOTATIONS,
    ExportFormatError,
    coco_annotations,
    describe_export,
    detect_format,
    find_export_root,
    is_image_file,
    list_images,
    read_coco,
)
from drywall_qa.sources.base import download_wording, name_user_files
from drywall_qa.sources.guards import check_image_pixels, extract_zip_safely, refuse_links

log = logging.getLogger(__name__)


def fill_local(staging: Path, params: Mapping[str, Any], seed: int, repo_root: Path) -> dict[str, Any]:
    datasets = {}
    for name, configured in params["datasets"].items():
        path = Path(configured)
        source = path if path.is_absolute() else repo_root / path
        log.info("importing %s from %s", name, source)
        datasets[name] = {
            "path": str(configured),
            **import_local_export(
                source,
                staging / name,
                max_image_pixels=int(params["max_image_pixels"]),
                limit=int(params["limit_per_dataset"]),
                seed=seed,
            ),
        }
    return {
        "source": "local",
        "seed": seed,
        "max_image_pixels": int(params["max_image_pixels"]),
        "limit_per_dataset": int(params["limit_per_dataset"]),
        "datasets": datasets,
    }


def import_local_export(source: Path, dest: Path, max_image_pixels: int, limit: int, seed: int) -> dict[str, Any]:
    """Copy (folder) or extract (zip) an export into `dest` (a new folder), unchanged unless `limit` > 0.

    A single wrapping folder (a zip of `my-export/train/...`) is stripped so that `dest` holds
    the split folders. With `limit` > 0 only a seeded slice of at most `limit` images is kept,
    whole source groups (an image and its augmented copies) at a time, with the annotation
    files filtered to match. Returns the description of what `dest` now holds.
    """
    if not source.exists():
        raise ExportFormatError(f"local export {source} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=dest.parent) as scratch:
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise ExportFormatError(f"local export {source} is neither a folder nor a zip file")
            unpacked = Path(scratch) / "unpacked"
            extract_zip_safely(source, unpacked, max_image_pixels)
            root = find_export_root(unpacked)
        else:
            refuse_links(source)
            root = find_export_root(source)
            check_image_pixels(root, max_image_pixels)
        export_format = detect_format(root)
        keep = None
        try:
            with download_wording():
                if limit > 0:
                    available = len(list_images(root, export_format))
                    keep = select_slice(root, export_format, limit, seed)
        except ExportFormatError as error:
            if not source.is_file():
                raise
            # the unpacked copy is gone once this returns: name the member inside the user's zip
            raise ExportFormatError(name_user_files(str(error), unpacked, f"{source}:")) from None
        copy_export(root, dest, export_format, keep)
    record: dict[str, Any] = {"kind": "zip" if source.is_file() else "folder", **describe_export(dest)}
    if keep is not None:
        record["slice"] = {"limit": limit, "images_available": available, "images_kept": len(keep)}
    return record


def select_slice(root: Path, export_format: str, limit: int, seed: int) -> set[str]:
    """A seeded choice of at most `limit` images (relative paths), whole source groups at a time.

    Groups (an image and its augmented copies, in any split folder) are visited in a seeded
    random order and taken when they still fit, so a slice never splits a group and reaches
    `limit` unless only groups too large to fit are left.
    """
    groups: dict[str, list[str]] = {}
    for relative in list_images(root, export_format):
        groups.setdefault(source_group(image_id_of(relative)), []).append(relative)
    names = sorted(groups)
    kept: list[str] = []
    for position in np.random.default_rng(seed).permutation(len(names)):
        members = groups[names[position]]
        if len(kept) + len(members) <= limit:
            kept += members
        if len(kept) == limit:
            break
    return set(kept)


def copy_export(root: Path, dest: Path, export_format: str, keep: set[str] | None) -> None:
    """Copy the export's files into `dest` (bytes unchanged); with `keep`, only those images.

    Copies file contents only, not permissions: a read-only source (a shared folder) must not
    give a `data/raw` that DVC cannot remove.
    """
    kept_labels = None
    if keep is not None and export_format == "yolo":
        kept_labels = {str(PurePosixPath(p).parent.parent / "labels" / (PurePosixPath(p).stem + ".txt")) for p in keep}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        target = dest / relative
        if keep is not None:
            if is_image_file(path) and relative not in keep:
                continue
            if kept_labels is not None and path.parent.name == "labels" and relative not in kept_labels:
                continue
            if export_format == "coco" and path.name == COCO_ANNOTATIONS:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(_filter_coco(read_coco(path), path.parent.name, keep)), encoding="utf-8")
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _filter_coco(document: dict[str, Any], split: str, keep: set[str]) -> dict[str, Any]:
    """The same document with only the kept images and their annotations (ids unchanged)."""
    images = [image for image in document["images"] if f"{split}/{image['file_name']}" in keep]
    image_ids = {image["id"] for image in images}
    annotations = [a for a in coco_annotations(document) if isinstance(a, dict) and a.get("image_id") in image_ids]
    return {**document, "images": images, "annotations": annotations}
