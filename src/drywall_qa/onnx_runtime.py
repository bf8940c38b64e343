"""Run an exported drywall-qa ONNX model with ONNX Runtime: masks with only onnxruntime, numpy and
Pillow installed (no torch, no transformers, no OpenCV), for laptops and tablets on site.

    python -m drywall_qa.onnx_runtime model.onnx wall.jpg --prompt "segment crack" --out masks/

(with `src/` on `PYTHONPATH`, or the package installed). `drywall_qa.onnx_export` writes the file:
one graph, `pixel_values [B, 3, S, S]` (dynamic batch and side, a multiple of the patch size) +
`input_ids`, `attention_mask [P, L]` -> mask logits `[B, P, S, S]`: each image goes through the
vision encoder once and the decoder once per prompt. The file's metadata (`drywall_qa`, JSON) carries
what the graph needs around it: each prompt's token ids, the preprocessing (input side, mean, std),
the test-time views (mirrors, sides) and each prompt's val-chosen mask rule (threshold, box snapping).

This module repeats PyTorch's inference path (`drywall_qa.inference`, mode `resize`) in numpy: PIL's
bilinear resize and the processor's arithmetic (the same pixels, bit for bit), the views' logits
mirrored back and averaged, resized bilinearly to the photo (torch's `interpolate`,
`align_corners=False`), then the sigmoid. Two steps are reordered for speed, each exact in exact
arithmetic: every photo is resized once and its pixels mirrored (`pixel_values`), and the mirrors are
averaged before the resize (`view_averaged_probs`); probabilities stay within ~1e-6 of PyTorch's. The
mask rule is the project's own (`contracts.mask_rule`, numpy only).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

from drywall_qa.contracts.mask_rule import binarize
from drywall_qa.contracts.naming import image_id_of, mask_file_name
from drywall_qa.errors import DrywallQAError

METADATA_KEY = "drywall_qa"  # the ONNX metadata entry that holds the spec (JSON)
SPEC_FORMAT = 1
FLIP_AXES = {"horizontal": -1, "vertical": -2}  # a mirror view -> the array axis it mirrors (inference.FLIPS)


class OnnxModelError(DrywallQAError, ValueError):
    """An ONNX file that is not a drywall-qa export, or a prompt it was not exported with."""


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX Runtime session and the spec the export wrote into the file's metadata."""

    session: onnxruntime.InferenceSession
    spec: dict

    @property
    def prompts(self) -> list[str]:
        return list(self.spec["prompts"])

    @property
    def threads(self) -> int:
        """The session's intra-op threads (0 in its options: ONNX Runtime's default, one per core)."""
        return self.session.get_session_options().intra_op_num_threads or os.cpu_count() or 1

    def rule(self, prompt: str) -> tuple[float, str | None]:
        """The prompt's val-chosen (threshold, snap: "boxes", "arms" or None); files exported before the
        arms have no `arms` list."""
        if prompt not in self.spec["boxed"]:
            return float(self.spec["thresholds"][prompt]), None
        return float(self.spec["thresholds"][prompt]), "arms" if prompt in self.spec.get("arms", ()) else "boxes"


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """The exported model at `path` in an ONNX Runtime CPU session (`threads`: intra-op threads,
    None = ONNX Runtime's default, one per physical core)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model {path} does not exist")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own (pybind) error types for a bad file
        raise OnnxModelError(f"cannot load ONNX model {path}: {' '.join(str(error).split())[:300]}") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise OnnxModelError(f"{path} is not a drywall-qa export (no '{METADATA_KEY}' metadata)")
    spec = json.loads(raw)
    if spec.get("format") != SPEC_FORMAT:
        raise OnnxModelError(f"{path} has spec format {spec.get('format')!r}; this runner reads {SPEC_FORMAT}")
    return OnnxModel(session, spec)


def token_batch(model: OnnxModel, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` of `prompts`, right-padded to the longest, as the tokenizer pads."""
    unknown = [prompt for prompt in prompts if prompt not in model.spec["prompts"]]
    if unknown:
        raise OnnxModelError(
            f"prompts {unknown} were not exported with this model (it has {model.prompts}); "
            "export again with --prompt for each"
        )
    ids = [model.spec["prompts"][prompt] for prompt in prompts]
    length = max(len(row) for row in ids)
    input_ids = np.full((len(ids), length), model.spec["pad_token_id"], dtype=np.int64)
    attention_mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = tokens
        attention_mask[row, : len(tokens)] = 1
    return input_ids, attention_mask


def normalising_table(spec: dict) -> np.ndarray:
    """`[3, 256]` float32: each channel's normalised value of each 8-bit level, computed as the HF image
    processor computes it per pixel (rescale in float64, then `(x - mean) / std` in float32), so a
    lookup gives the same bits as the arithmetic at a fraction of its cost."""
    mean = np.asarray(spec["image_mean"], dtype=np.float32)[:, None]
    std = np.asarray(spec["image_std"], dtype=np.float32)[:, None]
    scaled = (np.arange(256, dtype=np.float64) * spec["rescale_factor"]).astype(np.float32)
    return (scaled[None, :] - mean) / std


def pixel_values(
    spec: dict,
    images: Sequence[Image.Image],
    side: int,
    pool: ThreadPoolExecutor | None = None,
    flips: Sequence[str | None] = (None,),
) -> np.ndarray:
    """`[len(flips) * B, 3, side, side]` float32, flip-major: each image mirrored, then the HF image
    processor's steps (PIL bilinear resize, then rescale and normalise through `normalising_table`),
    so the graph sees the pixels PyTorch's path sees. Each image is resized once and the result
    mirrored: Pillow's resize commutes with mirroring (the same bytes on every real photo at 4 sides
    and on random sizes; tests/test_onnx_speed.py checks it), and the resize is most of this work.
    With a `pool`, the images are resized in its threads (Pillow releases the GIL while it resamples)."""
    table = normalising_table(spec)
    batch = np.empty((len(flips) * len(images), 3, side, side), dtype=np.float32)

    def fill(index: int) -> None:
        image = images[index]
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = np.asarray(rgb.resize((side, side), resample=Image.Resampling.BILINEAR))
        for channel in range(3):
            levels = resized[..., channel]
            for turn, flip in enumerate(flips):
                view = levels if flip is None else np.flip(levels, axis=FLIP_AXES[flip])
                np.take(table[channel], view, out=batch[turn * len(images) + index, channel])

    list(pool.map(fill, range(len(images))) if pool else map(fill, range(len(images))))
    return batch


def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each target pixel: the two source pixels and their weights, as torch's bilinear
    `interpolate` (`align_corners=False`, no antialias) computes them."""
    position = (np.arange(target, dtype=np.float32) + 0.5) * np.float32(source / target) - 0.5
    position = np.maximum(position, 0)
    first = position.astype(np.int64)
    second = np.minimum(first + 1, source - 1)
    weight = (position - first).astype(np.float32)
    return first, second, 1 - weight, weight


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[P, h, w]` maps resized to `size` (height, width); a no-op at the same size. Columns first,
    then rows, in place where possible: at photo size this is the runner's largest cost after the graph."""
    height, width = size
    if maps.shape[-2:] == (height, width):
        return maps
    col_first, col_second, col_keep, col_take = bilinear_taps(maps.shape[-1], width)
    row_first, row_second, row_keep, row_take = bilinear_taps(maps.shape[-2], height)
    across = np.take(maps, col_first, axis=-1)
    across *= col_keep
    right = np.take(maps, col_second, axis=-1)
    right *= col_take
    across += right
    resized = np.take(across, row_first, axis=-2)
    resized *= row_keep[:, None]
    below = np.take(across, row_second, axis=-2)
    below *= row_take[:, None]
    resized += below
    return resized


def onnx_predict_probs(
    model: OnnxModel, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 8
) -> list[np.ndarray]:
    """For each PIL image a float32 `[len(prompts), H, W]` array of probabilities at its original
    size: `drywall_qa.inference.predict_probs` of the exported model, run by ONNX Runtime.

    The graph runs once per batch and side, on all the mirrored views at that side together (fewer,
    larger runs keep its two threads busier). The numpy work around it (pixels in, probabilities out)
    runs in `model.threads` threads, image by image, since ONNX Runtime's threads are idle then; see
    `view_averaged_probs` for how it departs from PyTorch's order of operations."""
    if not prompts:
        raise OnnxModelError("onnx_predict_probs needs at least one prompt")
    if batch_size < 1:
        raise OnnxModelError(f"batch_size must be >= 1, got {batch_size}")
    input_ids, attention_mask = token_batch(model, prompts)
    flips = [None, *model.spec["flips"]]
    sides = model.spec["sizes"] or [model.spec["input_size"]]
    views = [(flip, side) for flip in flips for side in sides]  # PyTorch's order
    results = []
    with ThreadPoolExecutor(model.threads) as pool:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            logits_of = {}  # (flip, side) -> that view's [B, P, s, s] logits
            for side in sides:
                feed = {
                    "pixel_values": pixel_values(model.spec, batch, side, pool, flips),
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                }
                (logits,) = model.session.run(["logits"], feed)
                for index, flip in enumerate(flips):
                    logits_of[flip, side] = logits[index * len(batch) : (index + 1) * len(batch)]
            per_image = [[logits_of[view][index] for view in views] for index in range(len(batch))]
            sizes = [(image.height, image.width) for image in batch]
            results.extend(pool.map(view_averaged_probs, per_image, [views] * len(batch), sizes))
    return results


def view_averaged_probs(
    view_logits: Sequence[np.ndarray], views: Sequence[tuple[str | None, int]], size: tuple[int, int]
) -> np.ndarray:
    """`[P, H, W]` float32 probabilities of one image from its views' `[P, s, s]` logits (`views`:
    each one's (flip, side)): mirrored back and averaged per side at the graph's resolution, each
    side's share resized to `size` once, summed, then the sigmoid.

    PyTorch resizes every view to the photo before it averages them: the same mean in exact arithmetic
    (the bilinear resize is linear, and mirror-symmetric), at a third of the numpy work for the recipe's
    3 views. In float32 the mirrored resize positions round differently, so probabilities differ from
    PyTorch's by ~1e-6 (bench/onnx_results.json, tests/test_onnx.py). One prompt at a time: a
    photo-sized map (1.6 MB at 640 px) stays in a core's cache through these steps."""
    probs = np.empty((view_logits[0].shape[0], *size), dtype=np.float32)
    for prompt in range(len(probs)):
        by_side: dict[int, np.ndarray] = {}
        for (flip, side), logits in zip(views, view_logits, strict=True):
            view = logits[prompt] if flip is None else np.flip(logits[prompt], axis=FLIP_AXES[flip])
            by_side[side] = by_side[side] + view if side in by_side else view
        total = None
        for summed in by_side.values():
            resized = resize_bilinear(summed[None] / np.float32(len(views)), size)[0]
            total = resized if total is None else total + resized
        probs[prompt] = sigmoid(total)
    return probs


def mirrored(image: Image.Image, flip: str | None) -> Image.Image:
    if flip is None:
        return image
    method = Image.Transpose.FLIP_LEFT_RIGHT if flip == "horizontal" else Image.Transpose.FLIP_TOP_BOTTOM
    return image.transpose(method)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


def onnx_masks(
    model: OnnxModel, image: Image.Image, prompts: Sequence[str], threshold: float | None = None
) -> dict[str, np.ndarray]:
    """Each prompt's boolean mask of `image` under its val-chosen rule (`threshold` replaces the
    threshold, not the snapping)."""
    (probs,) = onnx_predict_probs(model, [image], prompts)
    masks = {}
    for prompt, prob in zip(prompts, probs, strict=True):
        chosen, snap = model.rule(prompt)
        masks[prompt] = binarize(prob, chosen if threshold is None else threshold, snap)
    return masks


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A {0, 255} mode-L PNG (the project's mask contract), written to a temporary name and renamed
    over `path`, so a reader never sees half a file (`contracts.atomic` needs filelock, not installed here)."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, np.uint8(255), np.uint8(0))).save(buffer, format="PNG")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drywall_qa.onnx_runtime",
        description="Masks from an exported drywall-qa ONNX model: <out>/<image stem>__<prompt slug>.png, {0, 255}.",
    )
    parser.add_argument("model", help="the .onnx file written by `drywall-qa export`")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: all exported)")
    parser.add_argument("--threshold", type=float, help="one threshold for every prompt (default: the val-chosen ones)")
    parser.add_argument("--out", default="masks", help="folder for the masks (default masks/)")
    args = parser.parse_args(argv)
    try:
        model = load_onnx_model(args.model)
        prompts = args.prompt or model.prompts
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in map(Path, args.images):
            with Image.open(path) as handle:
                image = handle.convert("RGB")
            for prompt, mask in onnx_masks(model, image, prompts, args.threshold).items():
                write_mask_png(out / mask_file_name(image_id_of(path.name), prompt), mask)
        print(f"wrote {len(args.images) * len(prompts)} masks to {out}")
        return 0
    except (DrywallQAError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
