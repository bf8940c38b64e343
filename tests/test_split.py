"""split: grouped, seeded, balanced, deterministic; plus convert + split on a slice of the real exports."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from required import require_realdata

from drywall_qa.contracts.atomic import write_csv_atomic
from drywall_qa.contracts.manifest import IMAGES_CSV_COLUMNS, MANIFEST_COLUMNS, ManifestError
from drywall_qa.contracts.naming import mask_file_name, source_group
from drywall_qa.convert import convert_all
from drywall_qa.split import SplitError, build_manifest, write_split

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
PROMPTS = {"cracks": ["segment crack", "segment wall crack"], "taping": ["segment taping area"]}
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def image_rows(dataset: str, group_sizes: list[int]) -> list[dict]:
    """Roboflow-style rows: group g has `size` augmented copies named `src{g}_jpg.rf.<hash>`."""
    rows = []
    for g, size in enumerate(group_sizes):
        for copy in range(size):
            image_id = f"src{g:03d}_jpg.rf.{g:016x}{copy:016x}"
            rows.append(
                {
                    "dataset": dataset,
                    "image_id": image_id,
                    "image_path": f"data/raw/{dataset}/train/{image_id}.jpg",
                    "group": source_group(image_id),
                    "source_split": ("train", "valid", "test")[copy % 3],
                    "width": "64",
                    "height": "48",
                    "n_instances": "1",
                }
            )
    return rows


def mixed_sizes(n_groups: int) -> list[int]:
    return [1 + (g * 7) % 9 for g in range(n_groups)]  # 1..9 copies per source image


def splits_by_group(manifest: list[dict]) -> dict[tuple[str, str], set[str]]:
    found = defaultdict(set)
    for row in manifest:
        found[(row["dataset"], row["group"])].add(row["split"])
    return found


def test_no_group_crosses_splits_and_image_ratios_are_close():
    images = image_rows("cracks", mixed_sizes(120)) + image_rows("taping", mixed_sizes(40))
    manifest, stats = build_manifest(images, PROMPTS, FRACTIONS, seed=42)
    assert all(len(splits) == 1 for splits in splits_by_group(manifest).values())
    for dataset in ("cracks", "taping"):
        total = sum(1 for row in images if row["dataset"] == dataset)
        for name, fraction in FRACTIONS.items():
            # Within one largest group (9 images) of the target image count.
            assert abs(stats["datasets"][dataset][name]["images"] - fraction * total) <= 9, (dataset, name)
        assert sum(stats["datasets"][dataset][n]["images"] for n in FRACTIONS) == total
    groups = {row["group"] for row in manifest if row["dataset"] == "cracks" and row["split"] == "val"}
    assert stats["datasets"]["cracks"]["val"]["groups"] == len(groups)


def test_manifest_rows_pairs_and_order():
    images = image_rows("cracks", [2, 1, 1, 3]) + image_rows("taping", [1, 1, 1])
    manifest, stats = build_manifest(images, PROMPTS, FRACTIONS, seed=0)
    assert len(manifest) == 7 * 2 + 3 * 1
    assert manifest == sorted(manifest, key=lambda r: (r["dataset"], r["split"], r["image_id"], r["prompt"]))
    assert list(manifest[0]) == MANIFEST_COLUMNS
    row = next(r for r in manifest if r["dataset"] == "cracks" and r["prompt"] == "segment wall crack")
    assert row["mask_path"] == f"data/masks/cracks/{row['image_id']}__segment_wall_crack.png"
    for dataset, n_prompts in (("cracks", 2), ("taping", 1)):
        for name in FRACTIONS:
            per_split = stats["datasets"][dataset][name]
            assert per_split["pairs"] == per_split["images"] * n_prompts
    assert stats["totals"]["val"]["pairs"] == sum(1 for r in manifest if r["split"] == "val")


@pytest.mark.parametrize("sizes", [[1, 1, 1], [50, 1, 1], [50, 50, 1, 1], [30, 2, 1, 1, 1]])
def test_tiny_datasets_get_non_empty_val_and_test(sizes):
    _, stats = build_manifest(image_rows("taping", sizes), {"taping": ["p"]}, FRACTIONS, seed=3)
    assert all(stats["datasets"]["taping"][name]["groups"] >= 1 for name in FRACTIONS)


def test_fewer_than_three_groups_is_a_clear_error():
    with pytest.raises(SplitError, match="'taping' has 2 source image group"):
        build_manifest(image_rows("taping", [5, 5]), {"taping": ["p"]}, FRACTIONS, seed=0)


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"train": 0.7, "val": 0.3}, "lack"),
        ({"train": 0.8, "val": 0.15, "test": 0.15}, "sum to 1"),
        ({"train": 1.0, "val": 0.0, "test": 0.0}, "> 0"),
    ],
)
def test_bad_fractions_are_rejected(fractions, message):
    with pytest.raises(SplitError, match=message):
        build_manifest(image_rows("taping", [1, 1, 1]), {"taping": ["p"]}, fractions, seed=0)


def test_datasets_must_match_prompts():
    with pytest.raises(SplitError, match="'other' has no prompts"):
        build_manifest(image_rows("other", [1, 1, 1]), {"other": []}, FRACTIONS, 0)
    with pytest.raises(SplitError, match=r"no converted image for dataset\(s\) \['taping'\]"):
        build_manifest(image_rows("other", [1, 1, 1]), {"other": ["p"], "taping": ["q"]}, FRACTIONS, 0)
    with pytest.raises(SplitError, match=r"dataset\(s\) \['other'\] with no prompts"):
        build_manifest(image_rows("other", [1, 1, 1]), {"taping": ["q"]}, FRACTIONS, 0)


def write_inputs(root: Path, images: list[dict], prompts: dict) -> Path:
    """images.csv plus an (empty) mask file for each pair, as convert leaves them."""
    write_csv_atomic(root / "data/interim/images.csv", IMAGES_CSV_COLUMNS, images)
    for row in images:
        for prompt in prompts[row["dataset"]]:
            path = root / "data/masks" / row["dataset"] / mask_file_name(row["image_id"], prompt)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return root / "data/interim/images.csv"


def split_bytes(root: Path, images_csv: Path, seed: int, name: str) -> bytes:
    write_split(images_csv, PROMPTS, FRACTIONS, seed, root / name, root / f"{name}.json", repo_root=root)
    return (root / name).read_bytes()


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    images = image_rows("cracks", mixed_sizes(60)) + image_rows("taping", mixed_sizes(30))
    images_csv = write_inputs(tmp_path, images, PROMPTS)
    first = split_bytes(tmp_path, images_csv, 42, "a.csv")
    assert split_bytes(tmp_path, images_csv, 42, "b.csv") == first
    assert split_bytes(tmp_path, images_csv, 7, "c.csv") != first
    stats = json.loads((tmp_path / "a.csv.json").read_text())
    assert stats["seed"] == 42 and stats["fractions"] == FRACTIONS
    assert first.startswith(b"dataset,split,image_id,image_path,mask_path,prompt,group,width,height,source_split\n")


def test_missing_masks_are_reported(tmp_path):
    images = image_rows("cracks", [1, 1, 1]) + image_rows("taping", [1, 1, 1])
    images_csv = write_inputs(tmp_path, images, {"cracks": ["segment crack"], "taping": ["segment taping area"]})
    with pytest.raises(SplitError, match="3 mask file"):
        write_split(images_csv, PROMPTS, FRACTIONS, 0, tmp_path / "m.csv", tmp_path / "s.json", repo_root=tmp_path)
    assert not (tmp_path / "m.csv").exists()


def test_missing_or_broken_images_csv(tmp_path):
    with pytest.raises(ManifestError, match="run the convert stage"):
        write_split(tmp_path / "none.csv", PROMPTS, FRACTIONS, 0, tmp_path / "m.csv", tmp_path / "s.json")
    (tmp_path / "bad.csv").write_text("dataset,image_id\ncracks,a\n")
    with pytest.raises(ManifestError, match="columns"):
        write_split(tmp_path / "bad.csv", PROMPTS, FRACTIONS, 0, tmp_path / "m.csv", tmp_path / "s.json")


# ------------------------------------------------------------------ real Roboflow exports


def slice_export(source: Path, target: Path, groups_per_dataset: int, must_include) -> None:
    """A smaller copy of a real COCO export: whole source-image groups (all their `.rf.` copies, in
    whichever Roboflow folder they are), the first `groups_per_dataset` by name plus every group that
    holds an annotation for which `must_include(annotation)` is true. Images are symlinked."""
    splits = {p.parent.name: json.loads(p.read_text()) for p in source.glob("*/_annotations.coco.json")}
    groups = set()
    for coco in splits.values():
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        groups |= {source_group(Path(names[a["image_id"]]).stem) for a in coco["annotations"] if must_include(a)}
    every_group = sorted({source_group(Path(i["file_name"]).stem) for c in splits.values() for i in c["images"]})
    groups |= set(every_group[:groups_per_dataset])
    for name, coco in splits.items():
        images = [i for i in coco["images"] if source_group(Path(i["file_name"]).stem) in groups]
        ids = {i["id"] for i in images}
        (target / name).mkdir(parents=True)
        for image in images:
            os.symlink(source / name / image["file_name"], target / name / image["file_name"])
        coco = coco | {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
        (target / name / "_annotations.coco.json").write_text(json.dumps(coco))


def test_real_exports_convert_and_split_without_leaks(tmp_path):
    require_realdata(REALDATA)  # skips without the exports, fails under CI (DRYWALL_QA_REQUIRE_REALDATA)
    raw = tmp_path / "data/raw"
    # Crack annotations with an empty segmentation (bbox fallback) and taping's zero-area boxes.
    slice_export(REALDATA / "cracks-3ii36", raw / "cracks", 25, lambda a: a["segmentation"] == [])
    slice_export(REALDATA / "drywall-join-detect", raw / "taping", 8, lambda a: a["bbox"][2] * a["bbox"][3] == 0)
    sliced = {d: [json.loads(p.read_text()) for p in (raw / d).glob("*/_annotations.coco.json")] for d in PROMPTS}
    prompts = {"cracks": ["segment crack"], "taping": ["segment taping area", "segment joint/tape"]}

    report = convert_all(
        raw,
        prompts,
        tmp_path / "data/masks",
        tmp_path / "data/interim/images.csv",
        tmp_path / "metrics/conversion.json",
        repo_root=tmp_path,
    )
    stats = write_split(
        tmp_path / "data/interim/images.csv",
        prompts,
        FRACTIONS,
        42,
        tmp_path / "data/manifest.csv",
        tmp_path / "metrics/split.json",
        repo_root=tmp_path,
    )

    cracks, taping = report["datasets"]["cracks"], report["datasets"]["taping"]
    empty_segmentations = sum(a["segmentation"] == [] for c in sliced["cracks"] for a in c["annotations"])
    zero_area = sum(a["bbox"][2] * a["bbox"][3] == 0 for c in sliced["taping"] for a in c["annotations"])
    assert empty_segmentations > 0 and zero_area > 0
    assert cracks["annotations"]["fixes"]["bbox_fallback"] == empty_segmentations
    polygons = cracks["annotations"]["converted"] - empty_segmentations
    assert cracks["annotations"]["converted_by_kind"]["polygon"] == polygons
    assert cracks["superclasses_ignored"] == {"0": "crack"}
    # Taping is boxes only: every converted annotation came from its bbox.
    boxes = taping["annotations"]["converted"]
    assert taping["annotations"]["converted_by_kind"] == {"polygon": 0, "box": boxes, "rle": 0}
    assert taping["annotations"]["fixes"]["bbox_fallback"] == taping["annotations"]["converted"] > 0
    assert taping["annotations"]["skipped_by_reason"]["zero_area_box"] == zero_area
    assert taping["superclasses_ignored"] == {"0": "Drywall-Join"}
    for name, dataset in (("cracks", cracks), ("taping", taping)):
        assert dataset["annotations"]["seen"] == sum(len(c["annotations"]) for c in sliced[name])
        assert dataset["images"]["seen"] == sum(len(c["images"]) for c in sliced[name])
        assert dataset["images"]["size_mismatch"] == 0

    with open(tmp_path / "data/manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    assert all(len(splits) == 1 for splits in splits_by_group(manifest).values())
    # The slice keeps Roboflow's cross-folder copies, so the leak it avoids is really there.
    assert stats["datasets"]["taping"]["groups_across_source_splits"] > 0
    for dataset in ("cracks", "taping"):
        assert all(stats["datasets"][dataset][name]["images"] > 0 for name in FRACTIONS)
    assert all((tmp_path / r["mask_path"]).is_file() and (tmp_path / r["image_path"]).is_file() for r in manifest)
