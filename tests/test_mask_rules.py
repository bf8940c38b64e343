"""The val-chosen mask rule of a prompt (threshold, snapped to boxes or not, and how): applied and carried."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drywall_qa.cli import boxed_for
from drywall_qa.contracts.mask_rule import (
    component_boxes,
    component_boxes_numpy,
    describe_rule,
    long_runs,
    snap_to_arms,
)
from drywall_qa.contracts.masks import binarize, snap_to_boxes
from drywall_qa.contracts.thresholds import ThresholdsError, read_boxed, read_thresholds, write_thresholds


def test_each_component_becomes_its_bounding_rectangle():
    mask = np.zeros((8, 10), bool)
    mask[1:5, 1] = True  # an L: its box is rows 1-4, columns 1-3
    mask[4, 1:4] = True
    mask[6, 8] = True  # a single pixel stays a single pixel
    expected = np.zeros_like(mask)
    expected[1:5, 1:4] = True
    expected[6, 8] = True
    np.testing.assert_array_equal(snap_to_boxes(mask), expected)
    assert not snap_to_boxes(np.zeros((3, 3), bool)).any()


def test_the_numpy_components_are_opencvs_on_random_and_blob_masks():
    """The ONNX runner's environment has no OpenCV: its labelling must give the same rectangles."""
    import cv2

    rng = np.random.default_rng(0)
    masks = [rng.random(tuple(rng.integers(1, 30, 2))) < rng.random() for _ in range(300)]
    for _ in range(5):  # blobs and thin lines, like real probability maps cut at a threshold
        smooth = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), 2.5)
        masks.append(smooth >= np.quantile(smooth, rng.uniform(0.5, 0.95)))
    masks += [np.zeros((4, 4), bool), np.ones((3, 5), bool)]
    for mask in masks:
        assert sorted(component_boxes_numpy(mask)) == sorted(component_boxes(mask))
    assert sum(len(component_boxes(mask)) for mask in masks) > 1000  # many components were compared


def test_binarize_snaps_only_when_asked():
    probs = np.zeros((5, 5), np.float32)
    probs[1, 1] = probs[2, 2] = 0.9  # diagonal neighbours: one 8-connected component
    assert binarize(probs, 0.5).sum() == 2
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(binarize(probs, 0.5, "boxes"), expected)
    with pytest.raises(ValueError, match="unknown snapping 'ovals'"):
        binarize(probs, 0.5, "ovals")


def test_thresholds_file_round_trips_the_snapped_prompts(tmp_path):
    path = tmp_path / "thresholds.json"
    thresholds = {"segment crack": 0.3, "segment taping area": 0.2, "segment drywall seam": 0.4}
    write_thresholds(path, thresholds, {"segment taping area": "boxes", "segment drywall seam": "arms"})
    assert json.loads(path.read_text()) == {
        "segment crack": 0.3,
        "segment taping area": {"threshold": 0.2, "snap": "boxes"},
        "segment drywall seam": {"threshold": 0.4, "snap": "arms"},
    }
    assert read_thresholds(path) == thresholds
    assert read_boxed(path) == {"segment taping area": "boxes", "segment drywall seam": "arms"}


def test_a_thresholds_file_written_before_the_arms_still_snaps_to_boxes(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"segment crack": 0.3, "segment taping area": {"threshold": 0.2, "boxes": True}}))
    assert read_boxed(path) == {"segment taping area": "boxes"}


def test_a_thresholds_file_without_boxes_snaps_nothing(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"segment crack": 0.4}))  # the format of models registered before snapping
    assert read_thresholds(path) == {"segment crack": 0.4}
    assert read_boxed(path) == {}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"segment crack": {"threshold": 0.4, "boxes": "yes"}}, "`boxes` of 'segment crack' must be true or false"),
        ({"segment crack": {"boxes": True}}, "threshold of 'segment crack' must be a number in \\[0, 1\\], got None"),
        ({"segment crack": {"threshold": 0.4, "snap": "ovals"}}, "`snap` of 'segment crack' must be one of"),
    ],
)
def test_a_bad_rule_is_named(tmp_path, document, message):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(document))
    reader = read_boxed if "boxes" in message or "snap" in message else read_thresholds
    with pytest.raises(ThresholdsError, match=message):
        reader(path)


def test_snapping_a_prompt_without_a_threshold_is_refused(tmp_path):
    with pytest.raises(ThresholdsError, match="snapped to boxes but have no threshold"):
        write_thresholds(tmp_path / "t.json", {"segment crack": 0.3}, {"segment taping area": "boxes"})
    with pytest.raises(ThresholdsError, match="unknown snapping"):
        write_thresholds(tmp_path / "t.json", {"segment crack": 0.3}, {"segment crack": "ovals"})


def test_predict_takes_the_snapping_from_eval_json_else_from_the_model(tmp_path):
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(
        json.dumps(
            {
                "threshold.segment_taping_area": 0.2,
                "boxes.segment_taping_area": 1,
                "arms.segment_taping_area": 1,
                "threshold.segment_crack": 0.3,
                "boxes.segment_crack": 1,
                "arms.segment_crack": 0,
            }
        )
    )
    prompts = ["segment crack", "segment taping area"]
    assert boxed_for(prompts, str(eval_json)) == {"segment taping area": "arms", "segment crack": "boxes"}
    assert boxed_for(prompts, None, {"segment taping area": "arms", "segment drywall seam": "boxes"}) == {
        "segment taping area": "arms"
    }
    assert boxed_for(prompts, None) == {}


def brute_force_long_runs(mask, length):
    out = np.zeros_like(mask)
    for row in range(mask.shape[0]):
        start = None
        for column in range(mask.shape[1] + 1):
            inside = column < mask.shape[1] and mask[row, column]
            if inside and start is None:
                start = column
            if not inside and start is not None:
                if column - start >= length:
                    out[row, start:column] = True
                start = None
    return out


def test_long_runs_keep_exactly_the_runs_at_least_that_long():
    rng = np.random.default_rng(1)
    for _ in range(300):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()
        length = int(rng.integers(1, 10))
        np.testing.assert_array_equal(long_runs(mask, length), brute_force_long_runs(mask, length))


def test_an_l_shaped_joint_becomes_two_thin_boxes_and_a_blob_is_dropped():
    mask = np.zeros((100, 100), bool)
    mask[10:90, 20:24] = True  # a vertical arm, 80 long and 4 wide
    mask[86:90, 20:80] = True  # a horizontal arm from its foot: an L
    mask[30:40, 60:70] = True  # a 10 x 10 blob: no straight run of 20 (0.2 of the side)
    expected = np.zeros_like(mask)
    expected[10:90, 20:24] = True
    expected[86:90, 20:80] = True
    np.testing.assert_array_equal(snap_to_arms(mask), expected)
    assert binarize(mask.astype(np.float32), 0.5, "arms").sum() == expected.sum()
    # one box per component would cover the whole L's rectangle, 80 x 60
    assert binarize(mask.astype(np.float32), 0.5, "boxes")[10:90, 20:80].all()


def test_arms_of_a_tilted_band_follow_its_straight_runs():
    mask = np.zeros((60, 60), bool)
    for row in range(60):
        mask[row, max(0, row // 6) : row // 6 + 30] = True  # a wide band leaning right: rows are 30-pixel runs
    snapped = snap_to_arms(mask)
    assert snapped[mask].all()  # every pixel lies in a long horizontal run
    assert not snap_to_arms(np.zeros((5, 5), bool)).any()


def test_a_rule_reads_the_same_wherever_it_is_shown():
    """predict, export, evaluate and the registry's description all word a rule this way."""
    assert describe_rule(0.2) == "0.2"
    assert describe_rule(0.5, "boxes") == "0.5 snapped to boxes"
    assert describe_rule(0.30000000000000004, "arms") == "0.3 snapped to a box per straight arm"
    with pytest.raises(KeyError):
        describe_rule(0.5, "rectangles")
