"""Training and inference speed: drywall-qa's trainer against the usual per-pair HuggingFace loop.

    python bench/bench_train.py            # full: base preset at 352 px, seed-sized data (hours on 2 CPU cores)
    python bench/bench_train.py --quick    # tiny preset, a few images: a smoke run in under a minute

Both build the same seeded synthetic data set in a temp dir (download -> convert -> split, as the
pipeline does) and then run each phase in its own fresh Python process, one after the other, with
the same thread count, so that timings and peak RSS belong to that phase alone:

- `naive`: the usual fine-tuning loop, `CLIPSegForImageSegmentation(input_ids=..., pixel_values=...)`
  on every (image, prompt) pair of a batch: a full vision pass per pair. It runs `naive_epochs`
  epochs and is projected to `epochs` (setup + epochs x measured epoch). Same initial weights, same
  batches, loss, optimizer and LR schedule as the trainer, so its val scores after epoch 1 must match
  the trainer's epoch 1 up to float noise.
- `trainer_uncached` / `trainer_cached`: `drywall_qa.training.loop.train` for `epochs` epochs, without and
  with the on-disk activation cache (a cold cache: the run fills it).
- `inference`: ms per image for one and for all prompts, `drywall_qa.inference.predict_probs`
  (one vision pass per image) against one full HF forward per prompt; plus unit costs (vision pass
  per image, decoder forward+backward per pair).

Results: a table on stdout (markdown; docs/speed.md describes it) and a JSON file (`--out`).
Benchmarks are not timed tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from drywall_qa.contracts.atomic import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shortest first, so a run cut short still leaves the finished phases in `--out` (see main).
PHASES = ("inference", "naive", "trainer_cached", "trainer_uncached")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class BenchSettings:
    mode: str
    preset: str
    image_size: int
    epochs: int  # trainer epochs; the naive loop is projected to this many
    naive_epochs: int  # naive epochs actually run
    source_images: dict[str, int]  # synthetic source images per dataset (the seed's sizes for `full`)
    synthetic_image_size: int
    inference_images: int
    inference_repeats: int  # each inference timing is the best of this many runs
    threads: int
    device: str


# 160 cracks + 200 taping source images (plus Roboflow-style augmented copies) split 70/15/15 give
# 315 train images and 805 train (image, prompt) pairs, the size of the seed data set.
FULL = BenchSettings(
    mode="full",
    preset="base",
    image_size=352,
    epochs=10,
    naive_epochs=1,
    source_images={"cracks": 160, "taping": 200},
    synthetic_image_size=352,
    inference_images=16,
    inference_repeats=2,
    threads=2,
    device="cpu",
)
QUICK = BenchSettings(
    mode="quick",
    preset="tiny",
    image_size=64,
    epochs=2,
    naive_epochs=1,
    source_images={"cracks": 6, "taping": 6},
    synthetic_image_size=64,
    inference_images=4,
    inference_repeats=1,
    threads=1,
    device="cpu",
)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Data and configuration (parent process)


def prepare_data(workdir: Path, settings: BenchSettings, prompts: dict[str, list[str]], seed: int) -> dict[str, Any]:
    """Synthetic Roboflow exports -> masks -> manifest under `workdir`, as the pipeline's first stages do."""
    from drywall_qa.convert import convert_all
    from drywall_qa.split import write_split
    from drywall_qa.synthetic import DATASET_SPECS, generate_export

    shutil.rmtree(workdir / "data", ignore_errors=True)  # seeded: a resumed run regenerates the same files
    for dataset, count in settings.source_images.items():
        generate_export(
            DATASET_SPECS[dataset],
            workdir / "data" / "raw" / dataset,
            seed=seed,
            source_images=count,
            augmented_copies=1,
            augmented_fraction=0.25,
            negative_fraction=0.08,
            image_size=settings.synthetic_image_size,
        )
    convert_all(
        workdir / "data" / "raw",
        prompts,
        workdir / "data" / "masks",
        workdir / "data" / "interim" / "images.csv",
        workdir / "metrics" / "conversion.json",
        repo_root=workdir,
    )
    stats = write_split(
        workdir / "data" / "interim" / "images.csv",
        prompts,
        SPLIT_FRACTIONS,
        seed,
        workdir / "data" / "manifest.csv",
        workdir / "metrics" / "split.json",
        masks_dir="data/masks",
        repo_root=workdir,
    )
    totals = stats["totals"]
    n_prompts = sum(len(dataset_prompts) for dataset_prompts in prompts.values())
    return {
        "train_images": totals["train"]["images"],
        "train_pairs": totals["train"]["pairs"],
        # every image is also trained on the other dataset's prompts, with an empty mask
        "train_pairs_with_negatives": totals["train"]["images"] * n_prompts,
        "val_images": totals["val"]["images"],
        "val_pairs_with_negatives": totals["val"]["images"] * n_prompts,
        "test_images": totals["test"]["images"],
        "prompts": n_prompts,
    }


def train_config(settings: BenchSettings, params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's training parameters with the benchmark's model: `preset` with random weights,
    frozen backbone (the fine-tuning recipe for pretrained weights), `epochs` without early stop."""
    from drywall_qa.training.config import TrainConfig

    config = TrainConfig.from_params(params)
    config = config.changed(
        model={"preset": settings.preset, "weights": None, "image_size": settings.image_size, "freeze_backbone": True},
        train={
            "epochs": settings.epochs,
            "early_stopping_patience": max(config.train.early_stopping_patience, settings.epochs + 1),
            "num_threads": settings.threads,
        },
    )
    return config.model_dump(mode="json")  # the JSON form: compared with the saved inputs on --resume


# ----------------------------------------------------------------------------------------------
# Phases (each in its own process)


def _load_phase_inputs(workdir: Path) -> tuple[BenchSettings, Any]:
    from drywall_qa.training.config import TrainConfig

    saved = json.loads((workdir / "bench_inputs.json").read_text(encoding="utf-8"))
    return BenchSettings(**saved["settings"]), TrainConfig.model_validate(saved["config"])


def _scratch_model(config, workdir: Path):
    """The trainer's initial model, built by `train`'s own step (same seed, same RNG draws)."""
    from drywall_qa.contracts.manifest import prompt_order, read_manifest
    from drywall_qa.training.loop import initial_model, read_splits, set_determinism

    set_determinism(config.training_seed, config.train.num_threads)
    manifest = workdir / "data" / "manifest.csv"
    prompts, train_records, val_records = read_splits(config, manifest, workdir)
    model, processor = initial_model(config, None, train_records, prompt_order(prompts), lambda _: None)
    normalisation = (processor.image_processor.image_mean, processor.image_processor.image_std)
    return model, processor, prompts, train_records, val_records, normalisation, read_manifest(manifest)


class NaivePairForward:
    """The usual HF forward as a `train.validate` forward: every (image, prompt) pair is one row of
    `pixel_values` and `input_ids`, so every pair runs the whole model."""

    def __init__(self, model, input_ids, attention_mask, device):
        self.model, self.input_ids, self.attention_mask, self.device = model, input_ids, attention_mask, device
        self.seconds = 0.0  # time spent in forward passes (training and validation)

    def __call__(self, batch, dataset=None):

        started = time.perf_counter()
        try:
            return self._forward(batch)
        finally:
            self.seconds += time.perf_counter() - started

    def _forward(self, batch):
        from drywall_qa.inference import autocast

        image_index, prompt_index = batch["image_index"], batch["prompt_index"]
        with autocast(self.device):
            logits = self.model(
                input_ids=self.input_ids[prompt_index].to(self.device),
                attention_mask=self.attention_mask[prompt_index].to(self.device),
                pixel_values=batch["pixel_values"].index_select(0, image_index).to(self.device),
            ).logits
        logits = logits.unsqueeze(0) if logits.dim() == 2 else logits  # HF squeezes a batch of one pair
        return logits.float(), batch["masks"].to(self.device)


def _counted(batches, counted: dict[str, int], label: str, total: int):
    """`batches`, counting steps and pairs into `counted` and logging progress every 10 steps."""
    started = time.perf_counter()
    for batch in batches:
        counted["steps"] += 1
        counted["pairs"] += len(batch["masks"])
        if counted["steps"] % 10 == 0:
            log(f"{label} step {counted['steps']}/{total}, {time.perf_counter() - started:.0f}s")
        yield batch


def phase_naive(workdir: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from drywall_qa.data import collate_pairs
    from drywall_qa.model import tokenize_prompts
    from drywall_qa.training.loop import build_datasets, make_optimizer, train_epoch, validate

    settings, config = _load_phase_inputs(workdir)
    device = torch.device(settings.device)
    started = time.perf_counter()
    model, processor, prompts, train_records, val_records, _, _ = _scratch_model(config, workdir)
    model.to(device)
    # Same items, views, batches, loss, optimizer and schedule as `train` (its loader seed included);
    # the uncached trainer's datasets: a fresh augmented view each epoch.
    train_set, val_set = build_datasets(
        config.changed(train={"cache_activations": False}), model, processor, prompts, train_records, val_records
    )
    steps_per_epoch = math.ceil(len(train_set) / config.train.batch_size)
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch)
    forward = NaivePairForward(model, *tokenize_prompts(processor, train_set.prompt_list), device)
    setup_s = time.perf_counter() - started

    epochs = []
    for epoch in range(1, settings.naive_epochs + 1):
        train_set.set_epoch(epoch - 1)
        loader = DataLoader(
            train_set,
            batch_size=config.train.batch_size,
            shuffle=True,
            collate_fn=collate_pairs,
            generator=torch.Generator().manual_seed(config.training_seed * 100_003 + epoch),
        )
        # The trainer's own epoch (`training.loop.train_epoch`: loss, backward, clipping, step, schedule); only the
        # forward differs, one full model pass per (image, prompt) pair, which is what this phase measures.
        counted = {"steps": 0, "pairs": 0}
        epoch_started, forward_before = time.perf_counter(), forward.seconds
        train_loss = train_epoch(
            forward,
            _counted(loader, counted, f"naive: epoch {epoch}", steps_per_epoch),
            train_set,
            optimizer,
            scheduler,
            config,
        )
        forward_s = forward.seconds - forward_before
        steps, pairs = counted["steps"], counted["pairs"]
        train_s = time.perf_counter() - epoch_started
        backward_s = train_s - forward_s  # loss, backward, clipping and the optimizer step
        val_started = time.perf_counter()
        val = validate(forward, val_set, config, loader_options={})
        val_s = time.perf_counter() - val_started
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_s": round(train_s, 3),
                "forward_s": round(forward_s, 3),
                "backward_step_s": round(backward_s, 3),
                "val_s": round(val_s, 3),
                "optimizer_steps": steps,
                "pairs": pairs,
                **val,
            }
        )
        log(f"naive: epoch {epoch}: train {train_s:.0f}s, val {val_s:.0f}s, val mIoU {val['val_miou']:.4f}")
    epoch_s = sum(row["train_s"] + row["val_s"] for row in epochs) / len(epochs)
    return {
        "setup_s": round(setup_s, 3),
        "epochs_run": len(epochs),
        "epoch_s": round(epoch_s, 3),
        "projected_epochs": settings.epochs,
        "projected_s": round(setup_s + settings.epochs * epoch_s, 3),
        "history": epochs,
        "vision_passes_per_epoch": epochs[0]["pairs"] + len(val_set) * len(val_set.prompt_list),
    }


@contextlib.contextmanager
def _timed(module, name: str, totals: dict[str, float], key: str):
    """Add the wall time of every call of `module.name` to `totals[key]` (measurement only)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def phase_trainer(workdir: Path, cached: bool) -> dict[str, Any]:
    import drywall_qa.activation_cache
    import drywall_qa.training.checkpoint
    import drywall_qa.training.forward
    from drywall_qa.training.checkpoint import read_history
    from drywall_qa.training.loop import train

    settings, config = _load_phase_inputs(workdir)
    config = config.changed(train={"cache_activations": cached})
    out = workdir / ("trainer_cached" if cached else "trainer_uncached")
    shutil.rmtree(out, ignore_errors=True)  # a cold cache, and no `last` checkpoint to resume from
    cache_dir = out / "cache"
    totals: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    with (
        _timed(drywall_qa.training.forward, "encode_images", totals, "vision_s"),
        _timed(drywall_qa.activation_cache, "encode_images", totals, "vision_s"),
        _timed(drywall_qa.training.checkpoint, "save_checkpoint", totals, "checkpoint_s"),
    ):
        summary = train(
            config,
            workdir / "data" / "manifest.csv",
            out / "models",
            out / "train.json",
            out / "history.csv",
            root=workdir,
            cache_dir=cache_dir if cached else None,
            device=settings.device,
            progress=False,
            log=lambda message: log(f"{out.name}: {message}"),
        )
    wall_s = time.perf_counter() - started
    history = read_history(out / "history.csv")
    cache_files = list(cache_dir.rglob("*.safetensors")) if cached else []
    result = {
        "wall_s": round(wall_s, 3),
        "epochs_run": summary["epochs_run"],
        "vision_s": round(totals["vision_s"], 3),
        "checkpoint_s": round(totals["checkpoint_s"], 3),
        "decoder_and_rest_s": round(wall_s - totals["vision_s"] - totals["checkpoint_s"], 3),
        "history": history,
        "params": summary["params"],
        "trainable_params": summary["trainable_params"],
        "best_val_miou": summary["best_val_miou"],
    }
    if cached:
        result.update(
            cache_hits=summary["activation_cache_hits"],
            cache_misses=summary["activation_cache_misses"],
            cache_files=len(cache_files),
            cache_bytes=sum(path.stat().st_size for path in cache_files),
        )
    shutil.rmtree(out / "models", ignore_errors=True)  # two base checkpoints are 1.2 GB; not needed
    return result


def naive_predict_probs(model, processor, images, prompts, device, batch_size: int):
    """The usual HF inference: one full forward (vision + text + decoder) per prompt and image batch."""
    import numpy as np
    import torch

    from drywall_qa.inference import autocast, pixel_values_for
    from drywall_qa.model import resize_logits, tokenize_prompts

    results = []
    model.to(device).eval()
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixel_values = pixel_values_for(processor, batch).to(device)
            per_prompt = []
            for prompt in prompts:
                input_ids, attention_mask = tokenize_prompts(processor, [prompt], device)
                logits = model(
                    input_ids=input_ids.repeat(len(batch), 1),
                    attention_mask=attention_mask.repeat(len(batch), 1),
                    pixel_values=pixel_values,
                ).logits
                per_prompt.append(logits.unsqueeze(0) if logits.dim() == 2 else logits)
            logits = torch.stack(per_prompt, dim=1).float()
            for image, image_logits in zip(batch, logits, strict=True):
                width, height = image.size
                probs = torch.sigmoid(resize_logits(image_logits, (height, width)))
                results.append(probs.cpu().numpy().astype(np.float32, copy=False))
    return results


def phase_inference(workdir: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from drywall_qa.contracts.manifest import prompt_order
    from drywall_qa.inference import predict_probs

    settings, config = _load_phase_inputs(workdir)
    device = torch.device(settings.device)
    model, processor, prompts, train_records, _, (mean, std), rows = _scratch_model(config, workdir)
    model.to(device).eval()
    all_prompts = prompt_order(prompts)
    test_paths = sorted({row["image_path"] for row in rows if row["split"] == "test"})[: settings.inference_images]
    images = []
    for path in test_paths:
        with Image.open(workdir / path) as handle:
            images.append(handle.convert("RGB"))
    batch_size = config.train.batch_size

    def best_of(function) -> tuple[float, Any]:
        times, output = [], None
        for _ in range(settings.inference_repeats):
            started = time.perf_counter()
            output = function()
            times.append(time.perf_counter() - started)
        return min(times), output

    unit_costs = _unit_costs(model, processor, train_records, prompts, config, device, mean, std)
    model.eval()

    # warm-up (allocator, kernels, lazy imports)
    predict_probs(model, processor, images[:2], all_prompts, device=device, batch_size=batch_size)
    naive_predict_probs(model, processor, images[:2], all_prompts[:1], device, batch_size)
    timings, outputs = {}, {}
    for name, function in {
        "project_1_prompt": lambda: predict_probs(
            model, processor, images, all_prompts[:1], device=device, batch_size=batch_size
        ),
        "project_all_prompts": lambda: predict_probs(
            model, processor, images, all_prompts, device=device, batch_size=batch_size
        ),
        "naive_1_prompt": lambda: naive_predict_probs(model, processor, images, all_prompts[:1], device, batch_size),
        "naive_all_prompts": lambda: naive_predict_probs(model, processor, images, all_prompts, device, batch_size),
    }.items():
        seconds, outputs[name] = best_of(function)
        timings[name] = round(1000 * seconds / len(images), 2)
        log(f"inference: {name}: {timings[name]:.1f} ms/image")
    max_difference = max(
        float(np.abs(ours - theirs).max())
        for ours, theirs in zip(outputs["project_all_prompts"], outputs["naive_all_prompts"], strict=True)
    )

    return {
        "images": len(images),
        "prompts": len(all_prompts),
        "ms_per_image": timings,
        "project_all_vs_1_prompt": round(timings["project_all_prompts"] / timings["project_1_prompt"], 3),
        "naive_all_vs_1_prompt": round(timings["naive_all_prompts"] / timings["naive_1_prompt"], 3),
        "naive_vs_project_all_prompts": round(timings["naive_all_prompts"] / timings["project_all_prompts"], 3),
        "max_abs_probability_difference": max_difference,
        "unit_costs": unit_costs,
    }


def _unit_costs(model, processor, train_records, prompts, config, device, mean, std) -> dict[str, float]:
    """On one training batch: the vision pass per image (10 of 12 layers for `base`, as the trainer
    runs it), and a decoder forward+backward per pair with the activations repeated per pair (what the
    trainer does), in the project's cache-sized chunks and in one call. Best of two runs each."""
    import torch

    from drywall_qa.data import SegmentationDataset, collate_pairs
    from drywall_qa.model import decode, encode_images, encode_prompts, pair_activations, tokenize_prompts
    from drywall_qa.training.losses import segmentation_loss

    train_set = SegmentationDataset(
        train_records,
        prompts,
        config.model.image_size,
        mean,
        std,
        augment=False,
        negative_prompts=config.train.negative_prompts,
        seed=config.training_seed,
    )
    batch = collate_pairs([train_set.load(index, 0) for index in range(min(config.train.batch_size, len(train_set)))])
    pixel_values = batch["pixel_values"].to(device)
    model.eval()
    with torch.no_grad():
        vision = math.inf
        for _ in range(2):
            started = time.perf_counter()
            activations = encode_images(model, pixel_values)
            vision = min(vision, time.perf_counter() - started)
        input_ids, attention_mask = tokenize_prompts(processor, train_set.prompt_list, device)
        conditional = encode_prompts(model, input_ids, attention_mask)[batch["prompt_index"].to(device)]
    image_index = batch["image_index"].to(device)
    masks = batch["masks"].to(device)
    model.train()
    costs = {"vision_per_image_ms": round(1000 * vision / len(pixel_values), 2)}
    for name, run in {
        "decoder_step_per_pair_ms": lambda: decode(model, pair_activations(activations, image_index), conditional),
        "decoder_step_per_pair_one_call_ms": lambda: decode(
            model, pair_activations(activations, image_index), conditional, chunk_pairs=None
        ),
    }.items():
        best = math.inf
        for _ in range(2):
            started = time.perf_counter()
            loss = segmentation_loss(run(), masks, config.train.bce_weight, config.train.dice_weight)
            loss.backward()
            best = min(best, time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        costs[name] = round(1000 * best / len(masks), 2)
    return costs


def run_phase_in_child(name: str, workdir: Path) -> dict[str, Any]:
    log(f"phase {name}: starting a fresh process")
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--workdir", str(workdir)]
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"phase {name} failed with exit code {completed.returncode}")
    result = json.loads((workdir / f"phase_{name}.json").read_text(encoding="utf-8"))
    result["process_s"] = round(time.perf_counter() - started, 3)
    write_json_atomic(workdir / f"phase_{name}.json", result)
    return result


def child_main(name: str, workdir: Path) -> None:
    functions = {
        "naive": lambda: phase_naive(workdir),
        "trainer_uncached": lambda: phase_trainer(workdir, cached=False),
        "trainer_cached": lambda: phase_trainer(workdir, cached=True),
        "inference": lambda: phase_inference(workdir),
    }
    result = functions[name]()
    result["peak_rss_mb"] = peak_rss_mb()
    write_json_atomic(workdir / f"phase_{name}.json", result)


# ----------------------------------------------------------------------------------------------
# Summary and table


def summarise(phases: dict[str, dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The target ratios, from whichever phases ran."""
    summary: dict[str, Any] = {"epochs": epochs}
    naive = phases.get("naive")
    trainers = [name for name in ("trainer_uncached", "trainer_cached") if name in phases]
    if naive:
        summary["naive_projected_s"] = naive["projected_s"]
    for name in trainers:
        run = phases[name]
        summary[f"{name}_s"] = run["wall_s"]
        if naive:
            first, naive_epoch1 = run["history"][0], naive["history"][0]
            summary[f"speedup_{name}_vs_naive"] = round(naive["projected_s"] / run["wall_s"], 2)
            summary[f"val_miou_epoch1_{name}_minus_naive"] = round(first["val_miou"] - naive_epoch1["val_miou"], 6)
            summary[f"val_loss_epoch1_{name}_minus_naive"] = round(first["val_loss"] - naive_epoch1["val_loss"], 6)
    if len(trainers) == 2:
        summary["val_miou_final_cached_minus_uncached"] = round(
            phases["trainer_cached"]["history"][-1]["val_miou"] - phases["trainer_uncached"]["history"][-1]["val_miou"],
            6,
        )
    training = [phases[name]["peak_rss_mb"] for name in ("naive", *trainers) if name in phases]
    if training:
        summary["peak_rss_mb_max_training"] = max(training)
    if "inference" in phases:
        summary["inference_all_vs_1_prompt"] = phases["inference"]["project_all_vs_1_prompt"]
    return summary


def _n(value: float) -> str:
    """Seconds and milliseconds for the table: whole numbers when large, 3 significant digits when small."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown_table(results: dict[str, Any]) -> str:
    """The training table when the naive loop and a trainer ran, the inference table when inference ran."""
    phases = results["phases"]
    lines: list[str] = []
    if "naive" in phases and ("trainer_uncached" in phases or "trainer_cached" in phases):
        lines += _training_table(results)
    if "inference" in phases:
        lines += [""] if lines else []
        lines += _inference_table(results)
    return "\n".join(lines)


def _reused(phase: dict[str, Any]) -> str:
    return " (earlier run, `--resume`)" if phase.get("reused_from_earlier_run") else ""


def _training_table(results: dict[str, Any]) -> list[str]:
    phases, settings, data = results["phases"], results["settings"], results["data"]
    epochs = settings["epochs"]
    naive = phases["naive"]
    naive1 = naive["history"][0]
    lines = [
        f"Training, {epochs} epochs ({settings['preset']} preset, random weights, frozen backbone, "
        f"{settings['image_size']} px; {data['train_images']} train images, {data['train_pairs']} pairs "
        f"+ negatives = {data['train_pairs_with_negatives']} pairs/epoch; {data['val_images']} val images; "
        f"{results['machine']['device']}, {settings['threads']} threads):",
        "",
        "| run | wall s | × vs naive | vision s | checkpoints s | decoder + rest s | val loss / mIoU after epoch 1 "
        f"| val mIoU after epoch {epochs} | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| naive HF loop (1 forward per pair), {naive['epochs_run']} epoch measured, projected to {epochs}"
        f"{_reused(naive)} "
        f"| {_n(naive['projected_s'])} | 1.0 | – | – | – | {naive1['val_loss']:.4f} / {naive1['val_miou']:.4f} "
        f"| – | {_n(naive['peak_rss_mb'])} |",
    ]
    for name, label in (("trainer_uncached", "trainer, no cache"), ("trainer_cached", "trainer, activation cache")):
        if name not in phases:
            continue
        run = phases[name]
        first, last = run["history"][0], run["history"][-1]
        lines.append(
            f"| {label}{_reused(run)} | {_n(run['wall_s'])} | {naive['projected_s'] / run['wall_s']:.1f} | {_n(run['vision_s'])} "
            f"| {_n(run['checkpoint_s'])} | {_n(run['decoder_and_rest_s'])} "
            f"| {first['val_loss']:.4f} / {first['val_miou']:.4f} | {last['val_miou']:.4f} | {_n(run['peak_rss_mb'])} |"
        )
    lines += [
        "",
        f"Naive epoch: {_n(naive1['train_s'])} s training ({_n(naive1['forward_s'])} s forward, "
        f"{_n(naive1['backward_step_s'])} s backward+step) + {_n(naive1['val_s'])} s validation, "
        f"setup {_n(naive['setup_s'])} s.",
    ]
    if "trainer_cached" in phases:
        cached = phases["trainer_cached"]
        lines[-1] += (
            f" Activation cache: {cached['cache_misses']} misses, {cached['cache_hits']} hits, "
            f"{cached['cache_bytes'] / 2**30:.2f} GiB on disk ({cached['cache_files']} files)."
        )
    return lines


def _inference_table(results: dict[str, Any]) -> list[str]:
    inference = results["phases"]["inference"]
    ms = inference["ms_per_image"]
    units = inference["unit_costs"]
    return [
        f"Inference, ms per image ({inference['images']} test images, batch {results['config']['train']['batch_size']}, "
        f"best of the repeats; {results['machine']['device']}, {results['settings']['threads']} threads):",
        "",
        f"| | 1 prompt | all {inference['prompts']} prompts | all / 1 |",
        "|---|---:|---:|---:|",
        f"| project (`predict_probs`, 1 vision pass per image){_reused(inference)} | {ms['project_1_prompt']:.1f} "
        f"| {ms['project_all_prompts']:.1f} | {inference['project_all_vs_1_prompt']:.2f} |",
        f"| naive (1 full forward per prompt) | {ms['naive_1_prompt']:.1f} | {ms['naive_all_prompts']:.1f} "
        f"| {inference['naive_all_vs_1_prompt']:.2f} |",
        "",
        f"Unit costs on one training batch: vision pass {_n(units['vision_per_image_ms'])} ms/image; decoder "
        f"forward+backward per pair, activations repeated per pair as the trainer does: "
        f"{_n(units['decoder_step_per_pair_ms'])} ms in cache-sized chunks (what the project runs on a CPU), "
        f"{_n(units['decoder_step_per_pair_one_call_ms'])} ms in one call per batch.",
    ]


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, a few images, 2 epochs (< 1 min)")
    parser.add_argument(
        "--out", type=Path, help="JSON results (default bench/results.json, or bench/results_quick.json with --quick)"
    )
    parser.add_argument("--workdir", type=Path, help="where data and caches go (default: a temp dir, removed)")
    parser.add_argument("--threads", type=int, help="torch threads for every phase (default: 2, quick: 1)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all; the training ratios need "
        "naive and a trainer)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --workdir: keep the phases an earlier run there finished with the same settings, run the rest",
    )
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    return parser, parser.parse_args(argv)


def run_phases(
    args: argparse.Namespace, selected: list[str], settings: BenchSettings, out: Path, params: dict, workdir: Path
) -> tuple[dict, dict, dict]:
    """Generate the data in `workdir`, run each selected phase in a child process (or reuse an earlier
    run's with --resume), writing partial results to `out` after each; returns (data, config, phases)."""
    log(f"{settings.mode} benchmark in {workdir}: generating the synthetic data set")
    data = prepare_data(workdir, settings, params["prompts"], int(params["seed"]))
    config = train_config(settings, params)
    inputs = {"settings": asdict(settings), "config": config}
    inputs_file = workdir / "bench_inputs.json"
    same_inputs = inputs_file.exists() and json.loads(inputs_file.read_text(encoding="utf-8")) == inputs
    if args.resume and not same_inputs:
        log("--resume: the earlier run used other settings (or none is there); running every phase")
    write_json_atomic(inputs_file, inputs)
    phases = {}
    for name in (name for name in PHASES if name in selected):
        finished = workdir / f"phase_{name}.json"
        if args.resume and same_inputs and finished.exists():
            phases[name] = {**json.loads(finished.read_text(encoding="utf-8")), "reused_from_earlier_run": True}
            log(f"phase {name}: reusing the earlier run's result ({finished})")
            continue
        finished.unlink(missing_ok=True)
        phases[name] = run_phase_in_child(name, workdir)
        write_json_atomic(
            out, {"complete": False, "settings": asdict(settings), "config": config, "data": data, "phases": phases}
        )
    return data, config, phases


def machine_info(settings: BenchSettings) -> dict:
    import torch

    return {
        "device": settings.device,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_end": [round(value, 2) for value in os.getloadavg()],
        "gpu": (
            "not measured: no CUDA device on this machine"
            if not torch.cuda.is_available()
            else f"{torch.cuda.get_device_name(0)} present but this run used {settings.device}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.phase:
        child_main(args.phase, args.workdir)
        return 0

    selected = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(PHASES))
    if unknown or not selected:
        parser.error(f"--phases: unknown {unknown or 'empty list'}; choose from {', '.join(PHASES)}")
    if args.resume and not args.workdir:
        parser.error("--resume needs the --workdir of the earlier run")
    settings = QUICK if args.quick else FULL
    if args.threads:
        settings = replace(settings, threads=args.threads)
    out = args.out or REPO_ROOT / "bench" / ("results_quick.json" if args.quick else "results.json")
    from drywall_qa.params import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="drywall-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data, config, phases = run_phases(args, selected, settings, out, params, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "complete": selected == list(PHASES),
        "settings": asdict(settings),
        "config": config,
        "data": data,
        "machine": machine_info(settings),
        "phases": phases,
        "summary": summarise(phases, settings.epochs),
        "total_s": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["table"] = markdown_table(results)
    write_json_atomic(out, results)
    print(results["table"])
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
