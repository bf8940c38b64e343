"""Runtime and footprint of a model's inference: latency per image, throughput, checkpoint bytes,
peak memory, and a readable name of the device it ran on."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drywall_qa.errors import DrywallQAError
from drywall_qa.numerics import describe_cpu_numerics

PredictFn = Callable[[list[Image.Image], list[str]], list[np.ndarray]]


class RuntimeMeasurementError(DrywallQAError):
    """There is nothing to time or measure; the message says what is missing."""


def measure_runtime(
    predict_fn: PredictFn, images: list[Image.Image], one_prompt: list[str], all_prompts: list[str], warmup: int = 3
) -> dict[str, float]:
    """Latency per image, one image per call, for one prompt and for all prompts, and batched throughput
    over the same images with all prompts.

    Latency covers preprocessing to full-size probabilities (file reading excluded) and is the median
    over the images, after `warmup` calls of each kind (lazy initialisation, allocator, kernel choice),
    so one slow call on a shared machine does not decide it.
    """
    if not images:
        raise RuntimeMeasurementError("no images to time")
    for prompts in (one_prompt, all_prompts):
        for image in images[:warmup]:
            predict_fn([image], prompts)

    def ms_per_image(prompts: list[str]) -> float:
        seconds = []
        for image in images:
            started = time.perf_counter()
            predict_fn([image], prompts)
            seconds.append(time.perf_counter() - started)
        return 1000 * float(np.median(seconds))

    one, every = ms_per_image(one_prompt), ms_per_image(all_prompts)
    started = time.perf_counter()
    predict_fn(images, all_prompts)
    batched = time.perf_counter() - started
    return {
        "runtime.ms_per_image_1_prompt": one,
        "runtime.ms_per_image_all_prompts": every,
        "runtime.images_per_s": len(images) / batched,
        "runtime.timing_images": len(images),
        "runtime.n_prompts_all": len(all_prompts),
    }


def folder_bytes(path: str | Path) -> int:
    path = Path(path)
    if not path.is_dir():
        raise RuntimeMeasurementError(f"model folder {path} does not exist")
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows: psutil's peak working set
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine()
        return f"cpu ({cpu}, {torch.get_num_threads()} threads, {describe_cpu_numerics()} numerics)"
    return device.type
