"""The real-data path: the genuine Roboflow exports in ../shared/realdata imported through the
`local` source (a seeded slice), converted with every SOURCE.md quirk counted, and split by source
image; and pretrained weights named in params reaching training (the path `scripts/run_real.sh
-S model.weights=...` takes). tests/test_split.py covers convert+split on a hand-picked slice of
the same exports (crack annotations without a polygon, zero-area taping boxes); this file covers
the download stage's import and the counts a user reads in metrics/conversion.json."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from required import require_realdata
from safetensors.torch import load_file

from drywall_qa.convert import convert_all
from drywall_qa.model import build_model
from drywall_qa.sources import fetch_raw_data
from drywall_qa.split import write_split
from drywall_qa.training.config import TrainConfig
from drywall_qa.training.loop import train

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
PROMPTS = {
    "cracks": ["segment crack", "segment wall crack"],
    "taping": ["segment taping area", "segment joint/tape", "segment drywall seam"],
}
FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
SLICE = 40  # images per dataset: a few seconds, yet several augmented copies per taping source image


def local_params(limit: int) -> dict:
    """The `data` params of a real run, as scripts/run_real.sh sets them (paths relative to the repo)."""
    return {
        "source": "local",
        "local": {
            "datasets": {
                "cracks": "../shared/realdata/cracks-3ii36",
                "taping": "../shared/realdata/drywall-join-detect",
            },
            "max_image_pixels": 50_000_000,
            "limit_per_dataset": limit,
        },
    }


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory) -> Path:
    """download (local, a seeded slice) -> convert -> split, run once into a temp folder."""
    require_realdata(REALDATA)  # skips without the exports, fails under CI (DRYWALL_QA_REQUIRE_REALDATA)
    root = tmp_path_factory.mktemp("real")
    fetch_raw_data(local_params(SLICE), seed=42, raw_dir=root / "data/raw", repo_root=REPO)
    convert_all(
        root / "data/raw",
        PROMPTS,
        root / "data/masks",
        root / "data/interim/images.csv",
        root / "metrics/conversion.json",
        repo_root=root,
    )
    write_split(
        root / "data/interim/images.csv",
        PROMPTS,
        FRACTIONS,
        42,
        root / "data/manifest.csv",
        root / "metrics/split.json",
        repo_root=root,
    )
    return root


def coco_documents(dataset_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(dataset_dir.glob("*/_annotations.coco.json"))}


def test_local_import_keeps_the_exports_as_roboflow_wrote_them(real_slice):
    source = json.loads((real_slice / "data/raw/source.json").read_text())
    assert source["source"] == "local" and source["limit_per_dataset"] == SLICE
    for name, folder in (("cracks", "cracks-3ii36"), ("taping", "drywall-join-detect")):
        record = source["datasets"][name]
        assert record["path"] == f"../shared/realdata/{folder}"  # as configured, not resolved
        assert record["format"] == "coco" and record["images"] == SLICE
        copied = coco_documents(real_slice / "data/raw" / name)
        assert sum(len(doc["images"]) for doc in copied.values()) == SLICE
        assert all(
            (real_slice / "data/raw" / name / split / image["file_name"]).is_file()
            for split, doc in copied.items()
            for image in doc["images"]
        )
    # cracks-3ii36 was exported without a train folder; the import does not invent one.
    assert set(coco_documents(real_slice / "data/raw/cracks")) <= {"valid", "test"}
    assert "train" in coco_documents(real_slice / "data/raw/taping")


def test_every_source_quirk_is_counted_in_the_conversion_report(real_slice):
    report = json.loads((real_slice / "metrics/conversion.json").read_text())["datasets"]
    raw = {name: coco_documents(real_slice / "data/raw" / name) for name in PROMPTS}
    annotations = {name: [a for doc in docs.values() for a in doc["annotations"]] for name, docs in raw.items()}
    cracks, taping = report["cracks"], report["taping"]

    # Category id 0 is an unused superclass, the labelled class is id 1; names differ per dataset.
    assert cracks["superclasses_ignored"] == {"0": "crack"}
    assert cracks["categories_used"] == {"1": "NewCracks - v2 2024-05-18 10-54pm"}
    assert taping["superclasses_ignored"] == {"0": "Drywall-Join"}
    assert taping["categories_used"] == {"1": "drywall-join"}

    # Taping has boxes only (`segmentation: []`): each converted annotation is its bbox.
    assert all(a["segmentation"] == [] for a in annotations["taping"])
    converted = taping["annotations"]["converted"]
    assert converted > 0
    assert taping["annotations"]["converted_by_kind"] == {"polygon": 0, "box": converted, "rle": 0}
    assert taping["annotations"]["fixes"]["bbox_fallback"] == converted
    zero_area = sum(a["bbox"][2] * a["bbox"][3] == 0 for a in annotations["taping"])
    assert taping["annotations"]["skipped_by_reason"]["zero_area_box"] == zero_area

    # Cracks are polygons; an annotation with an empty segmentation falls back to its box, counted.
    empty = sum(a["segmentation"] == [] for a in annotations["cracks"])
    assert cracks["annotations"]["fixes"]["bbox_fallback"] == empty
    assert cracks["annotations"]["converted_by_kind"]["box"] == empty
    assert cracks["annotations"]["converted_by_kind"]["polygon"] == cracks["annotations"]["converted"] - empty

    for name, dataset in report.items():  # nothing dropped silently
        a, i = dataset["annotations"], dataset["images"]
        assert a["seen"] == len(annotations[name]) == a["converted"] + a["skipped"]
        assert a["skipped"] == sum(a["skipped_by_reason"].values())
        assert i["seen"] == SLICE == i["converted"] + i["skipped"]
        assert i["skipped"] == sum(i["skipped_by_reason"].values())
        # converted images per export folder; an image whose boxes were all skipped is not a negative
        assert set(i["by_source_split"]) == set(raw[name]) and sum(i["by_source_split"].values()) == i["converted"]
        assert i["empty_masks"] == 0  # every image of both exports is labelled
    assert "train" not in cracks["images"]["by_source_split"]


def test_the_split_keeps_each_source_image_in_one_split_and_fills_all_three(real_slice):
    with open(real_slice / "data/manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    splits_of_group = defaultdict(set)
    for row in manifest:
        splits_of_group[row["dataset"], row["group"]].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    # Roboflow's augmented copies share a group: fewer groups than images, and some copies sat in
    # different export folders (the leak the group split avoids).
    stats = json.loads((real_slice / "metrics/split.json").read_text())["datasets"]
    assert stats["taping"]["groups_across_source_splits"] > 0
    for dataset in PROMPTS:
        per_split = stats[dataset]
        assert sum(per_split[s]["images"] for s in FRACTIONS) == len(
            {r["image_id"] for r in manifest if r["dataset"] == dataset}
        )
        assert all(per_split[s]["images"] > 0 and per_split[s]["groups"] > 0 for s in FRACTIONS)
    # cracks had no train folder, yet its images reach the train split (folders are merged first).
    assert stats["cracks"]["train"]["images"] > 0


def test_pretrained_weights_in_params_reach_training(synthetic_exports, tmp_path):
    """`-S model.weights=<folder or Hub id> -S model.freeze_backbone=true`: training starts from those
    weights, keeps the frozen backbone bit-identical and records where it started. (On the small
    synthetic exports, so it runs without the real data too.)"""
    torch.set_num_threads(1)
    data = tmp_path / "data"
    convert_all(
        synthetic_exports, PROMPTS, data / "masks", data / "images.csv", data / "conversion.json", repo_root=tmp_path
    )
    write_split(
        data / "images.csv",
        PROMPTS,
        FRACTIONS,
        42,
        data / "manifest.csv",
        data / "split.json",
        masks_dir="data/masks",
        repo_root=tmp_path,
    )
    pretrained = tmp_path / "pretrained"
    model, processor = build_model(
        "tiny", None, 32, freeze_backbone=False, prompts=PROMPTS["cracks"] + PROMPTS["taping"]
    )
    with torch.no_grad():  # a mark no scratch build with any seed has
        model.clip.vision_model.embeddings.patch_embedding.weight.fill_(0.0123)
    model.save_pretrained(pretrained)
    processor.save_pretrained(pretrained)

    params = {
        "seed": 1,
        "lr": 1e-3,
        "model": {"weights": str(pretrained), "preset": "small", "freeze_backbone": True, "image_size": 32},
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "weight_decay": 0.0,
            "scheduler": "constant",
            "warmup_epochs": 0,
            "early_stopping_patience": 5,
            "grad_clip": 1.0,
            "bce_weight": 1.0,
            "dice_weight": 1.0,
            "negative_prompts": True,
            "augment": False,
            "cache_activations": False,
            "cached_views": 1,
            "num_threads": 1,
        },
    }
    config = TrainConfig.from_params(params)
    out = tmp_path / "run"
    summary = train(
        config,
        data / "manifest.csv",
        out / "models",
        out / "train.json",
        out / "history.csv",
        root=tmp_path,
        progress=False,
        log=lambda _: None,
    )

    assert summary["weights_init"] == str(pretrained) and summary["frozen_backbone"] is True
    assert summary["trainable_params"] < summary["params"]
    saved = load_file(out / "models/best/model.safetensors")
    before = load_file(pretrained / "model.safetensors")
    # The folder's architecture won over the `small` preset, and the frozen encoder did not move.
    assert saved.keys() == before.keys()
    vision = [key for key in before if ".vision_model." in key]
    assert vision and all(torch.equal(saved[key], before[key]) for key in vision)
    assert torch.all(saved["clip.vision_model.embeddings.patch_embedding.weight"] == 0.0123)
    decoder = [key for key in before if key.startswith("decoder.")]
    assert any(not torch.equal(saved[key], before[key]) for key in decoder)  # the decoder trained
