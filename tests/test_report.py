"""The generated report: sections, the data/weights line, numbers taken from the metrics, clear errors."""

import json
from pathlib import Path

import pytest
from PIL import Image

from drywall_qa.contracts.naming import prompt_slug
from drywall_qa.evaluate import summary_metrics
from drywall_qa.metrics import Counts
from drywall_qa.params import load_params
from drywall_qa.report import (
    ReportError,
    _result_rows,
    build_report,
    load_inputs,
    pipeline_headline,
    pipeline_tags,
    write_report,
)
from drywall_qa.runtime import measure_runtime
from drywall_qa.training.config import TrainConfig

PARAMS = load_params(Path(__file__).parents[1] / "params.yaml")
SECTIONS = [
    "## Goal",
    "## Approach and model",
    "## Data and splits",
    "## Training",
    "## Test results",
    "## Visual examples",
    "## Failure cases",
    "## Runtime and footprint",
    "## Reproducibility",
]


def _eval_metrics() -> dict:
    """eval.json built with the evaluation's own functions, so the key names are the real ones."""
    pairs = []
    for dataset, prompts in PARAMS["prompts"].items():
        for index, prompt in enumerate(prompts):
            pairs += [
                {"dataset": dataset, "prompt": prompt, "counts": Counts(30 + index, 10, 10, 950)},
                {"dataset": dataset, "prompt": prompt, "counts": Counts(0, 0, 0, 1000)},
            ]
    metrics = summary_metrics(pairs, "test") | summary_metrics(pairs[::2], "zero_shot.test", per_group=("miou", "dice"))
    metrics |= {f"threshold.{prompt_slug(p)}": 0.4 for ps in PARAMS["prompts"].values() for p in ps}
    metrics |= {
        "val.miou": 0.77,
        "test.cracks.miou_ci_low": 0.3,
        "test.cracks.miou_ci_high": 0.55,
        "zero_shot.threshold": 0.5,
        "cross_prompt.test.pred_fg_fraction": 0.01,
        "cross_prompt.test.empty_rate": 0.9,
        "cross_prompt.test.pairs": 20,
    }
    metrics |= measure_runtime(
        lambda images, prompts: [None] * len(images), [Image.new("RGB", (4, 4))], ["a"], ["a", "b"]
    )
    metrics |= {
        "runtime.device": "cpu (x86_64, 2 threads)",
        "footprint.params": 920674,
        "footprint.checkpoint_bytes": 3_700_000,
        "footprint.peak_rss_bytes": 600_000_000,
    }
    return metrics


def _split_counts(images: int) -> dict:
    return {"images": images, "groups": images - 1, "pairs": images * 2, "image_fraction": 0.7, "target_fraction": 0.7}


@pytest.fixture
def inputs_on_disk(tmp_path):
    files = {
        "source.json": {
            "source": "synthetic",
            "seed": 42,
            "generator": {"source_images": 80},
            "datasets": {
                name: {
                    "workspace": "ws",
                    "project": name,
                    "version": 1,
                    "format": "coco",
                    "geometry": "polygons",
                    "images": 100,
                    "annotations": 150,
                    "splits": {"train": {"images": 70}},
                }
                for name in ("cracks", "taping")
            },
        },
        "conversion.json": {
            "datasets": {
                name: {
                    "annotations": {
                        "seen": 150,
                        "converted": 147,
                        "skipped": 3,
                        "skipped_by_reason": {"polygon_lt_3_points": 3, "malformed": 0},
                        "converted_by_kind": {"polygon": 147, "box": 0, "rle": 0},
                    },
                    "images": {"seen": 100, "converted": 100, "skipped": 0, "skipped_by_reason": {}, "empty_masks": 7},
                }
                for name in ("cracks", "taping")
            },
        },
        "split.json": {
            "seed": 42,
            "datasets": {
                name: {
                    "train": _split_counts(70),
                    "val": _split_counts(15),
                    "test": _split_counts(15),
                    "groups_across_source_splits": 4,
                }
                for name in ("cracks", "taping")
            },
        },
        "train.json": {
            "weights_init": "scratch:tiny",
            "best_epoch": 9,
            "best_val_miou": 0.61,
            "best_val_dice": 0.7,
            "epochs_run": 12,
            "seconds": 321.5,
            "device": "cpu",
            "trainable_params": 920674,
            "frozen_backbone": False,
            "train_images": 140,
            "val_images": 30,
        },
        "eval.json": _eval_metrics(),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    figures = tmp_path / "figures"
    figures.mkdir()
    names = ["training_curves.png", "threshold_sweep.png", "prompt_sensitivity.png"] + [
        f"{kind}__{prompt_slug(p)}.png"
        for ps in PARAMS["prompts"].values()
        for p in ps
        for kind in ("examples", "failures")
    ]
    for name in names:
        Image.new("RGB", (4, 4)).save(figures / name)
    return tmp_path


def _load(root: Path):
    return load_inputs(
        root / "source.json",
        root / "conversion.json",
        root / "split.json",
        root / "train.json",
        root / "eval.json",
        root / "figures",
    )


def _build(root: Path, **changes) -> str:
    inputs = _load(root)
    for name, value in changes.items():
        setattr(inputs, name, value)
    return build_report(
        inputs, PARAMS, git_commit="abc123", raw_data_hash="d41d8cd9.dir", mlflow_ids={"pipeline run": "run42"}
    )


def test_report_has_every_section_and_states_data_and_weights_first(inputs_on_disk):
    report = _build(inputs_on_disk)
    lines = report.splitlines()
    assert lines[2] == "**Data: synthetic (generated offline), weights: scratch (tiny)**"
    assert "say **nothing** about how the" in report  # the synthetic warning
    positions = [report.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    for text in ("abc123", "d41d8cd9.dir", "run42", "`polygon_lt_3_points` 3", "seed: 42"):
        assert text in report, text


def test_report_numbers_come_from_the_metrics(inputs_on_disk):
    metrics = json.loads((inputs_on_disk / "eval.json").read_text())
    report = _build(inputs_on_disk)
    assert f"Test mIoU **{metrics['test.miou']:.4f}**" in report
    assert f"| cracks | `segment crack` | 0.4 | {metrics['test.segment_crack.miou']:.4f} |" in report
    assert f"| {metrics['test.cracks.miou']:.4f} [0.300, 0.550] |" in report  # the interval over source photos
    assert f"{metrics['zero_shot.test.segment_crack.miou']:.4f}" in report
    assert "920,674" in report and "3.5 MiB" in report
    assert "](../plots/figures/examples__segment_joint-tape.png)" in report
    # train.json: 321.5 s over 12 epochs
    assert "| training time | 322 s (26.8 s per epoch, validation included) |" in report


def test_a_dataset_row_shows_its_interval_when_eval_json_has_it(inputs_on_disk):
    inputs = _load(inputs_on_disk)
    inputs.eval = {
        **inputs.eval,
        "test.taping.miou": 0.5,
        "test.taping.miou_ci_low": 0.41,
        "test.taping.miou_ci_high": 0.6,
    }
    inputs.eval = {key: value for key, value in inputs.eval.items() if not key.startswith("test.cracks.miou_ci")}
    rows = {row[0]: row for row in _result_rows(inputs.eval, PARAMS)}
    assert rows["**taping**"][3] == "0.5000 [0.410, 0.600]"
    assert rows["**cracks**"][3] == f"{inputs.eval['test.cracks.miou']:.4f}"  # an eval.json from before intervals


def test_report_of_real_data_and_pretrained_weights(inputs_on_disk):
    inputs = _load(inputs_on_disk)
    source = inputs.source | {"source": "roboflow"}
    train = inputs.train | {"weights_init": "CIDAS/clipseg-rd64-refined"}
    report = _build(inputs_on_disk, source=source, train=train)
    assert report.splitlines()[2] == (
        "**Data: real data (Roboflow exports via the SDK), weights: pretrained `CIDAS/clipseg-rd64-refined`**"
    )
    assert "Warning: synthetic data" not in report
    # Only measured numbers: the uncited literature figures the report once carried are gone.
    assert "Reference points" not in report and "~0.44" not in report


def test_synthetic_report_counts_unique_source_images(inputs_on_disk):
    inputs = _load(inputs_on_disk)
    report = _build(inputs_on_disk)
    for dataset, per_split in inputs.split["datasets"].items():
        images = sum(per_split[s]["images"] for s in ("train", "val", "test"))
        groups = sum(per_split[s]["groups"] for s in ("train", "val", "test"))
        assert f"| **{dataset}** | all | {images} | {groups} |" in report


def test_missing_input_names_the_file(inputs_on_disk):
    (inputs_on_disk / "train.json").unlink()
    with pytest.raises(ReportError, match=r"train\.json does not exist: run the `train` stage"):
        _load(inputs_on_disk)


def test_missing_figure_names_the_file(inputs_on_disk):
    (inputs_on_disk / "figures" / "failures__segment_crack.png").unlink()
    with pytest.raises(ReportError, match="failures__segment_crack.png does not exist"):
        _build(inputs_on_disk)


def test_missing_metric_names_the_key(inputs_on_disk):
    metrics = json.loads((inputs_on_disk / "eval.json").read_text())
    del metrics["threshold.segment_taping_area"]
    with pytest.raises(ReportError, match="threshold.segment_taping_area"):
        _build(inputs_on_disk, eval=metrics)


def test_write_report(inputs_on_disk, tmp_path):
    paths = write_report(_build(inputs_on_disk), tmp_path / "reports")
    assert paths[0] == tmp_path / "reports" / "report.md"
    assert paths[0].read_text().startswith("# drywall-qa")
    if len(paths) == 2:  # markdown-it-py installed
        html = paths[1].read_text()
        assert "<table>" in html and 'src="../plots/figures/training_curves.png"' in html
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(p.name for p in paths)


def test_report_states_how_masks_are_made_and_the_wall_time_of_each_stage(inputs_on_disk):
    native = PARAMS | {
        "inference": {"mode": "whole", "scale": 0.75, "overlap": 0.5},
        "train": PARAMS["train"] | {"crop_scale_jitter": [0.7, 1.4], "crop_foreground_prob": 0.7},
    }
    report = build_report(
        _load(inputs_on_disk),
        native,
        git_commit="abc",
        raw_data_hash=None,
        mlflow_ids={},
        stage_seconds={"train": 3000.25, "evaluate": 99.5},
    )
    side = PARAMS["model"]["image_size"]
    assert (
        f"| training images | {side} x {side} crops of the photo scaled by 0.75 (jitter x0.7-1.4), 70% of them"
        in report
    )
    assert "| masks made by | one pass over the whole photo scaled by 0.75, upsampled to its size |" in report
    assert "| train | 3,000.2 |" in report and "| evaluate | 99.5 |" in report
    assert "| **all stages above** | **3,099.8** |" in report
    assert report.index("### Wall time per stage") > report.index("## Runtime and footprint")
    resized = _build(inputs_on_disk)
    assert f"| training images | whole photos resized to {side} x {side} |" in resized
    assert "### Wall time per stage" not in resized  # no MLflow record of the stages: no table


def config_with(**sections) -> TrainConfig:
    """The committed params' training config with some keys of some sections changed."""
    return TrainConfig.from_params(PARAMS).changed(**sections)


def test_the_report_names_the_test_time_views_and_counts_their_passes():
    from drywall_qa.report import _passes, describe_inference

    config = config_with(model={"image_size": 224}, inference={"flips": ["horizontal", "vertical"], "sizes": [256]})
    assert describe_inference(config) == (
        "the photo resized to 256 x 256 (the model trains at 224 x 224), logits upsampled to its size; "
        "also mirrored horizontal and vertical, the views' logits averaged"
    )
    assert _passes(config.inference) == "3 test-time views, one vision pass each"
    assert _passes(config_with(inference={"mode": "resize"}).inference) == "one vision pass"


def test_the_report_states_the_augmentation_its_params_chose():
    from drywall_qa.report import describe_augmentation

    resize = {"mode": "resize"}
    assert describe_augmentation(config_with(inference=resize, train={"augment": False})) == "none"
    assert describe_augmentation(config_with(inference=resize, train={"augment": True})) == (
        "flips, zoom 0.9–1.1, ±15° rotation, brightness/contrast"
    )
    strong = config_with(inference=resize, train={"augment": True, "augment_scale": [0.75, 1.33], "augment_color": 0.3})
    assert (
        describe_augmentation(strong) == "flips, zoom 0.75–1.33, ±15° rotation, brightness/contrast, colour jitter 0.3"
    )
    native = config_with(inference={"mode": "whole"}, train={"augment": True, "crop_scale_jitter": [0.7, 1.4]})
    assert describe_augmentation(native).startswith("crops at scale 0.7–1.4")


def test_the_report_states_the_loss_with_its_cldice_term_when_on():
    from drywall_qa.report import describe_loss

    plain = {"bce_weight": 1.0, "dice_weight": 1.0}
    assert describe_loss(config_with(train=plain).train) == "1.0 x BCE + 1.0 x Dice"
    off = {**plain, "cldice_weight": 0.0, "cldice_datasets": ["cracks"]}
    assert describe_loss(config_with(train=off).train) == "1.0 x BCE + 1.0 x Dice"
    on = {**plain, "cldice_weight": 0.5, "cldice_datasets": ["cracks"]}
    assert describe_loss(config_with(train=on).train) == (
        "1.0 x BCE + 1.0 x Dice + 0.5 x soft clDice on the cracks prompts"
    )


def test_the_mlflow_parent_shows_the_headline_in_one_line_and_tags_that_agree(inputs_on_disk):
    inputs = _load(inputs_on_disk)
    inputs.eval = {**inputs.eval, "test.cracks.miou": 0.41, "test.taping.miou": 0.52, "val.cracks.miou": 0.4}
    inputs.eval.pop("val.taping.miou", None)  # an eval.json without it: the line shows what there is
    registration = {"name": "m", "version": "7", "model_uri": "models:/m-abc", "gate_passed": True, "champion": True}
    line = pipeline_headline(inputs, registration)
    assert line == (
        "**Test mIoU cracks 0.4100 · taping 0.5200 | val mIoU cracks 0.4000 | data: synthetic (generated offline) | "
        "weights: scratch (tiny) | gate passed: models:/m/7 @champion**"
    )
    tags = pipeline_tags(inputs, {**registration, "gate_passed": False, "champion": False})
    assert tags == {
        "data_source": "synthetic",
        "weights": "scratch (tiny)",  # the description's words
        "gate": "failed",
        "registered_model": "models:/m/7",
        "logged_model": "models:/m-abc",
    }
    assert "gate failed: models:/m/7**" in pipeline_headline(inputs, {**registration, "champion": False})
