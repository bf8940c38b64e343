"""Roboflow exports (COCO or YOLO) -> one binary mask per (image, prompt), an image index, a report.

Output contract (docs/architecture.md): `data/masks/<dataset>/<image_id>__<prompt_slug>.png`, single
channel `L`, values exactly {0, 255}, the image's real size (read from the file), the union of every
instance of the dataset's labelled categories; an image without annotations gets an empty mask.

Accounting: every annotation and every image of the export ends up either converted or skipped with
exactly one reason, the first defect found in this order: while parsing (`malformed`, `unknown_image`,
`unknown_category`, `polygon_lt_3_points`, `zero_area_box`), then its image (`missing_image_file`,
`unreadable_image`, `duplicate_image_id`), then on the image (`rle_size_mismatch`, `outside_image`,
`no_pixels`). The totals are checked before anything is written (`AccountingError`). Repairs that
keep an annotation are counted as fixes (`clipped_out_of_bounds`, `bbox_fallback`,
`dropped_polygon_parts`). An image whose annotations all fail is skipped (`all_annotations_skipped`)
rather than kept as a negative it may not be.

Sizes: masks take the size of the decoded file; a COCO `width`/`height` that differs is counted
(`size_mismatch`, per image) and annotations are drawn in the file's pixel coordinates, clipped.

Duplicates: an `image_id` (file stem) seen twice in one dataset, e.g. the same file in two Roboflow
split folders, keeps the first copy in folder order train, valid, val, test, then alphabetical; a
later copy with identical bytes is skipped (`duplicate_image_id`, with its annotations), a later copy
with different bytes raises `DuplicateImageError` because masks are keyed by image id and one of the
two labelings would silently overwrite the other.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from filecmp import cmp as same_file_bytes
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from drywall_qa.contracts.atomic import replace_dir, write_json_atomic
from drywall_qa.contracts.manifest import write_images_csv
from drywall_qa.contracts.masks import encode_mask
from drywall_qa.contracts.naming import image_id_of, mask_file_name, source_group
from drywall_qa.contracts.roboflow import (
    COCO_ANNOTATIONS,
    YOLO_DATA_FILE,
    coco_split_dirs,
    detect_format,
    is_id,
    is_image_file,
    load_coco,
    read_yolo_names,
    split_folder_order,
    yolo_label_lines,
    yolo_split_dirs,
)
from drywall_qa.errors import DrywallQAError

# Every reason is always present in the report (zero or not) so `dvc metrics diff` compares like with like.
ANNOTATION_SKIP_REASONS = (
    "malformed",  # not a dict, no/invalid category_id, bbox or coordinates that are not numbers
    "unknown_image",  # COCO image_id not in `images`
    "unknown_category",  # category id not in `categories` (YOLO: class index not in data.yaml names)
    "polygon_lt_3_points",  # no polygon part with at least 3 points
    "zero_area_box",  # box width or height <= 0
    "rle_size_mismatch",  # RLE `size` differs from the image's real size
    "outside_image",  # box entirely outside the image
    "no_pixels",  # valid geometry that covers no pixel centre (degenerate/collinear polygon, sliver box)
    "missing_image_file",
    "unreadable_image",
    "duplicate_image_id",
)
IMAGE_SKIP_REASONS = ("missing_image_file", "unreadable_image", "duplicate_image_id", "all_annotations_skipped")
ANNOTATION_FIXES = ("clipped_out_of_bounds", "bbox_fallback", "dropped_polygon_parts")
MAX_LISTED_FILES = 20  # file names listed per skip reason in the report


class ConversionError(DrywallQAError):
    """An export that cannot be converted; the stage prints the message and exits non-zero."""


class DuplicateImageError(ConversionError):
    """Two different files share one image id inside a dataset."""


class AccountingError(ConversionError):
    """The conversion report does not add up: a bug, never expected on any input."""


@dataclass
class Shape:
    """One annotation's geometry, validated but not yet placed on an image (the real size is unknown)."""

    kind: str  # "polygon" | "box" | "rle"
    data: Any  # polygon: list of flat [x, y, ...] lists; box: (x, y, w, h); rle: {"size", "counts"}
    normalised: bool = False  # YOLO: coordinates are fractions of the width/height
    bbox_fallback: bool = False  # COCO annotation with an empty segmentation, drawn from its bbox
    dropped_parts: int = 0  # polygon parts with fewer than 3 points left out


@dataclass
class SourceImage:
    image_id: str
    path: Path
    source_split: str
    declared_size: tuple[int, int] | None  # (width, height) from COCO json; None for YOLO
    shapes: list[Shape] = field(default_factory=list)
    annotation_skips: Counter = field(default_factory=Counter)  # defects found while parsing

    @property
    def annotations_seen(self) -> int:
        return len(self.shapes) + sum(self.annotation_skips.values())


@dataclass
class Export:
    format: str  # "coco" | "yolo"
    images: list[SourceImage]
    categories_used: dict[str, str]  # id (str, for JSON) -> name
    superclasses_ignored: dict[str, str]
    orphan_skips: Counter  # annotations attached to no listed image, by reason
    unlisted_files: list[str]  # image files on disk that the annotations do not list


# ---------------------------------------------------------------- reading exports
# The files are read and checked by contracts.roboflow (MalformedAnnotationsError); here each
# annotation becomes a Shape or a counted skip reason.


def read_export(dataset_dir: Path) -> Export:
    fmt = detect_format(dataset_dir)
    return read_coco_export(dataset_dir) if fmt == "coco" else read_yolo_export(dataset_dir)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pure_superclasses(categories: list[dict], annotated_ids: set) -> set:
    """Ids of categories that only name a group of others (Roboflow's id 0) and label nothing."""
    parent_names = {c.get("supercategory") for c in categories}
    return {c["id"] for c in categories if c.get("name") in parent_names and c["id"] not in annotated_ids}


def read_coco_export(dataset_dir: Path) -> Export:
    images: list[SourceImage] = []
    orphan_skips: Counter = Counter()
    categories_used: dict[str, str] = {}
    superclasses: dict[str, str] = {}
    unlisted: list[str] = []
    for split_dir in coco_split_dirs(dataset_dir):
        coco = load_coco(split_dir / COCO_ANNOTATIONS)
        categories = coco["categories"]
        annotated = {
            a["category_id"] for a in coco["annotations"] if isinstance(a, dict) and _is_number(a.get("category_id"))
        }
        superclass_ids = pure_superclasses(categories, annotated)
        used_ids = {c["id"] for c in categories} - superclass_ids
        for category in categories:
            target = superclasses if category["id"] in superclass_ids else categories_used
            target[str(category["id"])] = str(category.get("name"))

        by_coco_id: dict[Any, SourceImage] = {}
        for entry in coco["images"]:
            width, height = entry.get("width"), entry.get("height")
            declared = (int(width), int(height)) if _is_number(width) and _is_number(height) else None
            image = SourceImage(
                image_id=image_id_of(entry["file_name"]),
                path=split_dir / entry["file_name"],
                source_split=split_dir.name,
                declared_size=declared,
            )
            by_coco_id[entry["id"]] = image
            images.append(image)

        for annotation in coco["annotations"]:
            if not (isinstance(annotation, dict) and is_id(annotation.get("image_id"))):
                orphan_skips["malformed"] += 1
            elif annotation["image_id"] not in by_coco_id:
                orphan_skips["unknown_image"] += 1
            else:
                image = by_coco_id[annotation["image_id"]]
                shape_or_reason = coco_shape(annotation, used_ids)
                if isinstance(shape_or_reason, Shape):
                    image.shapes.append(shape_or_reason)
                else:
                    image.annotation_skips[shape_or_reason] += 1

        listed = {Path(e["file_name"]).name for e in coco["images"]}
        unlisted += sorted(
            f"{split_dir.name}/{p.name}" for p in split_dir.iterdir() if is_image_file(p) and p.name not in listed
        )
    return Export("coco", images, categories_used, superclasses, orphan_skips, unlisted)


def coco_shape(annotation: dict, used_category_ids: set) -> Shape | str:
    """A COCO annotation -> its Shape, or the reason it is skipped."""
    category = annotation.get("category_id")
    if not _is_number(category):
        return "malformed"
    if category not in used_category_ids:
        return "unknown_category"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict) and segmentation:
        return _coco_rle_shape(segmentation)
    if isinstance(segmentation, list) and any(part != [] for part in segmentation):
        return polygon_shape(segmentation, normalised=False)
    if segmentation not in (None, [], {}) and not isinstance(segmentation, list):
        return "malformed"
    # Empty segmentation (Roboflow's box-only projects, a few crack annotations): draw the bbox.
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return "malformed"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "zero_area_box"
    return Shape("box", tuple(float(v) for v in bbox), bbox_fallback=True)


def polygon_shape(parts: list, normalised: bool) -> Shape | str:
    if not all(isinstance(part, list) and all(_is_number(v) for v in part) for part in parts):
        return "malformed"
    if any(len(part) % 2 for part in parts):
        return "malformed"
    kept = [[float(v) for v in part] for part in parts if len(part) >= 6]
    if not kept:
        return "polygon_lt_3_points"
    return Shape("polygon", kept, normalised=normalised, dropped_parts=len(parts) - len(kept))


def _coco_rle_shape(rle: dict) -> Shape | str:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return "malformed"
    if isinstance(counts, str):
        # pycocotools decodes a truncated or corrupt string into arbitrary memory instead of failing.
        decoded = rle_counts_from_string(counts)
        if decoded is None or any(c < 0 for c in decoded) or sum(decoded) != size[0] * size[1]:
            return "malformed"
        return Shape("rle", {"size": size, "counts": counts.encode("ascii")})
    if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
        if sum(counts) != size[0] * size[1]:
            return "malformed"
        return Shape("rle", {"size": size, "counts": counts})
    return "malformed"


def rle_counts_from_string(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString), None if it is cut short."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def read_yolo_export(dataset_dir: Path) -> Export:
    names = read_yolo_names(dataset_dir / YOLO_DATA_FILE)
    images: list[SourceImage] = []
    orphan_skips: Counter = Counter()
    unlisted: list[str] = []
    for split_dir in yolo_split_dirs(dataset_dir):
        image_files = {}
        for path in sorted((split_dir / "images").iterdir()):
            if is_image_file(path):
                image_files[path.stem] = path
            else:
                unlisted.append(f"{split_dir.name}/images/{path.name}")
        label_dir = split_dir / "labels"
        label_files = {p.stem: p for p in label_dir.glob("*.txt")} if label_dir.is_dir() else {}
        for stem, path in image_files.items():
            image = SourceImage(image_id_of(path.name), path, split_dir.name, declared_size=None)
            lines = yolo_label_lines(label_files[stem]) if stem in label_files else []
            for line in lines:
                shape_or_reason = yolo_shape(line, names)
                if isinstance(shape_or_reason, Shape):
                    image.shapes.append(shape_or_reason)
                else:
                    image.annotation_skips[shape_or_reason] += 1
            images.append(image)
        for stem in sorted(set(label_files) - set(image_files)):
            orphan_skips["missing_image_file"] += len(yolo_label_lines(label_files[stem]))
    used = {str(k): v for k, v in names.items()}
    return Export("yolo", images, used, {}, orphan_skips, unlisted)


def yolo_shape(line: str, names: dict[int, str]) -> Shape | str:
    """`cls cx cy w h` (box) or `cls x1 y1 x2 y2 ...` (polygon), all normalised to [0, 1]."""
    try:
        values = [float(token) for token in line.split()]
    except ValueError:
        return "malformed"
    if not all(math.isfinite(v) for v in values) or values[0] != int(values[0]):
        return "malformed"
    if int(values[0]) not in names:
        return "unknown_category"
    coords = values[1:]
    if not coords:
        return "malformed"
    if len(coords) == 4:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            return "zero_area_box"
        return Shape("box", (cx - w / 2, cy - h / 2, w, h), normalised=True)
    return polygon_shape([coords], normalised=True)


# ---------------------------------------------------------------- rasterising


def shape_to_rle(shape: Shape, width: int, height: int) -> tuple[dict | None, str | None, bool]:
    """Place a shape on a `height` x `width` image: (rle, skip reason, clipped)."""
    sx, sy = (width, height) if shape.normalised else (1.0, 1.0)
    if shape.kind == "rle":
        if list(shape.data["size"]) != [height, width]:
            return None, "rle_size_mismatch", False
        if isinstance(shape.data["counts"], list):
            rle = mask_utils.frPyObjects(shape.data, height, width)
        else:
            rle = dict(shape.data)
        clipped = False
    elif shape.kind == "box":
        x, y, w, h = shape.data
        x0, y0, x1, y1 = x * sx, y * sy, (x + w) * sx, (y + h) * sy
        clipped = x0 < 0 or y0 < 0 or x1 > width or y1 > height
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            return None, "outside_image", clipped
        rle = mask_utils.frPyObjects([[x0, y0, x1, y0, x1, y1, x0, y1]], height, width)[0]
    else:
        parts = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(part)] for part in shape.data]
        clipped = any(
            min(part[0::2]) < 0 or min(part[1::2]) < 0 or max(part[0::2]) > width or max(part[1::2]) > height
            for part in parts
        )
        # pycocotools clips to the image while rasterising; pixels whose centre is inside are set.
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    if mask_utils.area(rle) == 0:
        return None, "no_pixels", clipped
    return rle, None, clipped


def read_image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) after a full decode (which is what detects truncated files), or a skip reason."""
    if not path.is_file():
        return None, "missing_image_file"
    try:
        with Image.open(path) as image:
            image.load()
            return image.size, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, "unreadable_image"


# ---------------------------------------------------------------- converting


@dataclass
class DatasetTally:
    annotation_skips: Counter = field(default_factory=Counter)
    image_skips: Counter = field(default_factory=Counter)
    skipped_files: dict[str, list[str]] = field(default_factory=dict)
    fixes: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    size_mismatch: list[str] = field(default_factory=list)
    annotations_seen: int = 0
    annotations_converted: int = 0
    images_seen: int = 0
    empty_masks: int = 0
    masks_written: int = 0

    def skip_image(self, image: SourceImage, reason: str, shapes_pending: bool = True) -> None:
        """Skip an image; with `shapes_pending`, its shapes (not yet accounted) are skipped for the same reason."""
        self.image_skips[reason] += 1
        self.skipped_files.setdefault(reason, []).append(f"{image.source_split}/{image.path.name}")
        if shapes_pending:
            self.annotation_skips[reason] += len(image.shapes)


def convert_dataset(
    dataset: str,
    dataset_dir: Path,
    prompts: list[str],
    masks_dir: Path,
    repo_root: Path,
) -> tuple[list[dict], dict]:
    """Convert one export; masks go to `masks_dir/<dataset>/`. Returns (images.csv rows, report)."""
    if not prompts:
        raise ConversionError(f"dataset {dataset!r} has no prompts in params.yaml")
    export = read_export(dataset_dir)
    out_dir = masks_dir / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    tally = DatasetTally()
    tally.annotation_skips.update(export.orphan_skips)
    tally.annotations_seen = sum(export.orphan_skips.values())
    kept: dict[str, SourceImage] = {}
    rows: list[dict] = []
    split_counts: Counter = Counter()

    for image in tqdm(export.images, desc=f"convert {dataset}", unit="img", mininterval=1.0):
        tally.images_seen += 1
        tally.annotations_seen += image.annotations_seen
        tally.annotation_skips.update(image.annotation_skips)
        size, reason = read_image_size(image.path)
        if size is None:
            tally.skip_image(image, reason)
            continue
        first = kept.get(image.image_id)
        if first is not None:
            if not same_file_bytes(first.path, image.path, shallow=False):
                raise DuplicateImageError(
                    f"{dataset}: image id {image.image_id!r} names two different files, "
                    f"{first.path} and {image.path}; masks are keyed by image id, so rename one"
                )
            tally.skip_image(image, "duplicate_image_id")
            continue
        kept[image.image_id] = image
        width, height = size
        if image.declared_size is not None and image.declared_size != size:
            tally.size_mismatch.append(f"{image.source_split}/{image.path.name}")

        rles = _drawable_shapes(image, width, height, tally)
        if image.annotations_seen > 0 and not rles:
            # Its labels existed but none could be drawn: an empty mask would teach a false negative.
            tally.skip_image(image, "all_annotations_skipped", shapes_pending=False)
            continue
        tally.annotations_converted += len(rles)
        if rles:
            mask = mask_utils.decode(mask_utils.merge(rles, intersect=0)) * np.uint8(255)
        else:
            mask = np.zeros((height, width), dtype=np.uint8)
            tally.empty_masks += 1
        png = encode_mask(mask)
        for prompt in prompts:
            (out_dir / mask_file_name(image.image_id, prompt)).write_bytes(png)
            tally.masks_written += 1
        split_counts[image.source_split] += 1
        rows.append(
            {
                "dataset": dataset,
                "image_id": image.image_id,
                "image_path": Path(os.path.relpath(image.path, repo_root)).as_posix(),
                "group": source_group(image.image_id),
                "source_split": image.source_split,
                "width": width,
                "height": height,
                "n_instances": len(rles),
            }
        )

    report = _dataset_report(export, tally, rows, prompts, split_counts)
    check_accounting(dataset, report, rows)
    return rows, report


def _drawable_shapes(image: SourceImage, width: int, height: int, tally: DatasetTally) -> list[dict]:
    """The RLEs of the image's shapes that can be drawn, each skip and fix counted in `tally`."""
    rles = []
    for shape in image.shapes:
        rle, skip, clipped = shape_to_rle(shape, width, height)
        if skip is not None:
            tally.annotation_skips[skip] += 1
            continue
        rles.append(rle)
        tally.by_kind[shape.kind] += 1
        tally.fixes["clipped_out_of_bounds"] += int(clipped)
        tally.fixes["bbox_fallback"] += int(shape.bbox_fallback)
        tally.fixes["dropped_polygon_parts"] += shape.dropped_parts
    return rles


def _dataset_report(export: Export, tally: DatasetTally, rows: list[dict], prompts: list[str], splits: Counter) -> dict:
    annotation_skips = {reason: tally.annotation_skips.get(reason, 0) for reason in ANNOTATION_SKIP_REASONS}
    unexpected = set(tally.annotation_skips) - set(ANNOTATION_SKIP_REASONS)
    if unexpected:
        raise AccountingError(f"annotation skip reasons without a report key: {sorted(unexpected)}")
    image_skips = {reason: tally.image_skips.get(reason, 0) for reason in IMAGE_SKIP_REASONS}
    return {
        "format": export.format,
        "prompts": list(prompts),
        "categories_used": export.categories_used,
        "superclasses_ignored": export.superclasses_ignored,
        "annotations": {
            "seen": tally.annotations_seen,
            "converted": tally.annotations_converted,
            "skipped": sum(annotation_skips.values()),
            "skipped_by_reason": annotation_skips,
            "converted_by_kind": {kind: tally.by_kind.get(kind, 0) for kind in ("polygon", "box", "rle")},
            "fixes": {fix: tally.fixes.get(fix, 0) for fix in ANNOTATION_FIXES},
        },
        "images": {
            "seen": tally.images_seen,
            "converted": len(rows),
            "skipped": sum(image_skips.values()),
            "skipped_by_reason": image_skips,
            "size_mismatch": len(tally.size_mismatch),
            "empty_masks": tally.empty_masks,
            "by_source_split": dict(sorted(splits.items(), key=lambda kv: split_folder_order(kv[0]))),
        },
        "masks_written": tally.masks_written,
        "unlisted_image_files": len(export.unlisted_files),
        "files": {
            "size_mismatch": tally.size_mismatch[:MAX_LISTED_FILES],
            **{reason: names[:MAX_LISTED_FILES] for reason, names in sorted(tally.skipped_files.items())},
            "unlisted_image_files": export.unlisted_files[:MAX_LISTED_FILES],
        },
    }


def check_accounting(dataset: str, report: dict, rows: list[dict]) -> None:
    """Raise AccountingError unless every annotation and image is converted or skipped exactly once."""
    annotations, images = report["annotations"], report["images"]
    checks = {
        "annotations seen = converted + skipped": annotations["seen"]
        == annotations["converted"] + annotations["skipped"],
        "skipped annotations = sum of reasons": annotations["skipped"]
        == sum(annotations["skipped_by_reason"].values()),
        "converted annotations = sum by kind": annotations["converted"]
        == sum(annotations["converted_by_kind"].values()),
        "converted annotations = instances in images.csv": annotations["converted"]
        == sum(row["n_instances"] for row in rows),
        "images seen = converted + skipped": images["seen"] == images["converted"] + images["skipped"],
        "skipped images = sum of reasons": images["skipped"] == sum(images["skipped_by_reason"].values()),
        "converted images = rows": images["converted"] == len(rows),
        "masks written = converted images x prompts": report["masks_written"] == len(rows) * len(report["prompts"]),
        "empty masks = rows without instances": images["empty_masks"] == sum(r["n_instances"] == 0 for r in rows),
        "image ids unique": len({r["image_id"] for r in rows}) == len(rows),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise AccountingError(f"{dataset}: conversion report does not add up: {'; '.join(failed)}")


def convert_all(
    raw_dir: str | Path,
    prompts: dict[str, list[str]],
    masks_dir: str | Path,
    images_csv: str | Path,
    report_path: str | Path,
    repo_root: str | Path = ".",
) -> dict:
    """Convert `raw_dir/<dataset>/` for every dataset in `prompts`; write masks, images.csv, the report.

    Masks are written into a temporary sibling folder that replaces `masks_dir` only once every
    dataset converted and its accounting checked, so a failed run leaves the previous masks intact.
    Returns the report.
    """
    raw_dir, masks_dir, repo_root = Path(raw_dir), Path(masks_dir), Path(repo_root)
    if not prompts:
        raise ConversionError("params.yaml `prompts` lists no dataset")
    masks_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = masks_dir.parent / f".{masks_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        all_rows: list[dict] = []
        per_dataset: dict[str, dict] = {}
        for dataset in sorted(prompts):
            rows, report = convert_dataset(dataset, raw_dir / dataset, prompts[dataset], staging, repo_root)
            per_dataset[dataset] = report
            all_rows += rows
        replace_dir(staging, masks_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    all_rows.sort(key=lambda row: (row["dataset"], row["image_id"]))
    report = {"datasets": per_dataset, "totals": _totals(per_dataset)}
    write_images_csv(images_csv, all_rows)
    write_json_atomic(report_path, report)
    return report


def _totals(per_dataset: dict[str, dict]) -> dict:
    reports = per_dataset.values()
    totals: dict[str, int] = {}
    for key in ("seen", "converted", "skipped"):
        totals[f"annotations_{key}"] = sum(r["annotations"][key] for r in reports)
        totals[f"images_{key}"] = sum(r["images"][key] for r in reports)
    totals["empty_masks"] = sum(r["images"]["empty_masks"] for r in reports)
    totals["masks_written"] = sum(r["masks_written"] for r in reports)
    return totals


# ---------------------------------------------------------------- preview


def preview_grid(export: Export, count: int = 16, columns: int = 4, tile: int = 192) -> np.ndarray | None:
    """RGB uint8 grid of the first `count` readable images of an export with the shapes conversion
    accepts drawn on them (outlines of what becomes the mask: polygons and RLE green, boxes red).

    It reads through the same parsing and placement as conversion (`read_export`, `shape_to_rle`),
    so it shows what the masks will hold and cannot fail on input that conversion counts as a skip.
    None when no image is readable.
    """
    import cv2

    tiles = []
    for image in export.images:
        if len(tiles) == count:
            break
        size, skip = read_image_size(image.path)
        if skip is not None:
            continue
        with Image.open(image.path) as opened:
            canvas = np.array(opened.convert("RGB"))
        width, height = size
        for shape in image.shapes:
            rle, _, _ = shape_to_rle(shape, width, height)
            if rle is None:
                continue
            mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            colour = (230, 0, 0) if shape.kind == "box" else (0, 220, 0)
            cv2.drawContours(canvas, contours, -1, colour, 2 if shape.kind == "box" else 1)
        canvas = cv2.resize(canvas, (tile, tile), interpolation=cv2.INTER_AREA)
        label = f"{image.source_split}/{image.image_id[:18]}"
        cv2.putText(canvas, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 255), 1, cv2.LINE_AA)
        tiles.append(canvas)
    if not tiles:
        return None
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    return np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
