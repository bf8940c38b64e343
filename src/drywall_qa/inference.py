"""Batched CLIPSeg inference: one vision pass per image (or window) for all prompts, probabilities at
the image's original size.

How a mask is made is the checkpoint's own `InferenceConfig` (saved in its `config.json` under
`drywall_inference`, so evaluation, `drywall-qa predict` and the MLflow pyfunc all read the same):

- `resize`: the whole photo resized to the model's input size (CLIPSeg's own recipe; published
  checkpoints, which carry no setting, use it), logits upsampled to the photo's size;
- `whole`: the photo scaled by `scale` (1.0 = its own resolution, rounded to a multiple of the patch
  size) in one pass; HF CLIPSeg interpolates the position embeddings to the larger token grid;
- `sliding`: the scaled photo in windows of the model's input size with `overlap`, window logits
  averaged where they overlap.

Test-time views, on top of any mode: `flips` adds the photo mirrored left-right and/or top-bottom,
and (mode `resize`) `sizes` resizes it to each listed side instead of the input size. Every view
gets its own vision pass (shared by all prompts); the views' logits, mirrored back and resized to
the photo, are averaged before the sigmoid. Training's per-epoch validation uses the single plain
view, so choosing the best epoch costs no more; evaluation and serving use every view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from drywall_qa.errors import DrywallQAError
from drywall_qa.model import decode, encode_images, encode_prompts, pair_activations, resize_logits, tokenize_prompts

INFERENCE_MODES = ("resize", "whole", "sliding")
FLIPS = {"horizontal": -1, "vertical": -2}  # a test-time mirror view -> the tensor dim it mirrors
CONFIG_KEY = "drywall_inference"  # the checkpoint config.json attribute that carries the setting


class InferenceConfigError(DrywallQAError, ValueError):
    """An `inference` parameter that cannot make masks."""


@dataclass(frozen=True)
class InferenceConfig:
    """How masks are made at the photo's resolution (params.yaml `inference`)."""

    mode: str = "resize"
    scale: float = 1.0  # whole/sliding: the photo's scale before the pass (training crops share it)
    overlap: float = 0.5  # sliding: fraction of a window shared with its neighbour
    flips: tuple[str, ...] = ()  # extra mirrored views (FLIPS), averaged with the plain one
    sizes: tuple[int, ...] = ()  # resize: the sides the photo is resized to, averaged; () = the input size

    def __post_init__(self) -> None:
        # a config rebuilt from JSON (a checkpoint's config.json) has lists where tuples are due
        object.__setattr__(self, "flips", tuple(self.flips))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        unknown_flips = sorted(set(self.flips) - set(FLIPS))
        if unknown_flips or len(set(self.flips)) != len(self.flips):
            raise InferenceConfigError(
                f"inference.flips takes distinct values of {sorted(FLIPS)}, got {list(self.flips)}"
            )
        if self.sizes and self.mode != "resize":
            raise InferenceConfigError(
                f"inference.sizes applies to mode resize only (mode {self.mode!r} uses inference.scale)"
            )
        if not all(isinstance(side, int) and 16 <= side <= 4096 for side in self.sizes):
            raise InferenceConfigError(
                f"inference.sizes must be whole numbers of pixels in [16, 4096], got {list(self.sizes)}"
            )
        if self.mode not in INFERENCE_MODES:
            raise InferenceConfigError(f"inference.mode must be one of {INFERENCE_MODES}, got {self.mode!r}")
        if not 0.05 <= float(self.scale) <= 8:
            raise InferenceConfigError(f"inference.scale must be in [0.05, 8], got {self.scale!r}")
        if not 0 <= float(self.overlap) < 1:
            raise InferenceConfigError(f"inference.overlap must be in [0, 1), got {self.overlap!r}")

    @classmethod
    def from_params(cls, section: dict[str, Any] | None) -> InferenceConfig:
        section = dict(section or {})
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise InferenceConfigError(f"unknown inference params {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(
                mode=str(section.get("mode", "resize")),
                scale=float(section.get("scale", 1.0)),
                overlap=float(section.get("overlap", 0.5)),
                flips=tuple(str(flip) for flip in section.get("flips") or ()),
                sizes=tuple(section.get("sizes") or ()),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, InferenceConfigError):
                raise
            raise InferenceConfigError(f"inference params must be numbers where numbers are due: {error}") from None

    @classmethod
    def of(cls, model: CLIPSegForImageSegmentation) -> InferenceConfig:
        """The setting a checkpoint was trained and validated with; `resize` when it carries none."""
        return cls.from_params(getattr(model.config, CONFIG_KEY, None))

    def attach(self, model: CLIPSegForImageSegmentation) -> None:
        """Record the setting in the model's config, so `save_pretrained` writes it with the weights."""
        setattr(model.config, CONFIG_KEY, asdict(self))

    @property
    def views(self) -> int:
        """Test-time views per photo: the plain one and each flip, at each of `sizes`."""
        return (1 + len(self.flips)) * max(1, len(self.sizes))

    @property
    def native(self) -> bool:
        """True when masks are made at the (scaled) photo's resolution rather than the model's input size."""
        return self.mode != "resize"


def select_device(preferred: str | None = None) -> torch.device:
    """`preferred` if given (e.g. "cpu"), else CUDA, then Apple MPS, then CPU."""
    if preferred:
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pixel_values_for(
    processor: CLIPSegProcessor, images: Sequence[Image.Image], side: int | None = None
) -> torch.Tensor:
    """The processor's resized, normalised `[B, 3, S, S]` batch (images converted to RGB first);
    `side` overrides the processor's size S."""
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    size = {"size": {"height": side, "width": side}} if side is not None else {}
    return processor.image_processor(images=rgb, return_tensors="pt", **size)["pixel_values"]


def mirrored(image: Image.Image, flip: str | None) -> Image.Image:
    if flip is None:
        return image
    method = Image.Transpose.FLIP_LEFT_RIGHT if flip == "horizontal" else Image.Transpose.FLIP_TOP_BOTTOM
    return image.transpose(method)


def working_size(height: int, width: int, scale: float, patch: int) -> tuple[int, int]:
    """The photo's size after `scale`, each side rounded to a multiple of the patch size (at least one patch)."""
    return (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))


def resize_array(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """`image` resized to `size` (height, width): nearest for masks, else INTER_AREA when shrinking
    (no aliasing) and bilinear when enlarging. No-op at the same size."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        shrink = image.shape[0] >= height and image.shape[1] >= width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 `[H, W, 3]` -> normalised float32 `[3, H, W]`: the same arithmetic as training."""
    mean_ = np.asarray(mean, dtype=np.float32)
    std_ = np.asarray(std, dtype=np.float32)
    pixels = (image.astype(np.float32) / 255.0 - mean_) / std_
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Offsets of windows of `window` pixels covering `length` with at least `overlap` shared, the
    last one flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]


def model_input_size(processor: CLIPSegProcessor) -> int:
    """The side the model was trained at: the processor's resize target (= the training crop)."""
    return int(processor.image_processor.size["height"])


def native_logits(
    model: CLIPSegForImageSegmentation,
    pixel_values: torch.Tensor,
    conditional: torch.Tensor,
    config: InferenceConfig,
    window: int,
) -> torch.Tensor:
    """Mask logits `[B, P, H, W]` of P prompts for a `[B, 3, H, W]` batch already at the working scale.

    `whole` runs the batch through the vision encoder once; `sliding` once per window (all prompts of
    a window decoded against that one pass) and averages the logits where windows overlap.
    """
    batch, _, height, width = pixel_values.shape
    n_prompts = conditional.shape[0]

    def one_pass(pixels: torch.Tensor) -> torch.Tensor:
        # HF's CLIPSeg decoder folds its tokens back into a square grid (side = sqrt(tokens)), so a
        # non-square input is padded to a square with 0 (the normalised mean colour) and the logits
        # cropped back to it.
        rows, cols = pixels.shape[-2:]
        side = max(rows, cols)
        if rows != cols:
            pixels = torch.nn.functional.pad(pixels, (0, side - cols, 0, side - rows))
        activations = encode_images(model, pixels)
        image_index = torch.arange(pixels.shape[0], device=pixels.device).repeat_interleave(n_prompts)
        logits = decode(model, pair_activations(activations, image_index), conditional.repeat(pixels.shape[0], 1))
        logits = resize_logits(logits.float(), (side, side))[:, :rows, :cols]
        return logits.reshape(pixels.shape[0], n_prompts, rows, cols)

    if config.mode == "whole" or (height <= window and width <= window):
        return one_pass(pixel_values)
    if config.mode != "sliding":
        raise InferenceConfigError(f"native_logits handles whole and sliding, not {config.mode!r}")
    total = torch.zeros(batch, n_prompts, height, width, device=pixel_values.device)
    count = torch.zeros(1, 1, height, width, device=pixel_values.device)
    win_h, win_w = min(window, height), min(window, width)
    for top in window_starts(height, win_h, config.overlap):
        for left in window_starts(width, win_w, config.overlap):
            total[..., top : top + win_h, left : left + win_w] += one_pass(
                pixel_values[..., top : top + win_h, left : left + win_w]
            )
            count[..., top : top + win_h, left : left + win_w] += 1
    return total / count


@torch.inference_mode()
def predict_probs(
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """For each PIL image, a float32 `[len(prompts), H, W]` array of mask probabilities at its original size.

    The checkpoint's `InferenceConfig` decides how (see the module docstring). The prompts are
    encoded once; each image (or window) goes through the vision encoder once and the decoder once
    per (image, prompt) pair. Logits are resized bilinearly to the original size before the sigmoid.
    The model is moved to `device` (auto-selected when None) and left there.
    """
    if not prompts:
        raise ValueError("predict_probs needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = InferenceConfig.of(model)
    device = select_device() if device is None else torch.device(device)
    was_training = model.training
    model.to(device).eval()
    results: list[np.ndarray] = []
    try:
        with autocast(device):
            input_ids, attention_mask = tokenize_prompts(processor, prompts, device)
            conditional = encode_prompts(model, input_ids, attention_mask)
            for start in range(0, len(images), batch_size):
                batch = list(images[start : start + batch_size])
                for logits in _view_averaged_logits(model, processor, batch, conditional, config, device):
                    results.append(torch.sigmoid(logits).cpu().numpy().astype(np.float32, copy=False))
    finally:
        model.train(was_training)
    return results


def _view_averaged_logits(model, processor, batch, conditional, config, device) -> list[torch.Tensor]:
    """Each image's `[P, H, W]` logits at its own size, averaged over the config's test-time views."""
    totals: list[torch.Tensor | None] = [None] * len(batch)
    views = [(flip, side) for flip in (None, *config.flips) for side in (config.sizes or (None,))]  # config.views
    for flip, side in views:
        view = [mirrored(image, flip) for image in batch]
        if config.native:
            batch_logits = _native_batch_logits(model, processor, view, conditional, config, device)
        else:
            batch_logits = _resized_batch_logits(model, processor, view, conditional, device, side)
        for index, (image, image_logits) in enumerate(zip(batch, batch_logits, strict=True)):
            width, height = image.size
            logits = resize_logits(image_logits.float(), (height, width))
            if flip is not None:
                logits = torch.flip(logits, dims=(FLIPS[flip],))
            totals[index] = logits if totals[index] is None else totals[index] + logits
    return [total / len(views) for total in totals]


def _resized_batch_logits(model, processor, batch, conditional, device, side=None) -> list[torch.Tensor]:
    pixel_values = pixel_values_for(processor, batch, side).to(device, non_blocking=True)
    activations = encode_images(model, pixel_values)
    n_prompts = conditional.shape[0]
    image_index = torch.arange(len(batch), device=device).repeat_interleave(n_prompts)
    logits = decode(model, pair_activations(activations, image_index), conditional.repeat(len(batch), 1))
    return list(logits.float().view(len(batch), n_prompts, *logits.shape[-2:]))


def _native_batch_logits(model, processor, batch, conditional, config, device) -> list[torch.Tensor]:
    """Images of one working size share a pass; a batch of mixed sizes goes size group by size group."""
    patch = model.config.vision_config.patch_size
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    window = model_input_size(processor)
    pixels = []
    for image in batch:
        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        size = working_size(rgb.shape[0], rgb.shape[1], config.scale, patch)
        pixels.append(normalize(resize_array(rgb, size), mean, std))
    logits: list[torch.Tensor | None] = [None] * len(batch)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(pixels):
        by_size.setdefault(tuple(tensor.shape), []).append(index)
    for indices in by_size.values():
        stacked = torch.stack([pixels[index] for index in indices]).to(device, non_blocking=True)
        for index, image_logits in zip(
            indices, native_logits(model, stacked, conditional, config, window), strict=True
        ):
            logits[index] = image_logits
    return logits
