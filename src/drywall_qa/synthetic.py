"""Seeded synthetic drywall photos, written as genuine Roboflow COCO exports.

The offline default of the pipeline. Each dataset imitates its real Roboflow export
(`/work/shared/realdata`, see docs/architecture.md) in every detail the pipeline relies on:

- `train/ valid/ test/`, each with `_annotations.coco.json` (compact JSON, keys `info`, `licenses`,
  `categories`, `images`, `annotations`) beside the JPEG images;
- category 0 is a superclass without annotations, the labelled class is id 1 and its
  `supercategory` is the superclass name;
- file names `<stem>_jpg.rf.<32 hex>.jpg` with `extra.name` = `<stem>.jpg`; some source images have
  augmented copies (flips, rotations, brightness, noise) under other hashes, in any split folder,
  so Roboflow's own split leaks exactly as the real taping export does;
- `bbox` in integers rounded half up, `area` = bbox width x height (Roboflow's convention),
  `iscrowd` 0; polygons closed (first vertex repeated) and inside the image;
- `cracks`: crack outlines as polygons, a few annotations with an empty `segmentation`
  (the real export has them; the converter falls back to the box);
- `taping`: drywall joints as boxes only (`segmentation: []`);
- a few images without any annotation (negatives).

Images look like painted drywall: paint texture, noise and a lighting gradient, with
distractors (board seams, screw pops, pencil marks, joint-compound smears) so a model has to
learn the shapes: cracks are thin, dark, branching and jagged; joints are straight bands of
slightly lighter or darker compound with feathered edges.

Same arguments => byte-identical files: every random draw comes from a generator seeded with
(seed, dataset, image index), and nothing depends on the clock.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from drywall_qa.contracts.roboflow import COCO_ANNOTATIONS
from drywall_qa.errors import DrywallQAError

# Fixed so that output never depends on when it was generated (byte-identical exports).
EXPORT_DATE = "2026-02-13T08:56:57+00:00"
# Roboflow's usual 70/20/10 split of the uploaded images into its folders.
ROBOFLOW_SPLITS: tuple[tuple[str, float], ...] = (("train", 0.7), ("valid", 0.2), ("test", 0.1))
JPEG_QUALITY = 90
AA = cv2.LINE_AA
SUBPIXEL_BITS = 4  # cv2 drawing with `shift`: coordinates in 1/16 pixel
SUBPIXEL = 1 << SUBPIXEL_BITS


class InvalidGeneratorParams(DrywallQAError, ValueError):
    """A `data.synthetic` parameter outside its range."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a synthetic export imitates: the real project's identity and its classes."""

    name: str  # the pipeline's dataset key
    workspace: str
    project: str
    version: int
    title: str  # Roboflow's project title, used in README.roboflow.txt
    superclass: str  # category 0 (never annotated)
    label: str  # category 1 (every annotation)
    geometry: str  # "polygons" | "boxes"
    stem_pattern: str  # source file stems, formatted with the source index


DATASET_SPECS: dict[str, DatasetSpec] = {
    "cracks": DatasetSpec(
        name="cracks",
        workspace="10xConstruction",
        project="cracks-3ii36",
        version=1,
        title="cracks",
        superclass="crack",
        label="NewCracks - v2 2024-05-18 10-54pm",
        geometry="polygons",
        stem_pattern="crack{:04d}_png",
    ),
    "taping": DatasetSpec(
        name="taping",
        workspace="objectdetect-pu6rn",
        project="drywall-join-detect",
        version=1,
        title="Drywall-Join-Detect",
        superclass="Drywall-Join",
        label="drywall-join",
        geometry="boxes",
        stem_pattern="IMG_{:04d}_JPG",
    ),
}


@dataclass
class Instance:
    """One annotation: a crack component (polygon) or a joint (box)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    polygon: np.ndarray | None = None  # (N, 2) vertices for cracks
    drop_segmentation: bool = False  # written with `segmentation: []` like a few real crack labels


@dataclass
class SourceImage:
    index: int
    stem: str
    pixels: np.ndarray  # float32 (H, W, 3), 0..255 before clipping
    instances: list[Instance] = field(default_factory=list)


# ---------------------------------------------------------------- public API


def generate_exports(
    dest_root: str | Path,
    seed: int,
    source_images: int,
    augmented_copies: int,
    augmented_fraction: float,
    negative_fraction: float,
    image_size: int,
    datasets: tuple[str, ...] = ("cracks", "taping"),
) -> dict[str, dict[str, Any]]:
    """Write `<dest_root>/<dataset>/` for each dataset; returns per dataset what was written."""
    return {
        name: generate_export(
            DATASET_SPECS[name],
            Path(dest_root) / name,
            seed=seed,
            source_images=source_images,
            augmented_copies=augmented_copies,
            augmented_fraction=augmented_fraction,
            negative_fraction=negative_fraction,
            image_size=image_size,
        )
        for name in datasets
    }


def generate_export(
    spec: DatasetSpec,
    dest: str | Path,
    seed: int,
    source_images: int,
    augmented_copies: int,
    augmented_fraction: float,
    negative_fraction: float,
    image_size: int,
) -> dict[str, Any]:
    """Write one Roboflow COCO export of `spec` into `dest` (created; must not hold an export)."""
    _check_arguments(source_images, augmented_copies, augmented_fraction, negative_fraction, image_size)
    dest = Path(dest)
    dataset_key = zlib.crc32(spec.name.encode())  # stable across Python runs, unlike hash()
    plan = np.random.default_rng([seed, dataset_key])
    n_negative = round(negative_fraction * source_images)
    n_augmented = round(augmented_fraction * source_images)
    negatives = set(plan.choice(source_images, size=n_negative, replace=False).tolist())
    augmented = set(plan.choice(source_images, size=n_augmented, replace=False).tolist())
    source_splits = _split_assignment(plan, source_images)
    split_names = [name for name, _ in ROBOFLOW_SPLITS]
    split_weights = np.array([weight for _, weight in ROBOFLOW_SPLITS])

    entries: list[tuple[str, str, list[dict[str, Any]]]] = []  # (split, file name, annotations)
    files: dict[str, bytes] = {}
    for index in range(source_images):
        rng = np.random.default_rng([seed, dataset_key, index])
        source = _render_source(spec, rng, index, image_size, negative=index in negatives)
        _mark_dropped_segmentations(spec, rng, source.instances)
        versions = [(source_splits[index], source.pixels, source.instances)]
        if index in augmented:
            for copy in range(augmented_copies):
                copy_rng = np.random.default_rng([seed, dataset_key, index, copy + 1])
                pixels, instances = augment(copy_rng, source.pixels, source.instances)
                split = split_names[copy_rng.choice(len(split_names), p=split_weights / split_weights.sum())]
                versions.append((split, pixels, instances))
        for split, pixels, instances in versions:
            jpeg = encode_jpeg(pixels)
            # Roboflow's hash differs per copy; the content hash is as unique and reproducible.
            file_name = f"{source.stem}_jpg.rf.{hashlib.md5(jpeg).hexdigest()}.jpg"
            files[f"{split}/{file_name}"] = jpeg
            entries.append((split, file_name, [coco_annotation(spec, inst) for inst in instances]))

    dest.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"splits": {}}
    for split in split_names:
        split_entries = [entry for entry in entries if entry[0] == split]
        if not split_entries:
            continue
        (dest / split).mkdir()
        document = _coco_document(spec, split_entries, image_size)
        for _, file_name, _ in split_entries:
            (dest / split / file_name).write_bytes(files[f"{split}/{file_name}"])
        (dest / split / COCO_ANNOTATIONS).write_text(json.dumps(document), encoding="utf-8")
        summary["splits"][split] = {"images": len(document["images"]), "annotations": len(document["annotations"])}
    (dest / "README.roboflow.txt").write_text(_readme(spec, seed, len(entries)), encoding="utf-8")
    summary["images"] = len(entries)
    summary["annotations"] = sum(len(annotations) for _, _, annotations in entries)
    summary["source_images"] = source_images
    summary["negative_source_images"] = n_negative
    summary["augmented_source_images"] = n_augmented
    return summary


def augment(
    rng: np.random.Generator, pixels: np.ndarray, instances: list[Instance]
) -> tuple[np.ndarray, list[Instance]]:
    """A Roboflow-style augmented copy: geometric ops move the annotations with the pixels."""
    size = pixels.shape[0]
    ops: list[tuple[str, int]] = []
    if rng.random() < 0.5:
        ops.append(("hflip", 0))
    if rng.random() < 0.3:
        ops.append(("vflip", 0))
    if rng.random() < 0.3:
        ops.append(("rot90", int(rng.integers(1, 4))))
    if not ops:
        ops.append(("hflip", 0))  # every copy differs geometrically from its source
    out = pixels
    points_of = [inst.polygon.copy() if inst.polygon is not None else _box_corners(inst.box) for inst in instances]
    for op, k in ops:
        if op == "hflip":
            out = out[:, ::-1]
            points_of = [np.column_stack([size - p[:, 0], p[:, 1]]) for p in points_of]
        elif op == "vflip":
            out = out[::-1, :]
            points_of = [np.column_stack([p[:, 0], size - p[:, 1]]) for p in points_of]
        else:  # np.rot90 turns counter-clockwise: pixel (x, y) goes to (y, size - x)
            out = np.rot90(out, k)
            for _ in range(k):
                points_of = [np.column_stack([p[:, 1], size - p[:, 0]]) for p in points_of]
    out = np.ascontiguousarray(out) * rng.uniform(0.88, 1.12) + rng.uniform(-14, 14)  # contrast, brightness
    if rng.random() < 0.4:
        out = out + rng.normal(0, rng.uniform(2, 5), out.shape).astype(np.float32)
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 0.9))
    moved = []
    for inst, points in zip(instances, points_of, strict=True):
        if inst.polygon is not None:
            moved.append(Instance(_bounds(points), polygon=points, drop_segmentation=inst.drop_segmentation))
        else:
            moved.append(Instance(_bounds(points)))
    return out.astype(np.float32), moved


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def coco_annotation(spec: DatasetSpec, inst: Instance) -> dict[str, Any]:
    """The annotation without ids (added when the split's document is assembled)."""
    x0, y0, x1, y1 = inst.box
    x, y = _round_half_up(x0), _round_half_up(y0)
    width, height = max(1, _round_half_up(x1 - x0)), max(1, _round_half_up(y1 - y0))
    segmentation: list[list[float]] = []
    if inst.polygon is not None and not inst.drop_segmentation:
        ring = np.vstack([inst.polygon, inst.polygon[:1]])  # Roboflow closes the ring
        segmentation = [[_number(v) for v in ring.reshape(-1)]]
    return {
        "category_id": 1,
        "bbox": [x, y, width, height],
        "area": width * height,
        "segmentation": segmentation,
        "iscrowd": 0,
    }


# ---------------------------------------------------------------- export assembly


def _check_arguments(
    source_images: int, augmented_copies: int, augmented_fraction: float, negative_fraction: float, image_size: int
) -> None:
    if source_images < 1:
        raise InvalidGeneratorParams(f"data.synthetic.source_images must be >= 1, got {source_images}")
    if augmented_copies < 0:
        raise InvalidGeneratorParams(f"data.synthetic.augmented_copies must be >= 0, got {augmented_copies}")
    for name, value in (("augmented_fraction", augmented_fraction), ("negative_fraction", negative_fraction)):
        if not 0.0 <= value <= 1.0:
            raise InvalidGeneratorParams(f"data.synthetic.{name} must be within [0, 1], got {value}")
    if image_size < 64:
        raise InvalidGeneratorParams(f"data.synthetic.image_size must be >= 64 pixels, got {image_size}")


def _split_assignment(rng: np.random.Generator, count: int) -> list[str]:
    """Roboflow's folder of each source image: exact 70/20/10 counts, shuffled."""
    labels: list[str] = []
    for position, (name, fraction) in enumerate(ROBOFLOW_SPLITS):
        last = position == len(ROBOFLOW_SPLITS) - 1
        labels += [name] * (count - len(labels) if last else round(fraction * count))
    labels = labels[:count]
    return [labels[i] for i in rng.permutation(count)]


def _coco_document(spec: DatasetSpec, entries: list, image_size: int) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, (_, file_name, image_annotations) in enumerate(entries):
        stem = file_name.split("_jpg.rf.")[0]
        images.append(
            {
                "id": image_id,
                "license": 1,
                "file_name": file_name,
                "height": image_size,
                "width": image_size,
                "date_captured": EXPORT_DATE,
                "extra": {"name": f"{stem}.jpg"},
            }
        )
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    return {
        "info": {
            "year": EXPORT_DATE[:4],
            "version": str(spec.version),
            "description": "Synthetic stand-in for the Roboflow export, generated by drywall-qa",
            "contributor": "",
            "url": f"https://app.roboflow.com/datasets/{spec.project}/{spec.version}",
            "date_created": EXPORT_DATE,
        },
        "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
        "categories": [
            {"id": 0, "name": spec.superclass, "supercategory": "none"},
            {"id": 1, "name": spec.label, "supercategory": spec.superclass},
        ],
        "images": images,
        "annotations": annotations,
    }


def _readme(spec: DatasetSpec, seed: int, image_count: int) -> str:
    return (
        f"\n{spec.title} - v{spec.version} (synthetic)\n==============================\n\n"
        f"This dataset was generated offline by drywall-qa (seed {seed}) in the layout of a\n"
        f"roboflow.com export of {spec.workspace}/{spec.project}.\n\n"
        f"The dataset includes {image_count} images.\n"
        f"{spec.superclass.capitalize()} are annotated in COCO format.\n"
    )


def _mark_dropped_segmentations(spec: DatasetSpec, rng: np.random.Generator, instances: list[Instance]) -> None:
    """About 2% of real crack annotations lack a polygon; do the same so the box fallback is used."""
    if spec.geometry != "polygons":
        return
    for inst in instances:
        inst.drop_segmentation = bool(rng.random() < 0.04)


# ---------------------------------------------------------------- rendering


def _render_source(spec: DatasetSpec, rng: np.random.Generator, index: int, size: int, negative: bool) -> SourceImage:
    pixels = _wall(rng, size)
    _add_distractors(rng, pixels)
    instances: list[Instance] = []
    if not negative:
        if spec.geometry == "polygons":
            for _ in range(int(rng.choice([1, 1, 1, 1, 2, 2, 3, 4]))):
                instances += _add_crack(rng, pixels)
        else:
            placed: list[tuple[bool, float, float]] = []
            for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
                joint = _add_joint(rng, pixels, placed)
                if joint is not None:
                    instances.append(joint)
    return SourceImage(index, spec.stem_pattern.format(index), pixels, instances)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise blurred to `sigma` pixels, rescaled to unit standard deviation."""
    if sigma > 4:  # large blurs: blur a small field and upscale (same look, far cheaper)
        factor = int(sigma // 2)
        small = max(4, size // factor)
        field_ = cv2.GaussianBlur(rng.standard_normal((small, small)).astype(np.float32), (0, 0), sigma / factor)
        field_ = cv2.resize(field_, (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        field_ = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return field_ / max(float(field_.std()), 1e-6)


def _wall(rng: np.random.Generator, size: int) -> np.ndarray:
    """Painted board: off-white paint, lighting gradient and falloff, mottling, orange-peel texture, grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    lum = np.full((size, size), rng.uniform(165, 212), np.float32)
    lum += rng.uniform(6, 26) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    cx, cy = rng.uniform(0.1, 0.9, 2)
    lum -= rng.uniform(0, 30) * ((xx - cx) ** 2 + (yy - cy) ** 2)
    lum += rng.uniform(1.5, 5) * _smooth_noise(rng, size, size / 10)
    lum += rng.uniform(1.5, 4.5) * _smooth_noise(rng, size, rng.uniform(0.8, 1.6))
    lum += rng.uniform(1, 3) * rng.standard_normal((size, size)).astype(np.float32)
    warmth = rng.uniform(-4, 6)  # warm or cool white paint
    tint = np.array([warmth, 0.3 * warmth, -warmth], np.float32) + rng.normal(0, 1.5, 3).astype(np.float32)
    return lum[..., None] + tint


def _canvas(size: int) -> np.ndarray:
    return np.zeros((size, size), np.uint8)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> cv2's fixed-point integers for drawing with `shift`."""
    return np.rint(np.asarray(points) * SUBPIXEL).astype(np.int32)


def _shade(pixels: np.ndarray, alpha: np.ndarray, delta: float) -> None:
    """Add `delta` grey levels where `alpha` (0..1) is set, in place."""
    pixels += (alpha * delta)[..., None]


def _add_distractors(rng: np.random.Generator, pixels: np.ndarray) -> None:
    size = pixels.shape[0]
    scale = size / 256
    if rng.random() < 0.35:  # board seam: a straight faint hairline across the image
        canvas = _canvas(size)
        pos = rng.uniform(0.1, 0.9) * size
        ends = [(pos, -2), (pos + rng.normal(0, 2), size + 2)]
        if rng.random() < 0.5:
            ends = [(y, x) for x, y in ends]
        cv2.line(canvas, *[tuple(_fixed(e)) for e in ends], 255, 1, AA, SUBPIXEL_BITS)
        alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), 0.6)
        _shade(pixels, alpha, -rng.uniform(12, 28))
    if rng.random() < 0.5:  # screw pops: small dimples with a lit rim, in a row along a stud
        vertical = rng.random() < 0.5
        line = rng.uniform(0.1, 0.9) * size
        spacing = rng.uniform(0.22, 0.35) * size
        start = rng.uniform(0.02, 0.2) * size
        for along in np.arange(start, size, spacing):
            if rng.random() < 0.25:
                continue
            x, y = (line + rng.normal(0, 1.5), along) if vertical else (along, line + rng.normal(0, 1.5))
            radius = rng.uniform(1.5, 3.2) * scale
            dimple, rim = _canvas(size), _canvas(size)
            cv2.circle(dimple, tuple(_fixed((x, y))), int(radius * SUBPIXEL), 255, -1, AA, SUBPIXEL_BITS)
            offset = rng.uniform(0.6, 1.2) * scale
            cv2.circle(rim, tuple(_fixed((x - offset, y - offset))), int(radius * SUBPIXEL), 255, -1, AA, SUBPIXEL_BITS)
            dimple_alpha = cv2.GaussianBlur(dimple.astype(np.float32) / 255, (0, 0), 0.8)
            rim_alpha = np.clip(cv2.GaussianBlur(rim.astype(np.float32) / 255, (0, 0), 0.8) - dimple_alpha, 0, 1)
            _shade(pixels, dimple_alpha, -rng.uniform(15, 35))
            _shade(pixels, rim_alpha, rng.uniform(8, 20))
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):  # pencil: thin, straight, mid-gray strokes
        canvas = _canvas(size)
        x, y = rng.uniform(0.05, 0.95, 2) * size
        length = rng.uniform(0.06, 0.3) * size
        angle = rng.choice([0, np.pi / 2, rng.uniform(0, np.pi)])
        strokes = [angle] if rng.random() < 0.7 else [angle + np.pi / 4, angle - np.pi / 4]  # a line or an X
        for a in strokes:
            dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
            ends = _fixed([(x - dx, y - dy), (x + dx, y + dy)])
            cv2.line(canvas, tuple(ends[0]), tuple(ends[1]), 255, 1, AA, SUBPIXEL_BITS)
        alpha = canvas.astype(np.float32) / 255 * rng.uniform(0.6, 1.0)
        _shade(pixels, alpha, -rng.uniform(25, 50))
    for _ in range(int(rng.choice([0, 1, 1, 2]))):  # compound smear: soft irregular blob, smoother than paint
        canvas = _canvas(size)
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        for _ in range(int(rng.integers(2, 5))):
            axes = (int(rng.uniform(0.03, 0.12) * size), int(rng.uniform(0.02, 0.07) * size))
            center = (int(cx + rng.normal(0, 0.04 * size)), int(cy + rng.normal(0, 0.04 * size)))
            cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 255, -1, AA)
        alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), rng.uniform(3, 8) * scale)
        _compound(rng, pixels, alpha, rng.uniform(5, 16) * rng.choice([1, 1, -1]))


def _compound(rng: np.random.Generator, pixels: np.ndarray, alpha: np.ndarray, delta: float) -> None:
    """Joint compound over paint: locally smoother, shifted in brightness, with faint trowel streaks."""
    smooth = cv2.GaussianBlur(pixels, (0, 0), 1.5)
    streaks = rng.uniform(1, 3) * _smooth_noise(rng, pixels.shape[0], 2.0)
    target = smooth + (delta + streaks)[..., None]
    pixels += alpha[..., None] * (target - pixels)


def _add_joint(
    rng: np.random.Generator, pixels: np.ndarray, placed: list[tuple[bool, float, float]]
) -> Instance | None:
    """A taped joint: a straight band of compound with feathered edges; the box covers the band.

    `placed` holds (horizontal, centre, width) of the joints already drawn: parallel joints are a
    board's width apart, so a new one too close to a parallel one is not drawn (None).
    """
    size = pixels.shape[0]
    width = rng.uniform(0.06, 0.2) * size
    center = rng.uniform(0.15, 0.85) * size
    horizontal = bool(rng.random() < 0.5)
    for other_horizontal, other_center, other_width in placed:
        if other_horizontal == horizontal and abs(center - other_center) < (width + other_width) / 2 + 0.3 * size:
            return None
    placed.append((horizontal, center, width))
    if rng.random() < 0.7:  # most joints run across the whole picture
        start, end = -0.1 * size, 1.1 * size
    else:  # butt joints and partial views end inside the picture
        start, end = rng.uniform(-0.1, 0.35) * size, rng.uniform(0.65, 1.1) * size
    corners = np.array(
        [[center - width / 2, start], [center + width / 2, start], [center + width / 2, end], [center - width / 2, end]]
    )
    tilt = np.deg2rad(rng.uniform(-12, 12)) if rng.random() < 0.15 else 0.0
    if horizontal:  # swap axes
        corners = corners[:, ::-1].copy()
    if tilt:
        pivot = np.array([size / 2, size / 2])
        rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
        corners = (corners - pivot) @ rotation.T + pivot
    x0, y0 = np.clip(corners.min(axis=0), 0, size)
    x1, y1 = np.clip(corners.max(axis=0), 0, size)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    canvas = _canvas(size)
    cv2.fillPoly(canvas, [_fixed(corners)], 255, AA, SUBPIXEL_BITS)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), width * rng.uniform(0.06, 0.16))
    delta = rng.uniform(8, 22) * (1 if rng.random() < 0.7 else -1)
    _compound(rng, pixels, alpha, delta)
    if rng.random() < 0.4:  # paper tape showing through thin compound: a faint centre line
        line = _canvas(size)
        mid_a, mid_b = (corners[0] + corners[1]) / 2, (corners[2] + corners[3]) / 2
        cv2.line(line, tuple(_fixed(mid_a)), tuple(_fixed(mid_b)), 255, 1, AA, SUBPIXEL_BITS)
        _shade(pixels, cv2.GaussianBlur(line.astype(np.float32) / 255, (0, 0), 0.8), -rng.uniform(4, 10))
    return Instance((float(x0), float(y0), float(x1), float(y1)))


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float) -> np.ndarray:
    """A jagged crack path: a random walk whose direction keeps returning to `heading`."""
    points = [start]
    direction = heading
    for _ in range(max(2, int(length / step))):
        direction += rng.normal(0, 0.45) + 0.3 * (heading - direction)
        points.append(points[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(direction), np.sin(direction)]))
    return np.array(points)


def _add_crack(rng: np.random.Generator, pixels: np.ndarray) -> list[Instance]:
    """Draw one branching crack; returns one instance per connected part inside the image."""
    size = pixels.shape[0]
    scale = size / 256
    for _attempt in range(10):
        heading = rng.uniform(0, 2 * np.pi)
        trunk = _walk(rng, rng.uniform(0.1, 0.9, 2) * size, heading, rng.uniform(0.3, 0.9) * size, 4 * scale)
        paths = [(trunk, rng.uniform(1.6, 3.4) * scale)]
        for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):  # branches leave the trunk at an angle
            at = int(rng.integers(1, len(trunk) - 1))
            angle = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
            branch = _walk(rng, trunk[at], angle, rng.uniform(0.1, 0.35) * size, 3.5 * scale)
            paths.append((branch, paths[0][1] * rng.uniform(0.45, 0.8)))
        drawn = _canvas(size)
        for path, width in paths:
            _draw_tapered(drawn, path, width)
        if int((drawn > 0).sum()) >= 12 * scale**2:
            break
    depth = rng.uniform(0.4, 0.7)  # cracks are shadows: multiply the paint down
    alpha = cv2.GaussianBlur(drawn.astype(np.float32) / 255, (0, 0), 0.5)
    pixels *= (1 - depth * alpha)[..., None]
    # The annotated outline: the crack's pixels grown by one pixel, as an annotator traces around it.
    footprint = cv2.dilate((drawn > 40).astype(np.uint8), np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(footprint, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    instances = []
    for contour in sorted(contours, key=lambda c: tuple(c[0, 0])):  # fixed order: deterministic ids
        simplified = cv2.approxPolyDP(contour, 0.7, True)
        ring = (simplified if len(simplified) >= 3 else contour).reshape(-1, 2).astype(np.float64)
        if len(ring) < 3:
            continue  # a contour of < 3 vertices has no area (a 1-2 pixel sliver at the border)
        # contour vertices are pixel indices; +0.5 puts them on pixel centres in COCO coordinates
        polygon = np.clip(ring + 0.5, 0, size)
        instances.append(Instance(_bounds(polygon), polygon=polygon))
    return instances


def _draw_tapered(canvas: np.ndarray, path: np.ndarray, width: float) -> None:
    """Thickest at the start, thinning towards the tip, in three pieces."""
    pieces = np.array_split(np.arange(len(path)), 3)
    for number, piece in enumerate(pieces):
        if len(piece) == 0:
            continue
        segment = path[max(piece[0] - 1, 0) : piece[-1] + 1]
        thickness = max(1, int(round(width * (1 - 0.3 * number))))
        cv2.polylines(canvas, [_fixed(segment)], False, 255, thickness, AA, SUBPIXEL_BITS)


# ---------------------------------------------------------------- geometry helpers


def _box_corners(box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y1]], np.float64)


def _bounds(points: np.ndarray) -> tuple[float, float, float, float]:
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def _round_half_up(value: float) -> int:
    """Roboflow rounds box coordinates half up (12.5 -> 13), unlike Python's round()."""
    return int(math.floor(value + 0.5))


def _number(value: float) -> float | int:
    rounded = round(float(value), 3)
    return int(rounded) if rounded.is_integer() else rounded


# ---------------------------------------------------------------- preview
