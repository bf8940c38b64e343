"""Mask PNGs: single-channel (mode L), values {0, 255}, the image's original size.

The one reader checks all three and names the file; the one writer is atomic. `binarize`, the one
rule that turns probabilities into a mask (a threshold, and optionally each component snapped to its
bounding rectangle), lives in `contracts.mask_rule`, which imports numpy only so that the standalone
ONNX runner shares it; it is re-exported here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from drywall_qa.contracts.atomic import write_bytes_atomic
from drywall_qa.contracts.manifest import ManifestError
from drywall_qa.contracts.mask_rule import binarize, snap_to_boxes

__all__ = ["binarize", "encode_mask", "read_mask", "snap_to_boxes", "write_mask"]


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a boolean array `[H, W]`; ManifestError unless it is L, {0, 255} and (when given)
    `size` = (width, height)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode, mask = image.mode, np.asarray(image)
    except FileNotFoundError:
        raise ManifestError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ManifestError(f"mask {path} cannot be read: {' '.join(str(error).split())}") from None
    if mode != "L":
        raise ManifestError(f"mask {path} has mode {mode}, expected single-channel L")
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ManifestError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    if not np.isin(mask, (0, 255)).all():
        values = np.unique(mask)
        raise ManifestError(f"mask {path} has values {values[:8].tolist()}, expected only 0 and 255")
    return mask == 255


def encode_mask(mask: np.ndarray) -> bytes:
    """A boolean (or {0, 255} uint8) mask as the bytes of a contract PNG."""
    values = np.where(np.asarray(mask, dtype=bool), np.uint8(255), np.uint8(0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values)).save(buffer, format="PNG")  # uint8 [H, W]: mode L
    return buffer.getvalue()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a mask atomically: a reader (or a killed run's re-run) never sees half a PNG."""
    write_bytes_atomic(path, encode_mask(mask))
