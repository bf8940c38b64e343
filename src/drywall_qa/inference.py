"""Batched CLIPSeg inference: one vision pass per image for all prompts, probabilities at original size."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from drywall_qa.model import decode, encode_images, encode_prompts, pair_activations, resize_logits, tokenize_prompts


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


def pixel_values_for(processor: CLIPSegProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's resized, normalised `[B, 3, S, S]` batch (images converted to RGB first)."""
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    return processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


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

    The prompts are encoded once; each batch of images goes through the vision encoder once and the
    decoder runs once per (image, prompt) pair. Logits are resized bilinearly to the original size
    before the sigmoid. The model is moved to `device` (auto-selected when None) and left there.
    """
    if not prompts:
        raise ValueError("predict_probs needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = select_device() if device is None else torch.device(device)
    was_training = model.training
    model.to(device).eval()
    results: list[np.ndarray] = []
    try:
        with autocast(device):
            input_ids, attention_mask = tokenize_prompts(processor, prompts, device)
            conditional = encode_prompts(model, input_ids, attention_mask)
            n_prompts = len(prompts)
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                pixel_values = pixel_values_for(processor, batch).to(device, non_blocking=True)
                activations = encode_images(model, pixel_values)
                image_index = torch.arange(len(batch), device=device).repeat_interleave(n_prompts)
                logits = decode(model, pair_activations(activations, image_index), conditional.repeat(len(batch), 1))
                logits = logits.float().view(len(batch), n_prompts, *logits.shape[-2:])
                for image, image_logits in zip(batch, logits, strict=True):
                    width, height = image.size
                    probs = torch.sigmoid(resize_logits(image_logits, (height, width)))
                    results.append(probs.cpu().numpy().astype(np.float32, copy=False))
    finally:
        model.train(was_training)
    return results
