"""The val-chosen mask rule of a prompt (threshold, snapped to boxes or not): applied and carried."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drywall_qa.cli import boxed_for
from drywall_qa.contracts.mask_rule import component_boxes, component_boxes_numpy
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
    np.testing.assert_array_equal(binarize(probs, 0.5, boxes=True), expected)


def test_thresholds_file_round_trips_the_snapped_prompts(tmp_path):
    path = tmp_path / "thresholds.json"
    write_thresholds(path, {"segment crack": 0.3, "segment taping area": 0.2}, {"segment taping area"})
    assert json.loads(path.read_text()) == {
        "segment crack": 0.3,
        "segment taping area": {"threshold": 0.2, "boxes": True},
    }
    assert read_thresholds(path) == {"segment crack": 0.3, "segment taping area": 0.2}
    assert read_boxed(path) == {"segment taping area"}


def test_a_thresholds_file_without_boxes_snaps_nothing(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"segment crack": 0.4}))  # the format of models registered before snapping
    assert read_thresholds(path) == {"segment crack": 0.4}
    assert read_boxed(path) == frozenset()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"segment crack": {"threshold": 0.4, "boxes": "yes"}}, "`boxes` of 'segment crack' must be true or false"),
        ({"segment crack": {"boxes": True}}, "threshold of 'segment crack' must be a number in \\[0, 1\\], got None"),
    ],
)
def test_a_bad_rule_is_named(tmp_path, document, message):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(document))
    reader = read_boxed if "boxes" in message else read_thresholds
    with pytest.raises(ThresholdsError, match=message):
        reader(path)


def test_snapping_a_prompt_without_a_threshold_is_refused(tmp_path):
    with pytest.raises(ThresholdsError, match="snapped to boxes but have no threshold"):
        write_thresholds(tmp_path / "t.json", {"segment crack": 0.3}, {"segment taping area"})


def test_predict_takes_the_snapping_from_eval_json_else_from_the_model(tmp_path):
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"threshold.segment_taping_area": 0.2, "boxes.segment_taping_area": 1}))
    prompts = ["segment crack", "segment taping area"]
    assert boxed_for(prompts, str(eval_json)) == {"segment taping area"}
    assert boxed_for(prompts, None, frozenset({"segment taping area", "segment drywall seam"})) == {
        "segment taping area"
    }
    assert boxed_for(prompts, None) == frozenset()
