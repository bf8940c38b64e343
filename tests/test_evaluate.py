"""Evaluation logic with known probabilities: threshold choice on val, test scores, prediction files, outputs."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from drywall_qa.contracts.manifest import ManifestError, image_records, read_manifest
from drywall_qa.contracts.naming import mask_file_name
from drywall_qa.evaluate import EvaluationError, add_zero_shot, choose_thresholds, evaluate_predictions, write_outputs
from drywall_qa.metrics import Counts
from drywall_qa.runtime import measure_runtime

W, H = 8, 6
PROMPTS = {"cracks": ["segment crack"], "taping": ["segment taping area", "segment joint/tape"]}
ALL_PROMPTS = ["segment crack", "segment taping area", "segment joint/tape"]
THRESHOLDS = [0.1, 0.3, 0.5, 0.7, 0.9]


def region(x0, x1, y0=0, y1=H):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


class FakeModel:
    """Probabilities chosen per (image, prompt); images are told apart by their red value."""

    def __init__(self):
        self.probs: dict[tuple[int, str], np.ndarray] = {}
        self.calls: list[tuple[int, list[str]]] = []

    def __call__(self, images, prompts):
        self.calls.append((len(images), list(prompts)))
        out = []
        for image in images:
            key = int(np.asarray(image)[0, 0, 0])
            empty = np.zeros((image.height, image.width), np.float32)
            out.append(np.stack([self.probs.get((key, p), empty) for p in prompts]).astype(np.float32))
        return out


@pytest.fixture
def dataset(tmp_path):
    """Two datasets, val and test images, GT masks on disk, a manifest, and a model whose
    probabilities make 0.7 the best crack threshold and 0.3 the best taping thresholds on val."""
    model = FakeModel()
    rows = []
    specs = [  # (dataset, split, image_id, colour, gt per prompt, probs per prompt)
        ("cracks", "val", "c_val", 10),
        ("cracks", "test", "c_test", 11),
        ("cracks", "test", "c_empty", 12),
        ("taping", "val", "t_val", 20),
        ("taping", "test", "t_test", 21),
    ]
    gts = {
        "c_val": region(0, 2),
        "c_test": region(0, 4),
        "c_empty": np.zeros((H, W), bool),
        "t_val": region(4, 8),
        "t_test": region(2, 6),
    }
    for dataset_name, split, image_id, colour in specs:
        image_path = tmp_path / "raw" / dataset_name / f"{image_id}.png"  # lossless: the colour is the key
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (colour, 0, 0)).save(image_path)
        for prompt in PROMPTS[dataset_name]:
            mask_path = tmp_path / "masks" / dataset_name / mask_file_name(image_id, prompt)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gts[image_id].astype(np.uint8) * 255, mode="L").save(mask_path)
            rows.append(
                {
                    "dataset": dataset_name,
                    "split": split,
                    "image_id": image_id,
                    "image_path": image_path.relative_to(tmp_path).as_posix(),
                    "mask_path": mask_path.relative_to(tmp_path).as_posix(),
                    "prompt": prompt,
                    "group": image_id,
                    "width": W,
                    "height": H,
                    "source_split": "train",
                }
            )
    # cracks: GT pixels 0.75, a band of background at 0.65 (false positives below 0.7), rest 0.05
    for image_id, colour in (("c_val", 10), ("c_test", 11), ("c_empty", 12)):
        probs = np.where(gts[image_id], 0.75, 0.05).astype(np.float32)
        probs[:, 6:] = 0.65
        model.probs[(colour, "segment crack")] = probs
    # taping: GT pixels 0.35 (missed above 0.3), background 0.05
    for image_id, colour in (("t_val", 20), ("t_test", 21)):
        for prompt in PROMPTS["taping"]:
            model.probs[(colour, prompt)] = np.where(gts[image_id], 0.35, 0.05).astype(np.float32)
    # the crack prompt on a taping test image lights up one column: a cross-prompt false positive
    model.probs[(21, "segment crack")] = region(0, 1).astype(np.float32)
    manifest_path = tmp_path / "manifest.csv"
    with open(manifest_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rows = read_manifest(manifest_path)
    return tmp_path, (image_records(rows, "val", tmp_path), image_records(rows, "test", tmp_path)), model, gts


def test_thresholds_are_chosen_on_val_and_applied_to_test(dataset):
    root, manifest, model, _ = dataset
    result = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, root / "pred", chunk_size=2)
    assert result.thresholds == {"segment crack": 0.7, "segment taping area": 0.3, "segment joint/tape": 0.3}
    m = result.metrics
    assert m["threshold.segment_crack"] == 0.7 and m["threshold.segment_joint-tape"] == 0.3
    # at 0.7 c_test is exact; c_empty has no GT but the 0.65 band is below 0.7: empty/empty = 1
    assert m["test.segment_crack.miou"] == pytest.approx(1.0)
    assert m["test.taping.miou"] == pytest.approx(1.0)
    assert m["val.miou"] == pytest.approx(1.0)
    assert m["test.pairs"] == 4  # 2 crack images x 1 prompt + 1 taping image x 2 prompts
    sweep = {(r["prompt"], r["threshold"]): r for r in result.sweep}
    # at 0.5 the 0.65 band (2 of 8 columns) is predicted too: IoU 2/4 on c_val
    assert sweep[("segment crack", 0.5)]["val_miou"] == pytest.approx(0.5)
    assert sweep[("segment crack", 0.5)]["precision"] == pytest.approx(0.5)
    assert sweep[("segment crack", 0.9)]["val_miou"] == 0.0
    assert sweep[("segment taping area", 0.5)]["recall"] == 0.0
    # the crack prompt on the taping test image predicts one of 8 columns
    assert m["cross_prompt.test.pairs"] == 5  # c_test and c_empty x 2 taping prompts; t_test x crack
    assert m["cross_prompt.test.pred_fg_fraction"] == pytest.approx((1 / 8) / 5)
    assert m["cross_prompt.test.empty_rate"] == pytest.approx(4 / 5)


def test_each_dataset_score_gets_an_interval_over_source_photos(dataset):
    _root, manifest, model, _ = dataset
    model.probs[(12, "segment crack")] = np.full((H, W), 0.9, np.float32)  # c_empty: all predicted, IoU 0
    m = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None).metrics
    # test cracks: IoU 1 (c_test) and 0 (c_empty), two photos: resample means 0, 0.5 or 1
    assert m["test.cracks.miou"] == 0.5
    assert (m["test.cracks.miou_ci_low"], m["test.cracks.miou_ci_high"]) == (0.0, 1.0)
    assert (m["val.taping.miou_ci_low"], m["val.taping.miou_ci_high"]) == (1.0, 1.0)  # one photo, two prompts
    # copies of one source photo are resampled together: one group, no spread
    groups = {("cracks", "c_val"): "c", ("cracks", "c_test"): "c", ("cracks", "c_empty"): "c"}
    groups |= {("taping", "t_val"): "t", ("taping", "t_test"): "t"}
    m = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None, groups=groups).metrics
    assert (m["test.cracks.miou_ci_low"], m["test.cracks.miou_ci_high"]) == (0.5, 0.5)


def test_test_scores_use_the_chosen_threshold_not_0_5(dataset):
    _root, manifest, model, gts = dataset
    # c_test's 0.65 band is below 0.7 but above 0.5: a 0.5 threshold would score IoU 4/6
    result = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None)
    rows = {(r["image_id"], r["prompt"]): r for r in result.per_image}
    assert rows[("c_test", "segment crack")]["iou"] == pytest.approx(1.0)
    assert rows[("c_test", "segment crack")]["gt_fg_fraction"] == pytest.approx(gts["c_test"].mean())
    assert rows[("c_empty", "segment crack")]["pred_fg_fraction"] == 0.0


def test_prediction_files_follow_the_mask_contract(dataset):
    root, manifest, model, _ = dataset
    result = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, root / "pred")
    expected = {
        f"{dataset_name}/{mask_file_name(image_id, prompt)}"
        for dataset_name, image_id in (("cracks", "c_test"), ("cracks", "c_empty"), ("taping", "t_test"))
        for prompt in ALL_PROMPTS
    }
    written = {p.relative_to(root / "pred").as_posix() for p in (root / "pred").rglob("*") if p.is_file()}
    assert written == expected
    for name in expected:
        with Image.open(root / "pred" / name) as image:
            assert image.mode == "L" and image.size == (W, H)
            values = np.asarray(image)
        assert set(np.unique(values)) <= {0, 255}
    # the stored crack prediction of c_test is its probabilities binarised at the chosen 0.7
    stored = np.asarray(Image.open(root / "pred" / "cracks" / mask_file_name("c_test", "segment crack"))) == 255
    assert np.array_equal(stored, model.probs[(11, "segment crack")] >= result.thresholds["segment crack"])


def test_outputs_are_flat_json_and_tables(dataset, tmp_path):
    _root, manifest, model, _ = dataset
    result = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None)
    zero = FakeModel()  # predicts nothing: IoU 1 on the empty-GT image only
    add_zero_shot(result, zero, manifest[1])
    write_outputs(result, tmp_path / "metrics" / "eval.json", tmp_path / "plots")
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert all(not isinstance(v, dict) for v in metrics.values())
    for key in (
        "test.miou",
        "test.dice",
        "test.cracks.iou_dataset",
        "test.segment_crack.miou",
        "threshold.segment_crack",
        "zero_shot.test.miou",
        "val.segment_crack.miou",
        "test.precision",
        "test.recall",
        "test.pixel_accuracy",
    ):
        assert key in metrics, key
    assert metrics["zero_shot.test.miou"] == pytest.approx(1 / 4)
    assert metrics["zero_shot.test.segment_crack.miou"] == pytest.approx(1 / 2)
    with open(tmp_path / "plots" / "eval_per_prompt.csv") as handle:
        per_prompt = {row["prompt"]: row for row in csv.DictReader(handle)}
    assert float(per_prompt["segment crack"]["zero_shot_miou"]) == pytest.approx(0.5)
    assert float(per_prompt["segment crack"]["threshold"]) == 0.7
    assert per_prompt["segment crack"]["boxes"] == str(metrics["boxes.segment_crack"])
    with open(tmp_path / "plots" / "eval_per_image.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [
            "image_id",
            "dataset",
            "prompt",
            "iou",
            "dice",
            "gt_fg_fraction",
            "pred_fg_fraction",
        ]
        assert len(list(reader)) == 4
    with open(tmp_path / "plots" / "threshold_sweep.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["prompt", "threshold", "val_miou", "val_dice", "precision", "recall"]
        assert len(list(reader)) == len(ALL_PROMPTS) * len(THRESHOLDS)


def test_flat_val_curve_picks_the_threshold_closest_to_0_5():
    nothing_found = [[Counts(0, 0, 5, 10)] * 3]  # one pair, same counts at every threshold
    sweep = {("p", None): nothing_found, ("p", "boxes"): nothing_found, ("p", "arms"): nothing_found}
    chosen, boxed, _ = choose_thresholds(sweep, [0.3, 0.5, 0.7])
    assert chosen == {"p": 0.5}
    assert boxed == {}  # a tie keeps the masks as predicted


def test_a_snap_wins_only_by_a_higher_val_miou_and_boxes_win_ties_with_arms():
    half = [[Counts(5, 5, 0, 90)] * 2]  # IoU 0.5 at both thresholds
    whole = [[Counts(10, 0, 0, 90)] * 2]  # IoU 1
    chosen, boxed, _ = choose_thresholds({("p", None): half, ("p", "boxes"): half, ("p", "arms"): whole}, [0.3, 0.5])
    assert (chosen, boxed) == ({"p": 0.5}, {"p": "arms"})
    _, boxed, _ = choose_thresholds({("p", None): half, ("p", "boxes"): whole, ("p", "arms"): whole}, [0.3, 0.5])
    assert boxed == {"p": "boxes"}


def checkerboard_in(mask):
    """Every other pixel of `mask`: one 8-connected component whose bounding box is the mask's box."""
    rows, cols = np.indices(mask.shape)
    return mask & ((rows + cols) % 2 == 0)


def test_val_decides_per_prompt_whether_components_snap_to_boxes(dataset):
    root, manifest, model, gts = dataset
    for image_id, colour in (("t_val", 20), ("t_test", 21)):
        for prompt in PROMPTS["taping"]:  # half the box found, scattered over all of it
            model.probs[(colour, prompt)] = np.where(checkerboard_in(gts[image_id]), 0.9, 0.05).astype(np.float32)

    plain = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None)
    assert plain.boxed == {}
    assert plain.metrics["boxes.segment_taping_area"] == 0
    assert plain.metrics["test.taping.miou"] == pytest.approx(0.5)

    snapped = evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, root / "pred", snaps=("boxes", "arms"))
    # taping gains on val (IoU 0.5 -> 1); the crack prompt's band is already a box: a tie stays unsnapped
    assert snapped.boxed == {"segment taping area": "boxes", "segment joint/tape": "boxes"}
    assert snapped.metrics["boxes.segment_taping_area"] == 1
    assert snapped.metrics["arms.segment_taping_area"] == 0  # arms tie with boxes here: boxes win
    assert snapped.metrics["boxes.segment_crack"] == 0
    assert snapped.metrics["val.segment_taping_area.miou"] == pytest.approx(1.0)
    assert snapped.metrics["test.taping.miou"] == pytest.approx(1.0)
    assert snapped.metrics["test.segment_crack.miou"] == plain.metrics["test.segment_crack.miou"]
    written = np.asarray(Image.open(root / "pred" / "taping" / mask_file_name("t_test", "segment taping area")))
    np.testing.assert_array_equal(written == 255, gts["t_test"])
    # the threshold curve (the plot) stays the unsnapped one: one row per prompt and threshold
    assert len(snapped.sweep) == len(ALL_PROMPTS) * len(THRESHOLDS)


def test_missing_mask_is_named(dataset):
    _root, manifest, model, _ = dataset
    (c_test,) = [image for image in manifest[1] if image.image_id == "c_test"]
    c_test.mask_paths["segment crack"].unlink()
    with pytest.raises(ManifestError, match="c_test__segment_crack.png does not exist"):
        evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None)


def test_mask_outside_the_contract_is_rejected(dataset):
    _root, manifest, model, _ = dataset
    (c_val,) = [image for image in manifest[0] if image.image_id == "c_val"]
    Image.fromarray(np.full((H, W), 1, np.uint8), mode="L").save(c_val.mask_paths["segment crack"])
    with pytest.raises(ManifestError, match=r"has values \[1\], expected only 0 and 255"):
        evaluate_predictions(model, *manifest, ALL_PROMPTS, THRESHOLDS, None)


def test_wrong_model_output_shape_is_an_error(dataset):
    _root, manifest, _, _ = dataset

    def half_size(images, prompts):
        return [np.zeros((len(prompts), H // 2, W // 2), np.float32) for _ in images]

    with pytest.raises(EvaluationError, match="expected"):
        evaluate_predictions(half_size, *manifest, ALL_PROMPTS, THRESHOLDS, None)


def test_prompt_missing_from_params_is_an_error(dataset):
    _root, manifest, model, _ = dataset
    with pytest.raises(EvaluationError, match="not in params.yaml"):
        evaluate_predictions(model, *manifest, ["segment crack"], THRESHOLDS, None)


def test_missing_manifest_names_the_stage(tmp_path):
    with pytest.raises(ManifestError, match="run the split stage"):
        read_manifest(tmp_path / "manifest.csv")


def test_runtime_warms_up_then_times_each_image_and_a_batch():
    model = FakeModel()
    images = [Image.new("RGB", (W, H), (i, 0, 0)) for i in range(3)]
    runtime = measure_runtime(model, images, ["a"], ["a", "b"], warmup=1)
    assert model.calls == [(1, ["a"]), (1, ["a", "b"])] + [(1, ["a"])] * 3 + [(1, ["a", "b"])] * 3 + [(3, ["a", "b"])]
    assert runtime["runtime.timing_images"] == 3 and runtime["runtime.n_prompts_all"] == 2
    assert runtime["runtime.ms_per_image_1_prompt"] > 0 and runtime["runtime.images_per_s"] > 0


def test_run_evaluation_with_a_tiny_model(dataset, tmp_path):
    """The stage's library entry point end to end with a tiny, randomly initialised CLIPSeg."""
    torch = pytest.importorskip("torch")
    from drywall_qa.evaluate import EvaluateSettings, run_evaluation
    from drywall_qa.model import build_model

    torch.set_num_threads(1)
    root, _, _, _ = dataset
    model_params = {"preset": "tiny", "weights": None, "image_size": 32, "freeze_backbone": False}
    model, processor = build_model(**model_params, prompts=ALL_PROMPTS)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "pred").mkdir()
    (root / "pred" / "stale.png").write_bytes(b"old run")  # replaced, not merged
    result = run_evaluation(
        model_dir=root / "model",
        manifest_path=root / "manifest.csv",
        settings=EvaluateSettings(
            PROMPTS, model_params, tuple(THRESHOLDS), batch_size=2, zero_shot=True, timing_images=2, seed=0
        ),
        predictions_dir=root / "pred",
        metrics_path=root / "eval.json",
        plots_dir=root / "plots",
        repo_root=root,
        device="cpu",
    )
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics == pytest.approx({k: round(v, 6) if isinstance(v, float) else v for k, v in result.metrics.items()})
    assert metrics["footprint.params"] == sum(p.numel() for p in model.parameters())
    assert metrics["footprint.checkpoint_bytes"] >= (root / "model" / "model.safetensors").stat().st_size
    assert metrics["footprint.peak_rss_bytes"] > 10_000_000
    assert metrics["runtime.timing_images"] == 2 and metrics["runtime.ms_per_image_all_prompts"] > 0
    assert metrics["runtime.device"].startswith("cpu")
    assert 0 <= metrics["zero_shot.test.miou"] <= 1 and 0 <= metrics["test.miou"] <= 1
    assert not (root / "pred" / "stale.png").exists()
    assert len(list((root / "pred").rglob("*.png"))) == 3 * len(ALL_PROMPTS)
    # no staging folder left (the gitignored replace lock beside pred/ stays for the next writer)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [".pred.replace-lock"]


def test_run_evaluation_names_a_missing_model(dataset):
    from drywall_qa.evaluate import EvaluateSettings, run_evaluation

    root, _, _, _ = dataset
    with pytest.raises(EvaluationError, match="run the `train` stage"):
        run_evaluation(
            model_dir=root / "nope",
            manifest_path=root / "manifest.csv",
            settings=EvaluateSettings(
                PROMPTS, {}, tuple(THRESHOLDS), batch_size=2, zero_shot=False, timing_images=1, seed=0
            ),
            predictions_dir=root / "pred",
            metrics_path=root / "eval.json",
            plots_dir=root / "plots",
            repo_root=root,
        )
