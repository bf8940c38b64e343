"""The one rule that turns probabilities into a mask: a pixel is foreground where its probability
reaches the threshold (`>=`); for prompts whose val score gains from it, the foreground is then
snapped to boxes (the taping ground truth is drawn as boxes), in one of two ways (`SNAPS`):

- `boxes`: each 8-connected foreground component becomes its bounding rectangle;
- `arms`: only straight horizontal and vertical runs at least `ARM_FRACTION` of the mask's shorter side
  long are kept (a joint's arms), and each 8-connected component of the horizontal runs and of the
  vertical runs becomes its bounding rectangle; other foreground is dropped. A component shaped like an
  L or a T (two joints meeting) becomes two thin boxes instead of one box over both arms, and a diffuse
  blob without a long straight run is dropped instead of becoming a large rectangle.

Evaluation, `drywall-qa predict`, the MLflow model and the standalone ONNX runner all call this
module, so it imports numpy only: the ONNX runner must work where only onnxruntime, numpy and Pillow
are installed. OpenCV finds the components faster (2-5x on 640 px masks), so it is used where it is
installed (the pipeline always has it); both give the same rectangles (tests/test_mask_rules.py).
"""

from __future__ import annotations

import math

import numpy as np

SNAPS = ("boxes", "arms")  # the ways a prompt's foreground can be snapped to boxes, in order of preference
# The shortest arm, as a fraction of the shorter side: chosen on real taping val among 0.1-0.4 with two
# trained checkpoints (metrics/real_arms/ablation.md); 0.1 keeps most blobs, 0.3-0.4 drop short joints.
ARM_FRACTION = 0.2
SNAP_WORDS = {"boxes": "snapped to boxes", "arms": "snapped to a box per straight arm"}


def describe_rule(threshold: float, snap: str | None = None) -> str:
    """A prompt's rule in words, for messages: `0.2`, or `0.2 snapped to boxes`."""
    return f"{threshold:g}" + (f" {SNAP_WORDS[snap]}" if snap is not None else "")


def binarize(probs: np.ndarray, threshold: float, snap: str | None = None) -> np.ndarray:
    """Foreground where the probability reaches the threshold (`>=`); with `snap` (one of `SNAPS`),
    snapped to boxes that way."""
    mask = probs >= threshold
    if snap is None:
        return mask
    if snap == "boxes":
        return snap_to_boxes(mask)
    if snap == "arms":
        return snap_to_arms(mask)
    raise ValueError(f"unknown snapping {snap!r}: expected one of {SNAPS} or None")


def snap_to_arms(mask: np.ndarray, fraction: float = ARM_FRACTION) -> np.ndarray:
    """The bounding rectangles of the straight arms of `mask`: the components of its horizontal runs
    and of its vertical runs at least `fraction` of its shorter side long (see the module's docstring)."""
    mask = np.asarray(mask, dtype=bool)
    length = max(2, math.ceil(fraction * min(mask.shape)))
    horizontal = long_runs(mask, length)
    vertical = long_runs(mask.T, length).T
    return snap_to_boxes(horizontal) | snap_to_boxes(vertical)


def long_runs(mask: np.ndarray, length: int) -> np.ndarray:
    """The pixels of `mask` inside a run of at least `length` consecutive foreground pixels of their row:
    a morphological opening with a 1 x `length` line, the image's outside counted as background."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)  # exclusive; row-major order pairs each run's start with its end
    keep = ends - starts >= length
    edges = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.int8)
    edges[rows[keep], starts[keep]] = 1  # a run's end is a background pixel, never another run's start
    edges[rows[keep], ends[keep]] = -1
    return np.cumsum(edges, axis=1, dtype=np.int8)[:, :-1] > 0


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
