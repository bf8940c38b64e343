"""Metric definitions: hand-computed cases (incl. empty masks) and a torchmetrics cross-check."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_f1_score, binary_jaccard_index

from drywall_qa.contracts.masks import binarize
from drywall_qa.metrics import Counts, confusion_counts, dice, iou, precision, recall, summarize, threshold_counts


def masks(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_hand_computed_pair():
    gt = masks("##..", "##..", "....")
    pred = masks("###.", "#...", "....")
    counts = confusion_counts(pred, gt)
    assert counts == Counts(tp=3, fp=1, fn=1, tn=7)
    assert iou(counts) == pytest.approx(3 / 5)
    assert dice(counts) == pytest.approx(6 / 8)


@pytest.mark.parametrize(
    ("pred", "expected"),
    [(masks("...", "..."), 1.0), (masks(".#.", "..."), 0.0)],
    ids=["empty-prediction", "non-empty-prediction"],
)
def test_empty_ground_truth(pred, expected):
    counts = confusion_counts(pred, masks("...", "..."))
    assert iou(counts) == expected
    assert dice(counts) == expected


def test_empty_prediction_on_non_empty_ground_truth_scores_zero():
    counts = confusion_counts(masks("...", "..."), masks("##.", "..."))
    assert (iou(counts), dice(counts), precision(counts), recall(counts)) == (0.0, 0.0, 0.0, 0.0)


def test_precision_and_recall_of_empty_pairs():
    nothing = confusion_counts(masks("...", "..."), masks("...", "..."))
    assert (precision(nothing), recall(nothing)) == (1.0, 1.0)  # nothing to find, nothing found
    false_alarm = confusion_counts(masks(".#.", "..."), masks("...", "..."))
    assert (precision(false_alarm), recall(false_alarm)) == (0.0, 0.0)


def test_summarize_means_pairs_and_sums_pixels():
    pairs = [
        confusion_counts(masks("##..", "...."), masks("#...", "....")),  # iou 1/2, dice 2/3
        confusion_counts(masks("....", "...."), masks("....", "....")),  # empty/empty: 1, 1
        confusion_counts(masks("....", "...."), masks("####", "####")),  # missed everything: 0, 0
    ]
    summary = summarize(pairs)
    assert summary["miou"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert summary["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # summed: tp 1, fp 1, fn 8, tn 14 -> dataset IoU 1/10, Dice 2/11
    assert summary["iou_dataset"] == pytest.approx(1 / 10)
    assert summary["dice_dataset"] == pytest.approx(2 / 11)
    assert summary["pixel_accuracy"] == pytest.approx(15 / 24)
    assert summary["precision"] == pytest.approx(1 / 2)
    assert summary["recall"] == pytest.approx(1 / 9)
    assert summary["pairs"] == 3


def test_summarize_refuses_no_pairs():
    with pytest.raises(ValueError, match="no"):
        summarize([])


def test_threshold_counts_match_binarised_counts():
    rng = np.random.default_rng(0)
    probs = rng.random((17, 23)).astype(np.float32)
    gt = rng.random((17, 23)) > 0.6
    thresholds = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert threshold_counts(probs, gt, thresholds) == [confusion_counts(binarize(probs, t), gt) for t in thresholds]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_counts(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_cross_check_with_torchmetrics():
    """Per-pair IoU/Dice and dataset-level IoU, pixel accuracy agree with torchmetrics (non-empty masks,
    where the conventions agree)."""
    rng = np.random.default_rng(1)
    preds = [rng.random((31, 29)) > 0.5 for _ in range(6)]
    gts = [rng.random((31, 29)) > 0.7 for _ in range(6)]
    pairs = [confusion_counts(p, g) for p, g in zip(preds, gts, strict=True)]
    summary = summarize(pairs)

    def tm(fn, p, g):
        return float(fn(torch.from_numpy(p).int(), torch.from_numpy(g).int()))

    assert summary["miou"] == pytest.approx(
        np.mean([tm(binary_jaccard_index, p, g) for p, g in zip(preds, gts, strict=True)])
    )
    assert summary["dice"] == pytest.approx(
        np.mean([tm(binary_f1_score, p, g) for p, g in zip(preds, gts, strict=True)])
    )
    all_pred, all_gt = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    assert summary["iou_dataset"] == pytest.approx(tm(binary_jaccard_index, all_pred, all_gt))
    assert summary["dice_dataset"] == pytest.approx(tm(binary_f1_score, all_pred, all_gt))
    assert summary["pixel_accuracy"] == pytest.approx(tm(binary_accuracy, all_pred, all_gt))
