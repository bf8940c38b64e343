"""The one rule that turns probabilities into a mask: a pixel is foreground where its probability
reaches the threshold (`>=`); for prompts whose val score gains from it, each 8-connected foreground
component is then snapped to its bounding rectangle (the taping ground truth is drawn as boxes).

Evaluation, `drywall-qa predict`, the MLflow model and the standalone ONNX runner all call this
module, so it imports numpy only: the ONNX runner must work where only onnxruntime, numpy and Pillow
are installed. OpenCV finds the components faster (2-5x on 640 px masks), so it is used where it is
installed (the pipeline always has it); both give the same rectangles (tests/test_mask_rules.py).
"""

from __future__ import annotations

import numpy as np


def binarize(probs: np.ndarray, threshold: float, boxes: bool = False) -> np.ndarray:
    """Foreground where the probability reaches the threshold (`>=`); with `boxes`, snapped to boxes."""
    mask = probs >= threshold
    return snap_to_boxes(mask) if boxes else mask


def snap_to_boxes(mask: np.ndarray) -> np.ndarray:
    """Each 8-connected foreground component replaced by its axis-aligned bounding rectangle."""
    snapped = np.zeros(mask.shape, dtype=bool)
    for top, left, bottom, right in component_boxes(mask):
        snapped[top:bottom, left:right] = True
    return snapped


def component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """`(top, left, bottom, right)`, bottom and right exclusive, of each 8-connected foreground component."""
    try:
        import cv2
    except ImportError:
        return component_boxes_numpy(mask)
    count, _, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, dtype=np.uint8), connectivity=8)
    return [(int(y), int(x), int(y + height), int(x + width)) for x, y, width, height, _ in stats[1:count]]


def component_boxes_numpy(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """`component_boxes` without OpenCV: the foreground runs of each row, joined (union-find) with the
    runs of the row above that they touch, diagonals included."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(steps == 1)  # row-major order: by row, then by column
    _, run_ends = np.nonzero(steps == -1)  # exclusive
    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), run_ends.tolist()
    parent = list(range(len(rows)))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    above = 0  # the first run of the row above that can still touch this row's runs
    for current, row in enumerate(rows):
        while above < current and (rows[above] < row - 1 or (rows[above] == row - 1 and ends[above] < starts[current])):
            above += 1
        # runs [s, e) on consecutive rows touch (8-connected) when each starts at most one pixel past the other's end
        other = above
        while other < current and rows[other] == row - 1 and starts[other] <= ends[current]:
            first, second = root(other), root(current)
            parent[max(first, second)] = min(first, second)
            other += 1
    boxes: dict[int, list[int]] = {}
    for run, (row, start, end) in enumerate(zip(rows, starts, ends, strict=True)):
        box = boxes.setdefault(root(run), [row, start, row + 1, end])
        box[:] = [min(box[0], row), min(box[1], start), max(box[2], row + 1), max(box[3], end)]
    return [tuple(box) for box in boxes.values()]
