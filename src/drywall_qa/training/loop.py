"""The training loop: `train()` reads top to bottom; each step it calls is a named function below.

Multi-prompt CLIPSeg training with validation, early stopping, atomic checkpoints and resume.
Checkpoints (`<work_dir>/best/`, `<work_dir>/last/`) are `save_pretrained` folders with the
processor and `training_state.json`; `last/` also holds `optimizer_state.pt` (optimizer, scheduler,
RNG). Each is written into a temp folder beside it and swapped in by renames, so a killed run leaves
either the old or the new folder, never a half-written one. A re-run resumes from `last/` when its
config fingerprint (training config + manifest hash) matches, and starts fresh otherwise. When the
run ends, `best/` is published to `<output_dir>/best/` without its run-specific state, so the
pipeline's model (a DVC output) has the same bytes whenever the same training is repeated.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)

from drywall_qa.activation_cache import ActivationCache
from drywall_qa.contracts.atomic import write_text_atomic
from drywall_qa.contracts.manifest import image_records, prompt_order, prompts_by_dataset, read_manifest
from drywall_qa.data import (
    CropConfig,
    ResizeAugment,
    SegmentationDataset,
    channel_statistics,
    collate_pairs,
    file_sha256,
    fingerprint_json,
    size_grouped_batches,
)
from drywall_qa.inference import select_device
from drywall_qa.model import backbone_is_frozen, build_model, count_parameters, reloaded, set_backbone_trainable
from drywall_qa.numerics import describe_cpu_numerics
from drywall_qa.training.checkpoint import (
    publish_checkpoint,
    recover_checkpoints,
    restore_optimizer,
    resumable_state,
    save_epoch,
    write_history,
)
from drywall_qa.training.config import TrainConfig
from drywall_qa.training.forward import PairForward, inference_of, make_forwards, weight_average
from drywall_qa.training.losses import pair_loss, pair_scores, thin_prompts


def train(
    config: TrainConfig,
    manifest_path: str | Path,
    output_dir: str | Path,
    metrics_path: str | Path,
    history_path: str | Path,
    root: str | Path = ".",
    cache_dir: str | Path | None = None,
    device: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tracking_run_id: str | None = None,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train on the manifest's train split, validate on val each epoch, return the summary also
    written to `metrics_path`. `work_dir` (default `output_dir`) holds `best/` and `last/` while
    training; a distinct `output_dir` gets only the published `best/`. Resumes from `work_dir/last/`
    when its fingerprint matches; `tracking_run_id` (the stage's MLflow run) is saved there, so a
    resumed run continues that run (`resumable_run_id`). `cache_dir`: the activation cache's files
    (frozen backbone only; None: in memory). `on_epoch` gets each history row (after a resume, first
    the rows of the epochs before it).
    """
    started = time.perf_counter()
    output_dir, metrics_path, history_path = Path(output_dir), Path(metrics_path), Path(history_path)
    work = Path(work_dir) if work_dir is not None else output_dir
    set_determinism(config.training_seed, config.train.num_threads)
    device_ = select_device(device)
    prompts, train_records, val_records = read_splits(config, manifest_path, root)
    fingerprint = config_fingerprint(config, manifest_path)
    resume_state = resume_state_or_clear(work, fingerprint, log)
    if work != output_dir:
        shutil.rmtree(output_dir / "best", ignore_errors=True)  # published again when this run ends

    # the model (from last/ when resuming), its data, the optimizer and where the run stands
    last = work / "last" if resume_state is not None else None
    model, processor = initial_model(config, last, train_records, prompt_order(prompts), log)
    model.to(device_)
    train_set, val_set = build_datasets(config, model, processor, prompts, train_records, val_records)
    cache = ActivationCache(model, cache_dir) if config.uses_cache else None
    optimizer, scheduler = make_optimizer(model, config, math.ceil(len(train_set) / config.train.batch_size), log)
    average = weight_average(model, config.train.ema_decay)
    run, start_epoch = resumed_run(work, resume_state, optimizer, scheduler, average, log, on_epoch)
    forward, val_forward = make_forwards(model, average, processor, train_set.prompt_list, device_, cache)
    loader_options = loader_options_for(device_)

    for epoch in range(start_epoch, config.train.epochs + 1):
        epoch_started = time.perf_counter()
        batches = epoch_batches(train_set, config, epoch, loader_options, progress)
        train_loss = train_epoch(forward, batches, train_set, optimizer, scheduler, config, average)
        val = validate(val_forward, val_set, config, loader_options)
        run.seconds += time.perf_counter() - epoch_started
        row = epoch_row(epoch, train_loss, val, scheduler.get_last_lr()[0], epoch_started)
        improved, stop = run.record(row, config.train.early_stopping_patience)
        complete = stop or epoch == config.train.epochs
        state = resume_record(config, epoch, complete, fingerprint, train_set.prompt_list, run, tracking_run_id)
        save_epoch(work, model, processor, state, improved, optimizer, scheduler, average)
        write_history(history_path, run.history)
        log(epoch_line(row))
        if on_epoch is not None:
            on_epoch(row)
        if stop:
            log(f"train: early stop after epoch {epoch}: no val mIoU gain for {run.epochs_without_improvement} epochs")
            break

    if work != output_dir:
        publish_checkpoint(work / "best", output_dir)
    summary = run_summary(config, run, start_epoch, started, model, device_, train_set, val_set, cache)
    write_history(history_path, run.history)
    write_json(metrics_path, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Setting up: determinism, data, model, optimizer, resume


def config_fingerprint(config: TrainConfig, manifest_path: str | Path) -> str:
    """What a checkpoint must match to be resumed: the whole config and the manifest's bytes."""
    return fingerprint_json(
        {"config": config.model_dump(mode="json"), "manifest_sha256": file_sha256(Path(manifest_path))}
    )


def set_determinism(seed: int, num_threads: int) -> None:
    """Seed every RNG, fix the thread count and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    # warn_only: a few CUDA backward kernels (e.g. upsampling) have no deterministic version.
    torch.use_deterministic_algorithms(True, warn_only=True)


def read_splits(config: TrainConfig, manifest_path: str | Path, root: str | Path) -> tuple[dict, list, list]:
    """The manifest's prompts per dataset and its train and val images. A bad `train.cldice_datasets`
    fails here, before a model is built."""
    rows = read_manifest(manifest_path)
    prompts = prompts_by_dataset(rows)
    thin_prompts(config, prompts)
    return prompts, image_records(rows, "train", root), image_records(rows, "val", root)


def resume_state_or_clear(output_dir: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The resume state of an unfinished run of this config, or None after clearing other runs' checkpoints."""
    recover_checkpoints(output_dir, log)
    state = resumable_state(output_dir / "last", fingerprint, log)
    if state is None:
        for name in ("best", "last"):  # another config's checkpoints must not pass for this run's
            shutil.rmtree(output_dir / name, ignore_errors=True)
    return state


def initial_model(
    config: TrainConfig, last: Path | None, train_records, all_prompts: list[str], log: Callable[[str], None]
):
    """The model to train: `last/` when resuming, else the configured weights, else a scratch model
    normalising with the train images' channel statistics."""
    if last is not None:
        model, processor = build_model(config.model.preset, last, config.model.image_size, config.model.freeze_backbone)
    elif config.model.weights:
        model, processor = build_model(
            config.model.preset, config.model.weights, config.model.image_size, config.model.freeze_backbone
        )
    else:
        mean, std = channel_statistics(train_records, config.model.image_size)
        log(f"train: from scratch; normalising with the train images' mean {mean} and std {std}")
        model, processor = build_model(
            config.model.preset,
            None,
            config.model.image_size,
            config.model.freeze_backbone,
            prompts=all_prompts,
            image_mean=mean,
            image_std=std,
            conv_stem=config.model.conv_stem,
            skip_decoder=config.model.skip_decoder,
            side_heads=config.train.deep_supervision > 0,
        )
    if last is None:
        model, processor = reloaded(model, processor)  # saves the same bytes as a model resumed from last/
    set_backbone_trainable(model, not config.model.freeze_backbone)
    inference_of(config).attach(model)  # saved in every checkpoint's config.json: inference reads it from there
    return model, processor


def build_datasets(
    config: TrainConfig,
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    prompts: dict[str, list[str]],
    train_records: list,
    val_records: list,
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The train and val datasets. Native-scale training (inference mode whole/sliding): crops of the
    model's input size from the photo at the inference scale; validation then scores whole photos at
    that scale, the way evaluation and predict make masks."""
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    train, native = config.train, inference_of(config).native
    geometry = {
        "working_scale": config.inference.scale if native else None,
        "patch_size": model.config.vision_config.patch_size,
    }
    train_set = SegmentationDataset(
        train_records,
        prompts,
        config.model.image_size,
        mean,
        std,
        augment=config.train.augment,
        negative_prompts=config.train.negative_prompts,
        seed=config.training_seed,
        views=config.train.cached_views if config.uses_cache else None,
        crop=CropConfig(tuple(train.crop_scale_jitter), train.crop_foreground_prob) if native else None,
        resize_augment=ResizeAugment(tuple(train.augment_scale), train.augment_color),
        sample_prompts=config.train.sample_prompts,
        **geometry,
    )
    val_set = SegmentationDataset(  # every pair: val checks each prompt, and that the wrong ones stay empty
        val_records,
        prompts,
        config.model.image_size,
        mean,
        std,
        augment=False,
        negative_prompts=config.train.negative_prompts,
        seed=config.training_seed,
        **geometry,
    )
    return train_set, val_set


def loader_options_for(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":  # workers decode images while the GPU computes; pinned memory for async copies
        return {"num_workers": min(4, os.cpu_count() or 1), "pin_memory": True, "persistent_workers": False}
    return {"num_workers": 0}  # CPU: the model needs every core


def epoch_batches(
    train_set: SegmentationDataset, config: TrainConfig, epoch: int, loader_options: dict[str, Any], progress: bool
) -> Iterable[dict[str, torch.Tensor]]:
    """The epoch's batches: its augmented views, in a shuffle seeded by the seed and the epoch."""
    train_set.set_epoch(epoch - 1)
    loader = DataLoader(
        train_set,
        batch_size=config.train.batch_size,
        shuffle=True,
        collate_fn=collate_pairs,
        generator=torch.Generator().manual_seed(config.training_seed * 100_003 + epoch),
        **loader_options,
    )
    # disable=None: a bar on a terminal, none in CI logs (the epoch line still prints)
    return tqdm(loader, desc=f"epoch {epoch}/{config.train.epochs}", disable=None if progress else True, leave=False)


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int, log: Callable[[str], None] = print
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the per-step LR schedule (linear warm-up first); `log`
    gets the warning of a warm-up that spans the whole run."""
    warmup_steps, steps = round(config.train.warmup_epochs * steps_per_epoch), config.train.epochs * steps_per_epoch
    if warning := warmup_warning(config, warmup_steps, steps):
        log(warning)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.train.weight_decay)
    if config.train.scheduler == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return optimizer, scheduler


def warmup_warning(config: TrainConfig, warmup_steps: int, steps: int) -> str | None:
    """A warning when the linear warm-up spans every optimizer step: lr then never reaches
    `config.lr`, and a run of one step trains at lr 0 (tiny data sets with one batch per epoch)."""
    if warmup_steps < steps:
        return None
    outcome = "its only step runs at lr 0" if steps == 1 else f"lr never reaches {config.lr:g}"
    return (
        f"train: warning: the warm-up ({_count(warmup_steps, 'step')}, train.warmup_epochs={config.train.warmup_epochs:g}) "
        f"covers all {_count(steps, 'optimizer step')}, so {outcome}; lower train.warmup_epochs"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


@dataclass
class RunState:
    """The mutable state of a run; what `last/` stores to resume."""

    history: list[dict[str, Any]]
    best_epoch: int = 0
    best_val_miou: float = -math.inf
    best_val_dice: float = 0.0
    epochs_without_improvement: int = 0
    seconds: float = 0.0

    def record(self, row: dict[str, Any], patience: int) -> tuple[bool, bool]:
        """Add an epoch's row; (val mIoU improved, early stopping is due)."""
        self.history.append(row)
        improved = row["val_miou"] > self.best_val_miou
        if improved:
            self.best_epoch, self.best_val_miou, self.best_val_dice = row["epoch"], row["val_miou"], row["val_dice"]
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved, self.epochs_without_improvement >= patience


def resumed_run(
    work: Path,
    resume_state: dict[str, Any] | None,
    optimizer,
    scheduler,
    average,
    log: Callable[[str], None],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> tuple[RunState, int]:
    """The run record and first epoch: fresh, or where `last/` stopped (its optimizer, scheduler,
    RNG and weight average restored). A resume hands `on_epoch` the rows of the epochs before it
    again: a kill between an epoch's checkpoint and its callback must not lose that epoch's row."""
    if resume_state is None:
        return RunState(history=[]), 1
    restore_optimizer(work / "last", optimizer, scheduler, average)
    log(f"train: resuming from last/ after epoch {resume_state['epoch']} (config fingerprint matches)")
    run = RunState(**resume_state["run"])
    for row in run.history if on_epoch is not None else []:
        on_epoch(row)
    return run, resume_state["epoch"] + 1


# ----------------------------------------------------------------------------------------------
# One epoch: train, validate, record


def train_epoch(
    forward: PairForward,
    batches: Iterable[dict[str, torch.Tensor]],
    dataset: SegmentationDataset,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    average: AveragedModel | None = None,
) -> float:
    """One pass over the batches (updating `average` after each step); returns the mean loss per pair."""
    forward.model.train()
    trainable = optimizer.param_groups[0]["params"]  # what gradient clipping covers
    loss_sum, pairs = 0.0, 0
    deep_supervision = config.train.deep_supervision > 0
    for batch in batches:
        if deep_supervision:
            logits, masks, sides = forward.with_side_logits(batch, dataset)
        else:  # any forward's plain call: bench_train's naive one has no side logits
            (logits, masks), sides = forward(batch, dataset), []
        loss = pair_loss(logits, masks, batch["prompt_index"], dataset, config, sides)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(forward.model)
        loss_sum += loss.item() * len(masks)
        pairs += len(masks)
        if isinstance(batches, tqdm):
            batches.set_postfix(loss=f"{loss.item():.4f}")
    return loss_sum / pairs


@torch.no_grad()
def validate(
    forward: PairForward, val_set: SegmentationDataset, config: TrainConfig, loader_options: dict[str, Any]
) -> dict[str, float]:
    """Val loss over all pairs; mIoU and Dice at 0.5 over the manifest's pairs (positives); with
    negative prompts also the mean IoU of negative pairs (1 = predicted empty, as it should)."""
    forward.model.eval()
    inference = inference_of(config)
    if inference.native:
        loader = DataLoader(
            val_set,
            batch_sampler=size_grouped_batches(val_set, config.train.batch_size),
            collate_fn=collate_pairs,
            **loader_options,
        )
    else:
        loader = DataLoader(
            val_set, batch_size=config.train.batch_size, shuffle=False, collate_fn=collate_pairs, **loader_options
        )
    loss_sum, pairs = 0.0, 0
    ious, dices, positive = [], [], []
    for batch in loader:
        if inference.native:
            logits, masks = forward.native(batch, inference, config.model.image_size)
        else:
            logits, masks = forward(batch, val_set)
        loss_sum += pair_loss(logits, masks, batch["prompt_index"], val_set, config).item() * len(masks)
        pairs += len(masks)
        iou, dice = pair_scores(logits, masks)
        ious.append(iou.cpu())
        dices.append(dice.cpu())
        positive.append(batch["positive"])
    iou, dice, positive_ = torch.cat(ious), torch.cat(dices), torch.cat(positive)
    result = {
        "val_loss": loss_sum / pairs,
        "val_miou": iou[positive_].mean().item(),
        "val_dice": dice[positive_].mean().item(),
    }
    if (~positive_).any():
        result["val_negative_iou"] = iou[~positive_].mean().item()
    return result


def epoch_row(epoch: int, train_loss: float, val: dict[str, float], lr: float, epoch_started: float) -> dict[str, Any]:
    """The epoch's history row. It keeps every val score (negative-prompt IoU too), so a replay after
    a resume has them."""
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val["val_loss"],
        "val_miou": val["val_miou"],
        "val_dice": val["val_dice"],
        "lr": lr,
        "seconds": time.perf_counter() - epoch_started,
    }
    return row | {key: value for key, value in val.items() if key not in row}


def epoch_line(row: dict[str, Any]) -> str:
    extra = f", negative-prompt IoU {row['val_negative_iou']:.3f}" if "val_negative_iou" in row else ""
    return (
        f"train: epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
        f"val mIoU {row['val_miou']:.4f}, val Dice {row['val_dice']:.4f}{extra}, {row['seconds']:.1f}s"
    )


def resume_record(
    config: TrainConfig,
    epoch: int,
    complete: bool,
    fingerprint: str,
    prompts: list[str],
    run: RunState,
    tracking_run_id: str | None,
) -> dict[str, Any]:
    """What a checkpoint's training_state.json holds: enough to resume, and to say what made it."""
    return {
        "epoch": epoch,
        "complete": complete,
        "fingerprint": fingerprint,
        "config": config.model_dump(mode="json"),
        "weights_init": config.weights_init,
        "prompts": prompts,
        "best_epoch": run.best_epoch,
        "best_val_miou": run.best_val_miou,
        "run": asdict(run),
        "mlflow_run_id": tracking_run_id,
    }


def run_summary(
    config: TrainConfig,
    run: RunState,
    start_epoch: int,
    started: float,
    model,
    device,
    train_set,
    val_set,
    cache: ActivationCache | None,
) -> dict[str, Any]:
    summary = {
        "best_epoch": run.best_epoch,
        "best_val_miou": run.best_val_miou,
        "best_val_dice": run.best_val_dice,
        "final_train_loss": run.history[-1]["train_loss"] if run.history else math.nan,
        "epochs_run": len(run.history),
        "resumed_from_epoch": start_epoch - 1,
        "seconds": round(run.seconds, 3),
        "seconds_this_process": round(time.perf_counter() - started, 3),
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "weights_init": config.weights_init,
        "device": str(device),
        "cpu_numerics": describe_cpu_numerics(),
        "frozen_backbone": backbone_is_frozen(model),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "prompts": train_set.prompt_list,
    }
    if cache is not None:
        summary["activation_cache_hits"] = cache.hits
        summary["activation_cache_misses"] = cache.misses
    return summary


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def resumable_run_id(config: TrainConfig, manifest_path: str | Path, work_dir: str | Path) -> str | None:
    """The MLflow run of the unfinished training that `train` would resume, if it recorded one."""
    if not Path(manifest_path).is_file():
        return None
    state = resumable_state(Path(work_dir) / "last", config_fingerprint(config, manifest_path), lambda _: None)
    return state.get("mlflow_run_id") if state else None
