"""The synthetic generator writes valid, reproducible Roboflow COCO exports whose labels match the pixels."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SMALL_SYNTHETIC
from PIL import Image

from drywall_qa.contracts.naming import image_id_of, source_group
from drywall_qa.contracts.roboflow import COCO_ANNOTATIONS
from drywall_qa.synthetic import (
    DATASET_SPECS,
    InvalidGeneratorParams,
    generate_export,
    generate_exports,
)

ROBOFLOW_FILE_NAME = re.compile(r"^(?P<stem>.+)_jpg\.rf\.[0-9a-f]{32}\.jpg$")
# The key sets of the real exports in /work/shared/realdata (both projects).
TOP_KEYS = {"info", "licenses", "categories", "images", "annotations"}
INFO_KEYS = {"year", "version", "description", "contributor", "url", "date_created"}
IMAGE_KEYS = {"id", "license", "file_name", "height", "width", "date_captured", "extra"}
ANNOTATION_KEYS = {"id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_split_documents(dataset_dir: Path) -> dict[str, dict]:
    return {f.parent.name: json.loads(f.read_text()) for f in sorted(dataset_dir.glob(f"*/{COCO_ANNOTATIONS}"))}


def tiny(seed: int, dest: Path) -> None:
    generate_exports(
        dest, seed, source_images=6, augmented_copies=1, augmented_fraction=0.5, negative_fraction=0.2, image_size=64
    )


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    tiny(11, tmp_path / "a")
    tiny(11, tmp_path / "b")
    tiny(12, tmp_path / "c")
    first, again, other = (tree_bytes(tmp_path / name) for name in "abc")
    assert len(first) > 10
    assert first == again
    images = lambda tree: {k: v for k, v in tree.items() if k.endswith(".jpg")}  # noqa: E731
    # names carry content hashes, so no image of seed 12 equals one of seed 11
    assert not set(images(first).values()) & set(images(other).values())


@pytest.mark.parametrize("dataset", ["cracks", "taping"])
def test_export_has_the_real_roboflow_schema(synthetic_exports, dataset):
    spec = DATASET_SPECS[dataset]
    documents = load_split_documents(synthetic_exports / dataset)
    assert set(documents) == {"train", "valid", "test"}
    assert (synthetic_exports / dataset / "README.roboflow.txt").is_file()
    for split, document in documents.items():
        raw = (synthetic_exports / dataset / split / COCO_ANNOTATIONS).read_text()
        assert "\n" not in raw  # compact, single line, as Roboflow writes it
        assert set(document) == TOP_KEYS
        assert set(document["info"]) == INFO_KEYS
        assert document["licenses"] == [
            {"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}
        ]
        assert document["categories"] == [
            {"id": 0, "name": spec.superclass, "supercategory": "none"},
            {"id": 1, "name": spec.label, "supercategory": spec.superclass},
        ]
        assert [image["id"] for image in document["images"]] == list(range(len(document["images"])))
        assert [a["id"] for a in document["annotations"]] == list(range(1, len(document["annotations"]) + 1))
        for image in document["images"]:
            assert set(image) == IMAGE_KEYS
        for annotation in document["annotations"]:
            assert set(annotation) == ANNOTATION_KEYS
            assert annotation["category_id"] == 1  # the superclass never has annotations
            assert annotation["iscrowd"] == 0


@pytest.mark.parametrize("dataset", ["cracks", "taping"])
def test_every_file_and_annotation_is_consistent(synthetic_exports, dataset):
    size = SMALL_SYNTHETIC["image_size"]
    for split, document in load_split_documents(synthetic_exports / dataset).items():
        folder = synthetic_exports / dataset / split
        listed = {image["file_name"] for image in document["images"]}
        on_disk = {p.name for p in folder.iterdir() if p.name != COCO_ANNOTATIONS}
        assert listed == on_disk
        images = {image["id"]: image for image in document["images"]}
        for image in document["images"]:
            match = ROBOFLOW_FILE_NAME.match(image["file_name"])
            assert match, image["file_name"]
            assert image["extra"]["name"] == f"{match['stem']}.jpg"
            with Image.open(folder / image["file_name"]) as opened:
                assert opened.format == "JPEG" and opened.mode == "RGB"
                assert opened.size == (image["width"], image["height"]) == (size, size)
        for annotation in document["annotations"]:
            assert annotation["image_id"] in images
            x, y, w, h = annotation["bbox"]
            assert all(isinstance(v, int) for v in (x, y, w, h))
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= size and y + h <= size
            assert annotation["area"] == w * h  # Roboflow writes the box area
            for part in annotation["segmentation"]:
                points = np.array(part, dtype=float).reshape(-1, 2)
                assert len(points) >= 4 and (points[0] == points[-1]).all()  # >= 3 vertices, closed
                assert points.min() >= 0 and points.max() <= size
                assert abs(points[:, 0].min() - x) <= 0.5 and abs(points[:, 0].max() - (x + w)) <= 1
                assert abs(points[:, 1].min() - y) <= 0.5 and abs(points[:, 1].max() - (y + h)) <= 1


def test_cracks_are_polygons_with_a_few_empty_and_joints_are_boxes(synthetic_exports):
    cracks = [a for d in load_split_documents(synthetic_exports / "cracks").values() for a in d["annotations"]]
    joints = [a for d in load_split_documents(synthetic_exports / "taping").values() for a in d["annotations"]]
    without_polygon = sum(1 for a in cracks if not a["segmentation"])
    assert 1 <= without_polygon <= 0.15 * len(cracks)
    assert joints and all(a["segmentation"] == [] for a in joints)


@pytest.mark.parametrize("dataset", ["cracks", "taping"])
def test_negatives_and_augmented_copies_across_split_folders(synthetic_exports, dataset):
    groups: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    negatives = 0
    for split, document in load_split_documents(synthetic_exports / dataset).items():
        annotated = {a["image_id"] for a in document["annotations"]}
        negatives += sum(1 for image in document["images"] if image["id"] not in annotated)
        for image in document["images"]:
            groups[source_group(image_id_of(image["file_name"]))].append((split, image))
    assert negatives >= 1
    copied = {group: members for group, members in groups.items() if len(members) > 1}
    expected = round(SMALL_SYNTHETIC["augmented_fraction"] * SMALL_SYNTHETIC["source_images"])
    assert len(groups) == SMALL_SYNTHETIC["source_images"]
    assert len(copied) == expected
    assert all(len({image["extra"]["name"] for _, image in members}) == 1 for members in copied.values())
    assert any(len({split for split, _ in members}) > 1 for members in copied.values())  # Roboflow's leak


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(opened.convert("L"), dtype=np.float32)


def test_crack_polygons_outline_dark_pixels_in_every_copy(synthetic_exports):
    """Also for flipped/rotated copies: the polygons moved with the pixels."""
    checked = 0
    for split, document in load_split_documents(synthetic_exports / "cracks").items():
        for image in document["images"]:
            parts = [p for a in document["annotations"] if a["image_id"] == image["id"] for p in a["segmentation"]]
            if not parts:
                continue
            gray = _gray(synthetic_exports / "cracks" / split / image["file_name"])
            mask = np.zeros(gray.shape, np.uint8)
            for part in parts:
                cv2.fillPoly(mask, [np.rint(np.array(part).reshape(-1, 2)).astype(np.int32)], 1)
            assert gray[mask == 1].mean() < gray[mask == 0].mean() - 12, image["file_name"]
            checked += 1
    assert checked >= 10


def test_joint_boxes_cover_bands_that_differ_from_the_wall_beside_them(synthetic_exports):
    contrasts = []
    for split, document in load_split_documents(synthetic_exports / "taping").items():
        images = {image["id"]: image for image in document["images"]}
        for annotation in document["annotations"]:
            gray = _gray(synthetic_exports / "taping" / split / images[annotation["image_id"]]["file_name"])
            x, y, w, h = annotation["bbox"]
            if w > h:  # a horizontal band is a vertical one in the transposed image
                gray, (x, y, w, h) = gray.T, (y, x, h, w)
            # the band's middle against strips of wall left and right of the box
            band, side = gray[y : y + h, x + w // 4 : x + w - w // 4], w // 2
            left = gray[y : y + h, max(0, x - side - 2) : max(0, x - 2)]
            right = gray[y : y + h, x + w + 2 : x + w + 2 + side]
            beside = [strip.mean() for strip in (left, right) if strip.size]
            if beside:
                contrasts.append(abs(band.mean() - np.mean(beside)))
    assert len(contrasts) >= 10
    assert np.mean(np.array(contrasts) >= 4) >= 0.9


def test_invalid_parameters_are_rejected_before_writing(tmp_path):
    with pytest.raises(InvalidGeneratorParams, match="source_images"):
        generate_export(DATASET_SPECS["cracks"], tmp_path / "x", 1, 0, 1, 0.5, 0.1, 64)
    with pytest.raises(InvalidGeneratorParams, match="augmented_fraction"):
        generate_export(DATASET_SPECS["cracks"], tmp_path / "x", 1, 5, 1, 1.5, 0.1, 64)
    assert not (tmp_path / "x").exists()
