"""The one reader of Roboflow exports (contracts/roboflow.py): what the download describes and slices,
what conversion reads and what the download preview shows are the same images and the same counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_sources import yolo_export

from drywall_qa.contracts.roboflow import (
    MalformedAnnotationsError,
    describe_export,
    detect_format,
    list_images,
    load_coco,
)
from drywall_qa.convert import read_export
from drywall_qa.sources.local import import_local_export


def agreement(root: Path) -> None:
    """The export's image list, per-folder counts and annotation total, as each caller reads them."""
    export_format = detect_format(root)
    export = read_export(root)  # conversion's reader, and the download preview's
    listed = list_images(root, export_format)  # the download's slicing
    description = describe_export(root)  # the download's source.json
    assert listed == [path.relative_to(root).as_posix() for path in (image.path for image in export.images)]
    assert description["format"] == export.format == export_format
    assert description["images"] == len(listed)
    per_folder = {split: counts["images"] for split, counts in description["splits"].items() if counts["images"]}
    assert per_folder == dict(Counter(image.source_split for image in export.images))
    seen = sum(image.annotations_seen for image in export.images) + sum(export.orphan_skips.values())
    assert description["annotations"] == seen


def test_coco_export_callers_agree(synthetic_exports):
    for name in ("cracks", "taping"):
        agreement(synthetic_exports / name)


def test_yolo_export_callers_agree_also_with_an_orphan_label_and_a_stray_file(tmp_path):
    root = yolo_export(tmp_path / "yolo")
    (root / "train" / "labels" / "no_such_image.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "train" / "images" / "notes.txt").write_text("not an image")
    agreement(root)
    assert describe_export(root)["splits"]["train"] == {"images": 2, "annotations": 4, "annotations_with_polygon": 1}


def test_a_sliced_import_describes_what_conversion_then_reads(tmp_path, synthetic_exports):
    record = import_local_export(synthetic_exports / "taping", tmp_path / "taping", 10**7, limit=7, seed=3)
    agreement(tmp_path / "taping")
    assert record["images"] == record["slice"]["images_kept"] == len(read_export(tmp_path / "taping").images)


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        ([], "top level is not an object"),
        ({"annotations": [], "categories": []}, "`images` is missing or not a list"),
        ({"images": [], "categories": []}, "`annotations` is missing or not a list"),
        ({"images": [], "annotations": [], "categories": [{"name": "x"}]}, "categories[0] has no `id`"),
        ({"images": [{"id": 1}], "annotations": [], "categories": []}, "images[0] needs an `id` and a `file_name`"),
        (
            {"images": [{"id": 1, "file_name": "a.png"}] * 2, "annotations": [], "categories": []},
            "images[1]: image id 1 repeats",
        ),
    ],
)
def test_load_coco_names_the_first_defect(tmp_path, document, detail):
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(document))
    with pytest.raises(MalformedAnnotationsError) as caught:
        load_coco(path)
    assert str(caught.value) == f"malformed annotation file {path}: {detail}"
    assert caught.value.parse_error is None


def test_text_that_does_not_parse_keeps_the_parsers_message(tmp_path):
    path = tmp_path / "_annotations.coco.json"
    path.write_bytes(b"\xff{")
    with pytest.raises(MalformedAnnotationsError, match="not UTF-8 text") as caught:
        load_coco(path)
    assert "can't decode byte 0xff" in caught.value.parse_error
