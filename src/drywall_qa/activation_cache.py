"""Cache of the frozen vision encoder's extracted activations, one entry per image view.

With a frozen backbone the vision pass is the expensive, unchanging part of a training step: its
activations at `extract_layers` depend only on the image, its preprocessing (size, normalisation,
the augmented view) and the vision weights. They are stored in fp16, in memory or as safetensors
files under a directory (e.g. `data/cache/activations/`, which is not a DVC output), keyed by

    sha256(image bytes) + preprocessing fingerprint + view index + vision-weights hash,

so changing any of them misses the cache instead of returning stale activations. With a trainable
backbone the activations change every step: the cache must not be used (`ActivationCache` refuses).

Entries computed on a miss are rounded through fp16 too, so a cached and an uncached epoch feed the
decoder exactly the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPSegForImageSegmentation

from drywall_qa.data import SegmentationDataset, fingerprint_json
from drywall_qa.model import backbone_is_frozen, encode_images, skip_widths

CACHE_DTYPE = torch.float16


def vision_weights_hash(model: CLIPSegForImageSegmentation) -> str:
    """sha256 of the vision encoder's tensors (names, dtypes, shapes, bytes) and `extract_layers`."""
    digest = hashlib.sha256(repr(list(model.config.extract_layers)).encode())
    for name, tensor in sorted(model.clip.vision_model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class ActivationCache:
    """Extracted-layer activations per (image, preprocessing, view, weights); see the module docstring.

    `directory=None` keeps entries in memory (this process only); a directory keeps them on disk
    across runs, one `<key>.safetensors` file per view, written atomically.
    """

    def __init__(self, model: CLIPSegForImageSegmentation, directory: str | Path | None = None):
        if not backbone_is_frozen(model):
            raise ValueError("the activation cache needs a frozen backbone: trainable encoders change every step")
        if skip_widths(model.config):
            raise ValueError(
                "the activation cache cannot hold a skip decoder's stem projections: they train every step"
            )
        self.weights_hash = vision_weights_hash(model)
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, list[torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, image_hash: str, preprocessing: dict, view: int) -> str:
        return fingerprint_json(
            {"image": image_hash, "preprocessing": preprocessing, "view": view, "weights": self.weights_hash}
        )

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> list[torch.Tensor] | None:
        if self.directory is None:
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        tensors = load_file(path)
        return [tensors[f"layer_{index}"] for index in range(len(tensors))]

    def put(self, key: str, activations: list[torch.Tensor]) -> None:
        stored = [layer.detach().to("cpu", CACHE_DTYPE).contiguous() for layer in activations]
        if self.directory is None:
            self._memory[key] = stored
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(handle)
        try:
            save_file({f"layer_{index}": layer for index, layer in enumerate(stored)}, temp)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def activations_for(
        self,
        model: CLIPSegForImageSegmentation,
        batch: dict[str, torch.Tensor],
        dataset: SegmentationDataset,
        device: torch.device,
    ) -> list[torch.Tensor]:
        """The batch's activations `[B, T, D]` per layer (float32 on `device`): cached views are read,
        the rest computed in one vision pass and stored."""
        preprocessing = dataset.preprocessing_fingerprint()
        keys = [
            self.key(dataset.image_hash(int(index)), preprocessing, int(view))
            for index, view in zip(batch["index"], batch["view"], strict=True)
        ]
        found = [self.get(key) for key in keys]
        missing = [row for row, entry in enumerate(found) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            pixel_values = batch["pixel_values"][missing].to(device)
            with torch.no_grad():
                computed = encode_images(model, pixel_values)
            for position, row in enumerate(missing):
                entry = [layer[position] for layer in computed]
                self.put(keys[row], entry)
                found[row] = [layer.detach().to("cpu", CACHE_DTYPE) for layer in entry]
        n_layers = len(found[0])
        return [
            torch.stack([entry[layer] for entry in found]).to(device=device, dtype=torch.float32)
            for layer in range(n_layers)
        ]
