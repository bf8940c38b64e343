"""Binary segmentation metrics from pixel counts.

Every metric is computed from the four pixel counts of a (prediction, ground truth) pair, so that
per-pair scores and dataset-level scores (counts summed over pairs) share one definition.

Conventions (stated in the report):
- an empty ground truth with an empty prediction scores 1 on every metric ("nothing to find, nothing
  found"); any other undefined ratio (0/0) scores 0: an empty ground truth with a non-empty prediction
  has IoU = Dice = recall = 0, a prediction that finds nothing where there is something has
  precision 0;
- mIoU / mean Dice: the mean of per-pair scores over (image, prompt) pairs;
- `iou_dataset` / `dice_dataset`: from intersections and unions summed over all pairs, so large
  objects weigh more and empty pairs add nothing;
- pixel accuracy, precision and recall: from pixel counts summed over all pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    """Pixel counts of one binary prediction against its ground truth (or a sum of them)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def pixels(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def _ratio(numerator: float, denominator: float, c: Counts) -> float:
    """numerator / denominator; 0/0 is 1 when `c` has neither ground truth nor prediction, else 0."""
    if denominator:
        return float(numerator / denominator)
    return 1.0 if c.tp + c.fp + c.fn == 0 else 0.0


def iou(c: Counts) -> float:
    return _ratio(c.tp, c.tp + c.fp + c.fn, c)


def dice(c: Counts) -> float:
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, c)


def precision(c: Counts) -> float:
    return _ratio(c.tp, c.tp + c.fp, c)


def recall(c: Counts) -> float:
    return _ratio(c.tp, c.tp + c.fn, c)


def pixel_accuracy(c: Counts) -> float:
    return _ratio(c.tp + c.tn, c.pixels, c)


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> Counts:
    """Counts of two boolean masks of the same shape."""
    pred, gt = _check_pair(pred, gt)
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return Counts(tp, fp, fn, gt.size - tp - fp - fn)


def threshold_counts(probs: np.ndarray, gt: np.ndarray, thresholds: Sequence[float]) -> list[Counts]:
    """Counts of `probs >= t` against `gt` for every threshold `t` (one pass per threshold)."""
    if probs.shape != gt.shape:
        raise ValueError(f"probabilities {probs.shape} and ground truth {gt.shape} differ in shape")
    gt = gt.astype(bool, copy=False)
    n_gt = int(np.count_nonzero(gt))
    # Only the probabilities inside the ground truth are needed for tp; fp follows from the total.
    probs_in_gt = probs[gt]
    counts = []
    for threshold in thresholds:
        tp = int(np.count_nonzero(probs_in_gt >= threshold))
        predicted = int(np.count_nonzero(probs >= threshold))
        fp, fn = predicted - tp, n_gt - tp
        counts.append(Counts(tp, fp, fn, gt.size - tp - fp - fn))
    return counts


def summarize(pair_counts: Iterable[Counts]) -> dict[str, float]:
    """mIoU and mean Dice over pairs, plus dataset-level IoU, Dice, pixel accuracy, precision, recall.

    Raises ValueError for no pairs: an average over nothing is not a score.
    """
    pair_counts = list(pair_counts)
    if not pair_counts:
        raise ValueError("no (image, prompt) pairs to summarize")
    total = sum(pair_counts, Counts(0, 0, 0, 0))
    return {
        "miou": float(np.mean([iou(c) for c in pair_counts])),
        "dice": float(np.mean([dice(c) for c in pair_counts])),
        "iou_dataset": iou(total),
        "dice_dataset": dice(total),
        "pixel_accuracy": pixel_accuracy(total),
        "precision": precision(total),
        "recall": recall(total),
        "pairs": len(pair_counts),
    }


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)
