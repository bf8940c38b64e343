"""convert: hand-written Roboflow exports in tmp dirs -> masks checked pixel by pixel, and the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drywall_qa.contracts.naming import mask_file_name
from drywall_qa.contracts.roboflow import ExportFormatError, MalformedAnnotationsError
from drywall_qa.convert import (
    AccountingError,
    DuplicateImageError,
    check_accounting,
    convert_all,
    rle_counts_from_string,
)

# Roboflow's layout: id 0 is a superclass naming the labelled class 1.
CATEGORIES = [
    {"id": 0, "name": "Drywall-Join", "supercategory": "none"},
    {"id": 1, "name": "drywall-join", "supercategory": "Drywall-Join"},
]
PROMPTS = {"taping": ["segment taping area", "segment joint/tape"]}


def save_image(path: Path, width: int, height: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def write_coco(
    split_dir: Path,
    images: list[tuple[str, int, int]],
    annotations: list[dict],
    categories: list[dict] = CATEGORIES,
    create_files: bool = True,
) -> None:
    """A COCO split folder: `images` are (file_name, width, height); annotation ids are filled in."""
    split_dir.mkdir(parents=True, exist_ok=True)
    entries = [{"id": i, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(images)]
    if create_files:
        for name, w, h in images:
            save_image(split_dir / name, w, h)
    anns = [{"id": i, "iscrowd": 0, "category_id": 1, **ann} for i, ann in enumerate(annotations)]
    coco = {"info": {}, "images": entries, "annotations": anns, "categories": categories}
    (split_dir / "_annotations.coco.json").write_text(json.dumps(coco))


def run(tmp_path: Path, prompts: dict = PROMPTS) -> dict:
    return convert_all(
        raw_dir=tmp_path / "data/raw",
        prompts=prompts,
        masks_dir=tmp_path / "data/masks",
        images_csv=tmp_path / "data/interim/images.csv",
        report_path=tmp_path / "metrics/conversion.json",
        repo_root=tmp_path,
    )


def read_mask(tmp_path: Path, dataset: str, image_id: str, prompt: str) -> np.ndarray:
    with Image.open(tmp_path / "data/masks" / dataset / mask_file_name(image_id, prompt)) as mask:
        assert mask.mode == "L"
        return np.array(mask)


def canvas(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width), dtype=np.uint8)


def test_coco_polygons_match_hand_computed_pixels(tmp_path):
    # 8 wide x 6 high. A pixel is set when its centre lies inside the polygon.
    triangle = [0, 0, 4, 0, 0, 4]  # x + y < 4 at centres: rows 0,1,2 hold 3,2,1 pixels
    rectangle = [5, 1, 7, 1, 7, 4, 5, 4]  # x in [5, 7), y in [1, 4)
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 8, 6)],
        [
            {"image_id": 0, "bbox": [0, 0, 4, 4], "segmentation": [triangle]},
            {"image_id": 0, "bbox": [5, 1, 2, 3], "segmentation": [rectangle]},
        ],
    )
    report = run(tmp_path)
    expected = canvas(6, 8)
    expected[0, 0:3] = expected[1, 0:2] = expected[2, 0:1] = 255
    expected[1:4, 5:7] = 255
    np.testing.assert_array_equal(read_mask(tmp_path, "taping", "a", "segment taping area"), expected)
    annotations = report["datasets"]["taping"]["annotations"]
    assert annotations["converted_by_kind"] == {"polygon": 2, "box": 0, "rle": 0}
    assert annotations["fixes"]["bbox_fallback"] == 0


def test_coco_rle_uncompressed_and_compressed(tmp_path):
    # Column-major runs on 6 rows x 8 columns: 7 off, 3 on, 3 off, 35 on.
    expected = canvas(6, 8)
    expected[1:4, 1] = 255  # runs 8-10: column 1, rows 1-3
    expected[1:, 2] = 255  # from run 14 (column 2, row 1) to the end
    expected[:, 3:] = 255
    uncompressed = {"size": [6, 8], "counts": [7, 3, 3, 35]}
    compressed = {"size": [6, 8], "counts": "733P1"}  # the same runs in COCO's string encoding
    assert rle_counts_from_string("733P1") == [7, 3, 3, 35]
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("u.png", 8, 6), ("c.png", 8, 6)],
        [
            {"image_id": 0, "bbox": [1, 0, 7, 6], "segmentation": uncompressed, "iscrowd": 1},
            {"image_id": 1, "bbox": [1, 0, 7, 6], "segmentation": compressed, "iscrowd": 1},
        ],
    )
    report = run(tmp_path)
    np.testing.assert_array_equal(read_mask(tmp_path, "taping", "u", "segment joint/tape"), expected)
    np.testing.assert_array_equal(read_mask(tmp_path, "taping", "c", "segment joint/tape"), expected)
    assert report["datasets"]["taping"]["annotations"]["converted_by_kind"]["rle"] == 2


def test_empty_segmentation_falls_back_to_bbox_and_instances_are_unioned(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 8, 6)],
        [
            {"image_id": 0, "bbox": [1, 2, 3, 2], "segmentation": []},
            {"image_id": 0, "bbox": [2, 3, 4, 3], "segmentation": []},
        ],  # overlaps the first
    )
    report = run(tmp_path)
    expected = canvas(6, 8)
    expected[2:4, 1:4] = 255
    expected[3:6, 2:6] = 255
    np.testing.assert_array_equal(read_mask(tmp_path, "taping", "a", "segment taping area"), expected)
    taping = report["datasets"]["taping"]
    assert taping["annotations"]["fixes"]["bbox_fallback"] == 2
    assert taping["annotations"]["converted_by_kind"]["box"] == 2


def write_yolo(root: Path, names: list[str], images: dict[str, tuple[int, int]], labels: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(f"train: ../train/images\nnc: {len(names)}\nnames: {names}\n")
    for name, (w, h) in images.items():
        save_image(root / "train/images" / name, w, h, fmt="JPEG")
    (root / "train/labels").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        (root / "train/labels" / f"{stem}.txt").write_text(text)


def test_yolo_boxes_and_polygons(tmp_path):
    write_yolo(
        tmp_path / "data/raw/cracks",
        ["crack"],
        {"box.jpg": (10, 10), "poly.jpg": (10, 20), "neg.jpg": (10, 10)},
        {
            "box": "0 0.5 0.5 0.4 0.2\n",  # x in [3, 7), y in [4, 6)
            "poly": "0 0 0 0.5 0 0.5 0.5 0 0.5\n3 0.1 0.1 0.2 0.2\n",  # x in [0, 5), y in [0, 10); class 3 unknown
            "orphan": "0 0.5 0.5 0.1 0.1\n",  # a label whose image is missing
        },
    )
    report = run(tmp_path, {"cracks": ["segment crack"]})
    box = canvas(10, 10)
    box[4:6, 3:7] = 255
    np.testing.assert_array_equal(read_mask(tmp_path, "cracks", "box", "segment crack"), box)
    poly = canvas(20, 10)
    poly[0:10, 0:5] = 255
    np.testing.assert_array_equal(read_mask(tmp_path, "cracks", "poly", "segment crack"), poly)
    np.testing.assert_array_equal(read_mask(tmp_path, "cracks", "neg", "segment crack"), canvas(10, 10))
    cracks = report["datasets"]["cracks"]
    assert cracks["format"] == "yolo"
    assert cracks["annotations"]["seen"] == 4
    assert cracks["annotations"]["converted_by_kind"] == {"polygon": 1, "box": 1, "rle": 0}
    assert cracks["annotations"]["skipped_by_reason"]["unknown_category"] == 1
    assert cracks["annotations"]["skipped_by_reason"]["missing_image_file"] == 1
    assert cracks["images"]["empty_masks"] == 1


def test_mask_file_contract_and_images_csv(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/valid",
        [("IMG_1_JPG_jpg.rf.0123456789abcdef0123456789abcdef.jpg", 12, 7)],
        [{"image_id": 0, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}],
    )
    run(tmp_path)
    image_id = "IMG_1_JPG_jpg.rf.0123456789abcdef0123456789abcdef"
    files = sorted(p.name for p in (tmp_path / "data/masks/taping").iterdir())
    assert files == sorted(mask_file_name(image_id, p) for p in PROMPTS["taping"])
    assert "IMG_1_JPG_jpg.rf.0123456789abcdef0123456789abcdef__segment_joint-tape.png" in files
    contents = {(tmp_path / "data/masks/taping" / name).read_bytes() for name in files}
    assert len(contents) == 1  # every prompt of a dataset gets the same mask
    with Image.open(tmp_path / "data/masks/taping" / files[0]) as mask:
        assert mask.mode == "L" and mask.size == (12, 7) and mask.format == "PNG"
        assert set(np.unique(np.array(mask))) == {0, 255}
    with open(tmp_path / "data/interim/images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {
            "dataset": "taping",
            "image_id": image_id,
            "image_path": f"data/raw/taping/valid/{image_id}.jpg",
            "group": "IMG_1_JPG_jpg",
            "source_split": "valid",
            "width": "12",
            "height": "7",
            "n_instances": "1",
        }
    ]


def test_bad_annotations_are_counted_by_reason(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 10, 10), ("gone.png", 10, 10)],
        [
            {"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0]]},  # 2 points
            {"image_id": 0, "bbox": [1, 0, 0, 1], "segmentation": []},  # zero-area box
            {"image_id": 0, "bbox": [8, 8, 5, 5], "segmentation": []},  # crosses the border: clipped
            {"image_id": 0, "bbox": [0, 0, 3, 3], "segmentation": [], "category_id": 7},  # unknown category
            {"image_id": 0, "bbox": [0, 0, 0.3, 0.2], "segmentation": []},  # covers no pixel centre
            {"image_id": 0, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 1, 2]]},  # odd coordinates
            {"image_id": 0, "segmentation": {"size": [4, 4], "counts": [16]}},  # RLE for another size
            {"image_id": 0, "segmentation": {"size": [10, 10], "counts": [5, 5]}},  # runs do not fill 10x10
            {"image_id": 99, "bbox": [0, 0, 3, 3], "segmentation": []},  # no such image
            {"image_id": 1, "bbox": [0, 0, 3, 3], "segmentation": []},  # its file is missing
        ],
    )
    (tmp_path / "data/raw/taping/train/gone.png").unlink()
    report = run(tmp_path)["datasets"]["taping"]
    skipped = report["annotations"]["skipped_by_reason"]
    assert {reason: n for reason, n in skipped.items() if n} == {
        "polygon_lt_3_points": 1,
        "zero_area_box": 1,
        "unknown_category": 1,
        "no_pixels": 1,
        "malformed": 2,
        "rle_size_mismatch": 1,
        "unknown_image": 1,
        "missing_image_file": 1,
    }
    assert report["annotations"]["seen"] == 10 and report["annotations"]["converted"] == 1
    assert report["annotations"]["fixes"]["clipped_out_of_bounds"] == 1
    assert report["images"]["skipped_by_reason"]["missing_image_file"] == 1
    assert report["files"]["missing_image_file"] == ["train/gone.png"]
    expected = canvas(10, 10)
    expected[8:, 8:] = 255  # the clipped box
    np.testing.assert_array_equal(read_mask(tmp_path, "taping", "a", "segment taping area"), expected)


def test_truncated_image_is_a_counted_skip_with_its_name(tmp_path):
    split = tmp_path / "data/raw/taping/test"
    write_coco(
        split,
        [("ok.png", 8, 8), ("cut.jpg", 64, 64)],
        [{"image_id": 1, "bbox": [0, 0, 4, 4], "segmentation": []}],
        create_files=False,
    )
    save_image(split / "ok.png", 8, 8)
    save_image(split / "cut.jpg", 64, 64, fmt="JPEG")
    data = (split / "cut.jpg").read_bytes()
    (split / "cut.jpg").write_bytes(data[: len(data) // 2])
    report = run(tmp_path)["datasets"]["taping"]
    assert report["images"]["skipped_by_reason"]["unreadable_image"] == 1
    assert report["annotations"]["skipped_by_reason"]["unreadable_image"] == 1
    assert report["files"]["unreadable_image"] == ["test/cut.jpg"]
    assert report["images"]["converted"] == 1 and report["images"]["empty_masks"] == 1


def test_image_whose_annotations_all_fail_is_skipped_not_made_negative(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 8, 8), ("b.png", 8, 8)],
        [{"image_id": 0, "bbox": [0, 0, 0, 1], "segmentation": []}],
    )
    report = run(tmp_path)["datasets"]["taping"]
    assert report["images"]["skipped_by_reason"]["all_annotations_skipped"] == 1
    assert report["images"]["converted"] == 1 and report["images"]["empty_masks"] == 1
    assert not (tmp_path / "data/masks/taping" / mask_file_name("a", "segment taping area")).exists()


def test_size_mismatch_is_counted_and_real_size_wins(tmp_path):
    split = tmp_path / "data/raw/taping/train"
    write_coco(
        split, [("a.png", 20, 20)], [{"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []}], create_files=False
    )
    save_image(split / "a.png", 8, 6)
    report = run(tmp_path)["datasets"]["taping"]
    assert report["images"]["size_mismatch"] == 1
    assert read_mask(tmp_path, "taping", "a", "segment taping area").shape == (6, 8)


def test_superclass_is_ignored_whatever_its_name(tmp_path):
    categories = [
        {"id": 0, "name": "crack", "supercategory": "none"},
        {"id": 1, "name": "NewCracks - v2 2024-05-18 10-54pm", "supercategory": "crack"},
    ]
    write_coco(
        tmp_path / "data/raw/cracks/valid",
        [("a.png", 8, 8)],
        [
            {"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []},
            {"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": [], "category_id": 0},
        ],
        categories=categories,
    )
    report = run(tmp_path, {"cracks": ["segment crack"]})["datasets"]["cracks"]
    # An annotated id 0 is no longer a *pure* superclass, so it is used too.
    assert report["categories_used"] == {"0": "crack", "1": "NewCracks - v2 2024-05-18 10-54pm"}
    assert report["annotations"]["converted"] == 2

    write_coco(
        tmp_path / "data/raw/cracks/valid",
        [("a.png", 8, 8)],
        [{"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []}],
        categories=categories,
    )
    report = run(tmp_path, {"cracks": ["segment crack"]})["datasets"]["cracks"]
    assert report["superclasses_ignored"] == {"0": "crack"}
    assert report["categories_used"] == {"1": "NewCracks - v2 2024-05-18 10-54pm"}


def test_malformed_json_names_file_and_position(tmp_path):
    split = tmp_path / "data/raw/taping/train"
    split.mkdir(parents=True)
    (split / "_annotations.coco.json").write_text('{"images": [\n  {"id": 0,,}\n]}')
    with pytest.raises(MalformedAnnotationsError) as caught:
        run(tmp_path)
    assert caught.value.line == 2 and caught.value.column == 12
    assert f"{split / '_annotations.coco.json'}:2:12" in str(caught.value)
    assert isinstance(caught.value, ExportFormatError)  # the reader's error, the download stage's too


def test_malformed_yolo_yaml_names_file_and_line(tmp_path):
    root = tmp_path / "data/raw/cracks"
    root.mkdir(parents=True)
    (root / "data.yaml").write_text("nc: 1\nnames: [crack\n")
    with pytest.raises(MalformedAnnotationsError, match="data.yaml:3"):
        run(tmp_path, {"cracks": ["segment crack"]})


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ExportFormatError, match="does not exist"):
        run(tmp_path)


def test_duplicate_image_id_identical_bytes_skipped_different_bytes_error(tmp_path):
    raw = tmp_path / "data/raw/taping"
    write_coco(raw / "train", [("a.png", 8, 8)], [{"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []}])
    write_coco(
        raw / "valid",
        [("a.png", 8, 8)],
        [{"image_id": 0, "bbox": [4, 4, 2, 2], "segmentation": []}],
        create_files=False,
    )
    (raw / "valid/a.png").write_bytes((raw / "train/a.png").read_bytes())
    report = run(tmp_path)["datasets"]["taping"]
    assert report["images"]["skipped_by_reason"]["duplicate_image_id"] == 1
    assert report["annotations"]["skipped_by_reason"]["duplicate_image_id"] == 1
    assert report["files"]["duplicate_image_id"] == ["valid/a.png"]
    mask = read_mask(tmp_path, "taping", "a", "segment taping area")
    assert mask[0, 0] == 255 and mask[5, 5] == 0  # the train copy (first in folder order) is kept

    save_image(raw / "valid/a.png", 9, 9)
    with pytest.raises(DuplicateImageError, match="'a'"):
        run(tmp_path)


def test_failed_run_keeps_previous_masks_and_leaves_no_temp_dirs(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 8, 8)],
        [{"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []}],
    )
    run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "data/masks/taping").iterdir())
    (tmp_path / "data/raw/taping/train/_annotations.coco.json").write_text("{")
    with pytest.raises(MalformedAnnotationsError):
        run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "data/masks/taping").iterdir()) == before
    # no temp folders left (the replace lock file beside masks/ is gitignored and reused)
    left = sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".replace-lock"))
    assert left == ["interim", "masks", "raw"]


def test_accounting_invariant_holds_and_is_enforced(tmp_path):
    write_coco(
        tmp_path / "data/raw/taping/train",
        [("a.png", 8, 8), ("b.png", 8, 8)],
        [
            {"image_id": 0, "bbox": [0, 0, 2, 2], "segmentation": []},
            {"image_id": 0, "bbox": [0, 0, 0, 2], "segmentation": []},
        ],
    )
    report = run(tmp_path)
    taping = report["datasets"]["taping"]
    annotations = taping["annotations"]
    assert (annotations["seen"], annotations["converted"], annotations["skipped"]) == (2, 1, 1)
    assert (taping["images"]["seen"], taping["images"]["converted"], taping["masks_written"]) == (2, 2, 4)
    assert json.loads((tmp_path / "metrics/conversion.json").read_text()) == report
    rows = [{"image_id": "a", "n_instances": 1}, {"image_id": "b", "n_instances": 0}]
    check_accounting("taping", taping, rows)
    taping["annotations"]["converted"] += 1
    with pytest.raises(AccountingError, match="annotations seen = converted \\+ skipped"):
        check_accounting("taping", taping, rows)
