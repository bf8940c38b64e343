"""Training data over `data/manifest.csv`: one item per image with all its prompts and masks.

An item is an image (normalised with the processor's mean/std) together with every prompt it is
trained on: the manifest's prompts of its
dataset with their masks, and, with `negative_prompts`, the other datasets' prompts with an empty
mask (that is what teaches the model that the prompt matters). The training loop runs the vision
encoder once per item and the decoder once per (image, prompt) pair.

Two geometries:
- `working_scale=None` (inference mode `resize`): the whole image resized to the model's input size;
- `working_scale=s` (inference modes `whole` and `sliding`): the image scaled by `s` (1.0 = the
  photo's own pixels, each side rounded to a multiple of the patch size). Training items are random
  crops of the model's input size from it, with scale jitter, over-sampling crops that hold
  foreground (albumentations' `CropNonEmptyMaskIfExists`); validation items are the whole scaled
  image, as inference sees it.

Augmented views are reproducible: view `v` of an image is drawn with a seed derived from
(seed, the image's content hash, v), so the activation cache can store view `v` and an uncached run
sees the same pixels.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from drywall_qa.contracts.manifest import ImageRecord, ManifestError, prompt_order
from drywall_qa.contracts.masks import read_mask
from drywall_qa.inference import normalize, resize_array, working_size


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 `[H, W, 3]`; `ManifestError` if unreadable."""
    try:
        with Image.open(path) as handle:
            return np.asarray(handle.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read image {path}: {error}") from error


def channel_statistics(records: Sequence[ImageRecord], image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) of the images at the model's input size.

    A model trained from scratch normalises with its training images' statistics: drywall photos
    are grey and low in contrast, and with ImageNet's mean/std the shared grey offset dwarfs the
    within-image differences (cracks, joints) a randomly initialised ViT has to pick up.
    """
    if not records:
        raise ManifestError("no images to compute channel statistics from")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for record in records:
        pixels = (
            resize_array(read_rgb(record.image_path), (image_size, image_size)).reshape(-1, 3).astype(np.float64)
            / 255.0
        )
        total += pixels.sum(0)
        total_sq += np.square(pixels).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.maximum(std, 1e-3)  # a constant channel must not divide by zero
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@dataclass(frozen=True)
class ResizeAugment:
    """Augmentation strength of whole-photo (resize mode) training (params `train.augment_*`)."""

    scale: tuple[float, float] = (0.9, 1.1)  # the affine's zoom range
    color: float = 0.0  # > 0: colour jitter of brightness, contrast and saturation by this, hue by a quarter of it

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0.25 <= low <= 1 <= high <= 4:
            raise ValueError(
                f"train.augment_scale must be [low, high] with 0.25 <= low <= 1 <= high <= 4, got {list(self.scale)}"
            )
        if not 0 <= self.color <= 0.5:
            raise ValueError(f"train.augment_color must be in [0, 0.5], got {self.color}")


def build_augmentation(strength: ResizeAugment = ResizeAugment()) -> A.Compose:
    """Joint image + mask augmentation at the model's input size: flips, an affine, photometric.
    Colour jitter (`strength.color`) is there for the real photos: each site has its own light and
    white balance, and a scene seen only in val or test should not look new for its colour alone."""
    photometric: list[A.BasicTransform] = [A.RandomBrightnessContrast(brightness_limit=0.05, contrast_limit=0.1, p=0.5)]
    if strength.color > 0:
        c = strength.color
        photometric.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=c / 4, p=0.8))
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(
                translate_percent=(-0.0625, 0.0625),
                scale=tuple(strength.scale),
                rotate=(-15, 15),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.5,
            ),
            *photometric,
        ]
    )


@dataclass(frozen=True)
class CropConfig:
    """Training crops at the working scale (params `train.crop_*`)."""

    scale_jitter: tuple[float, float]  # the working-scale image is rescaled by a factor drawn from it
    foreground_prob: float  # share of crops centred on a foreground pixel (when there is one)

    def __post_init__(self) -> None:
        low, high = self.scale_jitter
        if not 0.1 <= low <= high <= 4:
            raise ValueError(
                f"train.crop_scale_jitter must be [low, high] with 0.1 <= low <= high <= 4, got {list(self.scale_jitter)}"
            )
        if not 0 <= self.foreground_prob <= 1:
            raise ValueError(f"train.crop_foreground_prob must be in [0, 1], got {self.foreground_prob}")


def build_crop_augmentation(crop_size: int, crop: CropConfig) -> A.Compose:
    """Joint image + mask augmentation for native-scale training: scale jitter, a crop of the model's
    input size (foreground-seeking with `foreground_prob`), flips, right-angle turns (seams and
    cracks run any way), a small rotation, photometric jitter."""
    low, high = crop.scale_jitter
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(low - 1, high - 1), interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0
            ),
            A.PadIfNeeded(
                min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0
            ),
            A.OneOf(
                [
                    A.CropNonEmptyMaskIfExists(crop_size, crop_size, p=crop.foreground_prob),
                    A.RandomCrop(crop_size, crop_size, p=1 - crop.foreground_prob),
                ],
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.3),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.5),
        ]
    )


def view_seed(seed: int, image_hash: str, view: int) -> int:
    """The augmentation seed of view `view` of the image with content hash `image_hash`.

    Derived from the image's bytes, not its position in the split, so a view stays the same view
    (and a cached one stays valid) when other images enter or leave the manifest.
    """
    return int(np.random.SeedSequence([seed, int(image_hash[:16], 16), view]).generate_state(1)[0])


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class SegmentationDataset(Dataset):
    """Items of one split, one per image: see the module docstring.

    `views`: with augmentation, how many distinct views an image has (epoch `e` shows view
    `e % views`; the activation cache stores that many); None draws a fresh view every epoch.
    Without augmentation every epoch shows view 0. Call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        prompts: dict[str, list[str]],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        negative_prompts: bool,
        seed: int,
        views: int | None = None,
        working_scale: float | None = None,
        crop: CropConfig | None = None,
        patch_size: int = 16,
        resize_augment: ResizeAugment = ResizeAugment(),
        sample_prompts: bool = False,
    ):
        if not records:
            raise ManifestError("the split has no images")
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 or None, got {views}")
        self.records = list(records)
        self.prompt_list = prompt_order(prompts)
        self.prompt_index = {prompt: index for index, prompt in enumerate(self.prompt_list)}
        self.prompts_of_dataset = prompts
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.augment = augment
        self.working_scale = working_scale
        self.patch_size = patch_size
        if working_scale is not None and augment:
            if crop is None:
                raise ValueError("native-scale training needs a CropConfig")
            self.augmentation = build_crop_augmentation(image_size, crop)
        else:
            self.augmentation = build_augmentation(resize_augment) if augment else None
        self.negative_prompts = negative_prompts
        self.sample_prompts = sample_prompts
        self.seed = seed
        self.views = views
        self.epoch = 0
        self._resized: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # decoded once, kept at the item scale
        self._hashes: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def current_view(self) -> int:
        if not self.augment:
            return 0
        return self.epoch % self.views if self.views else self.epoch

    def preprocessing_fingerprint(self) -> dict[str, Any]:
        """Everything besides the image bytes and the view that decides an item's pixels."""
        return {
            "image_size": self.image_size,
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
            "resize": "cv2-area-or-linear/nearest-mask",
            "working_scale": self.working_scale,
            "augmentation": self.augmentation.to_dict() if self.augmentation else None,
            "seed": self.seed if self.augment else None,
        }

    def image_hash(self, index: int) -> str:
        if index not in self._hashes:
            self._hashes[index] = file_sha256(self.records[index].image_path)
        return self._hashes[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, self.current_view())

    def load(self, index: int, view: int) -> dict[str, Any]:
        """Item `index` as view `view`: tensors `pixel_values [3,S,S]`, `masks [K,S,S]` (0/1 floats),
        `prompt_index [K]` (into `prompt_list`), `positive [K]` (False for negative prompts)."""
        record = self.records[index]
        image, own_masks = self._load_resized(index)
        prompts = list(record.prompts)
        masks = own_masks
        if self.negative_prompts:
            negatives = [
                prompt
                for dataset, dataset_prompts in self.prompts_of_dataset.items()
                if dataset != record.dataset
                for prompt in dataset_prompts
                if prompt not in record.prompts
            ]
            prompts += negatives
            masks = np.concatenate([own_masks, np.zeros((len(negatives), *own_masks.shape[1:]), np.uint8)])
        if self.sample_prompts:
            keep = self.sampled_pairs(index, own=len(record.prompts), total=len(prompts))
            prompts, masks = [prompts[k] for k in keep], masks[keep]
        if self.augmentation is not None:
            self.augmentation.set_random_seed(view_seed(self.seed, self.image_hash(index), view))
            out = self.augmentation(image=image, masks=list(masks))
            image, masks = out["image"], np.stack(out["masks"])
        return {
            "pixel_values": normalize(image, self.mean, self.std),
            "masks": torch.from_numpy(np.ascontiguousarray(masks > 0)).float(),
            "prompt_index": torch.tensor([self.prompt_index[p] for p in prompts], dtype=torch.long),
            "positive": torch.tensor([p in record.prompts for p in prompts], dtype=torch.bool),
            "index": index,
            "view": view,
        }

    def sampled_pairs(self, index: int, own: int, total: int) -> list[int]:
        """With `sample_prompts`: which of an item's `total` pairs (its `own` prompts first, then the
        negatives) this epoch trains: one own prompt and one negative, drawn per image and epoch.

        A dataset's prompts are synonyms with one mask, so decoding all of them every step repeats the
        same lesson (the decoder runs once per pair); over the epochs every prompt still gets its turn.
        """
        rng = np.random.default_rng([self.seed, int(self.image_hash(index)[:16], 16), self.epoch])
        keep = [int(rng.integers(own))]
        if total > own:
            keep.append(own + int(rng.integers(total - own)))
        return keep

    def _load_resized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._resized:
            self._resized[index] = self._read(self.records[index])
        return self._resized[index]

    def item_size(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index` before augmentation."""
        if self.working_scale is None:
            return self.image_size, self.image_size
        record = self.records[index]
        return working_size(record.height, record.width, self.working_scale, self.patch_size)

    def _read(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        original = read_rgb(record.image_path)
        height, width = original.shape[:2]
        if self.working_scale is None:
            size = (self.image_size, self.image_size)
        else:
            size = working_size(height, width, self.working_scale, self.patch_size)
        image = resize_array(original, size)
        masks = []
        for mask_path in record.mask_paths.values():
            mask = read_mask(mask_path, (width, height)).astype(np.uint8) * np.uint8(255)
            masks.append(resize_array(mask, size, nearest=True))
        return image, np.stack(masks)


def size_grouped_batches(dataset: SegmentationDataset, batch_size: int) -> list[list[int]]:
    """Batches of item indices whose items share a size (whole images of different sizes cannot stack)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in range(len(dataset)):
        groups[dataset.item_size(index)].append(index)
    return [
        indices[start : start + batch_size]
        for _, indices in sorted(groups.items())
        for start in range(0, len(indices), batch_size)
    ]


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack images and flatten their (image, prompt) pairs: `image_index[k]` is pair k's image row."""
    counts = [len(item["prompt_index"]) for item in items]
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "masks": torch.cat([item["masks"] for item in items]),
        "prompt_index": torch.cat([item["prompt_index"] for item in items]),
        "positive": torch.cat([item["positive"] for item in items]),
        "image_index": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)),
        "index": torch.tensor([item["index"] for item in items]),
        "view": torch.tensor([item["view"] for item in items]),
    }


def fingerprint_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
