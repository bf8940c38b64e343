"""Multi-prompt CLIPSeg training with validation, early stopping, atomic checkpoints and resume.

One step: the vision encoder runs once per image of the batch (or its activations come from the
cache when the backbone is frozen), the decoder once per (image, prompt) pair, including negative
prompts with empty masks. Loss = bce_weight * BCE + dice_weight * soft Dice (+ cldice_weight * soft
clDice on the prompts of `cldice_datasets`, the thin structures).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)

from drywall_qa.activation_cache import ActivationCache
from drywall_qa.checkpoint import (
    publish_checkpoint,
    recover_checkpoints,
    restore_optimizer,
    resumable_state,
    save_epoch,
    write_history,
)
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
from drywall_qa.errors import DrywallQAError
from drywall_qa.inference import InferenceConfig, InferenceConfigError, autocast, native_logits, select_device
from drywall_qa.model import (
    backbone_is_frozen,
    build_model,
    count_parameters,
    decode,
    encode_images,
    encode_prompts,
    pair_activations,
    reloaded,
    resize_logits,
    set_backbone_trainable,
    tokenize_prompts,
)
from drywall_qa.numerics import describe_cpu_numerics

SCHEDULERS = ("cosine", "constant")


class TrainConfigError(DrywallQAError, ValueError):
    """Parameters that cannot train."""


@dataclass(frozen=True)
class TrainConfig:
    """Every parameter that shapes a training run (the `seed`, `lr`, `model` and `train` params)."""

    seed: int
    lr: float
    preset: str
    weights: str | None
    image_size: int
    freeze_backbone: bool
    epochs: int
    batch_size: int
    weight_decay: float
    scheduler: str
    warmup_epochs: float
    early_stopping_patience: int
    grad_clip: float
    bce_weight: float
    dice_weight: float
    negative_prompts: bool
    augment: bool
    cache_activations: bool
    cached_views: int
    num_threads: int
    crop_scale_jitter: tuple[float, float] = (1.0, 1.0)  # native-scale training only (inference mode whole/sliding)
    crop_foreground_prob: float = 0.5
    conv_stem: tuple[int, ...] | None = None  # scratch only: the ConvStem's widths (model.conv_stem)
    ema_decay: float = 0.0  # > 0: validate and publish an exponential moving average of the weights
    augment_scale: tuple[float, float] = (0.9, 1.1)  # resize mode: the affine's zoom range
    augment_color: float = 0.0  # resize mode: colour jitter strength (data.ResizeAugment)
    cldice_weight: float = 0.0  # > 0: soft clDice on the pairs of `cldice_datasets`' prompts
    cldice_datasets: tuple[str, ...] = ("cracks",)
    sample_prompts: bool = False  # True: each photo trains one own prompt and one negative per epoch
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        # A config rebuilt from its JSON form (`asdict`, a checkpoint's state) gets its types back.
        if isinstance(self.inference, dict):
            object.__setattr__(self, "inference", InferenceConfig.from_params(self.inference))
        object.__setattr__(self, "crop_scale_jitter", tuple(float(v) for v in self.crop_scale_jitter))
        object.__setattr__(self, "augment_scale", tuple(float(v) for v in self.augment_scale))
        object.__setattr__(self, "cldice_datasets", tuple(str(v) for v in self.cldice_datasets))
        if self.conv_stem is not None:
            object.__setattr__(self, "conv_stem", tuple(int(v) for v in self.conv_stem))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        model, train = params["model"], params["train"]
        optional = {
            "crop_scale_jitter",
            "crop_foreground_prob",
            "ema_decay",
            "augment_scale",
            "augment_color",
            "cldice_weight",
            "cldice_datasets",
            "sample_prompts",
        }
        names = {name for name in cls.__dataclass_fields__} - {
            "seed",
            "lr",
            "preset",
            "weights",
            "image_size",
            "freeze_backbone",
            "conv_stem",
            "inference",
        }
        missing = sorted(names - optional - set(train))
        if missing:
            raise TrainConfigError(f"params.yaml train section lacks {missing}")
        try:
            inference = InferenceConfig.from_params(params.get("inference"))
        except InferenceConfigError as error:
            raise TrainConfigError(str(error)) from None
        values = {name: train[name] for name in sorted(names) if name in train}
        jitter = values.get("crop_scale_jitter", (1.0, 1.0))
        if not isinstance(jitter, list | tuple) or len(jitter) != 2:
            raise TrainConfigError(f"train.crop_scale_jitter must be [low, high], got {jitter!r}")
        config = cls(
            seed=int(params["seed"]),
            lr=float(params["lr"]),
            preset=str(model["preset"]),
            weights=model.get("weights") or None,
            image_size=int(model["image_size"]),
            freeze_backbone=bool(model["freeze_backbone"]),
            conv_stem=model.get("conv_stem") or None,
            inference=inference,
            **values,
        )
        config.validate()
        return config

    def crop(self) -> CropConfig:
        try:
            return CropConfig(
                scale_jitter=tuple(self.crop_scale_jitter), foreground_prob=float(self.crop_foreground_prob)
            )
        except ValueError as error:
            raise TrainConfigError(str(error)) from None

    def resize_augment(self) -> ResizeAugment:
        try:
            return ResizeAugment(scale=tuple(self.augment_scale), color=float(self.augment_color))
        except ValueError as error:
            raise TrainConfigError(str(error)) from None

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise TrainConfigError(f"train.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        positive = {
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "cached_views": self.cached_views,
            "num_threads": self.num_threads,
        }
        bad = {name: value for name, value in positive.items() if not value > 0}
        if bad:
            raise TrainConfigError(f"these params must be > 0: {bad}")
        if self.bce_weight < 0 or self.dice_weight < 0 or self.bce_weight + self.dice_weight == 0:
            raise TrainConfigError("bce_weight and dice_weight must be >= 0 and not both 0")
        if self.early_stopping_patience < 1:
            raise TrainConfigError("train.early_stopping_patience must be >= 1")
        if self.cldice_weight < 0:
            raise TrainConfigError(f"train.cldice_weight must be >= 0 (0 = off), got {self.cldice_weight}")
        if not 0 <= self.ema_decay < 1:
            raise TrainConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        self.crop()
        self.resize_augment()

    @property
    def weights_init(self) -> str:
        if self.weights:
            return str(self.weights)
        return f"scratch:{self.preset}" + ("+conv_stem" if self.conv_stem else "")

    @property
    def uses_cache(self) -> bool:
        return self.freeze_backbone and self.cache_activations


def config_fingerprint(config: TrainConfig, manifest_path: str | Path) -> str:
    """What a checkpoint must match to be resumed: the whole config and the manifest's bytes."""
    return fingerprint_json({"config": asdict(config), "manifest_sha256": file_sha256(Path(manifest_path))})


# ----------------------------------------------------------------------------------------------
# Reproducibility, loss, metrics


def set_determinism(seed: int, num_threads: int) -> None:
    """Seed every RNG, fix the thread count and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads)
    # warn_only: a few CUDA backward kernels (e.g. upsampling) have no deterministic version.
    torch.use_deterministic_algorithms(True, warn_only=True)


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    thin: torch.Tensor | None = None,
    cldice_weight: float = 0.0,
) -> torch.Tensor:
    """bce_weight * mean BCE over all pixels + dice_weight * mean soft Dice loss over the pairs whose
    mask is not empty (+ cldice_weight * mean soft clDice loss over the non-empty pairs that `thin`
    marks).

    Dice is left out for empty masks: there it is ~1 for any prediction short of exactly zero, and
    with negative prompts (half the pairs) it drags every logit down, prompt-blind, before the model
    has learnt to tell prompts apart; training then sits at "predict nothing". BCE covers empty masks.
    clDice (Shit et al. 2021) compares soft skeletons: it rewards a crack traced end to end over a
    thick blob on part of it, which area overlap alone hardly tells apart for a 2 px line.
    """
    logits = logits.float()
    loss = bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    targets = masks.flatten(1)
    non_empty = targets.sum(1) > 0
    if not non_empty.any():
        return loss
    probs = torch.sigmoid(logits).flatten(1)[non_empty]
    targets = targets[non_empty]
    dice = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    loss = loss + dice_weight * dice.mean()
    selected = non_empty & thin if cldice_weight > 0 and thin is not None else None
    if selected is not None and selected.any():
        loss = loss + cldice_weight * soft_cldice_loss(logits[selected].unsqueeze(1), masks[selected].unsqueeze(1))
    return loss


def soft_cldice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MONAI's soft clDice loss of `[N, 1, H, W]` logits against binary masks, averaged over the pairs."""
    # imported here: MONAI takes seconds to import, and only runs with train.cldice_weight > 0 need it
    from monai.losses import SoftclDiceLoss

    return SoftclDiceLoss(iter_=3, sigmoid=True)(logits, masks)


def thin_prompts(config: TrainConfig, prompts_of_dataset: dict[str, list[str]]) -> list[str]:
    """The prompts clDice applies to: those of `config.cldice_datasets` (none while it is off)."""
    if config.cldice_weight <= 0:
        return []
    unknown = sorted(set(config.cldice_datasets) - set(prompts_of_dataset))
    if unknown:
        raise TrainConfigError(
            f"train.cldice_datasets names {unknown}, which the manifest lacks (datasets: {sorted(prompts_of_dataset)})"
        )
    return [prompt for name in config.cldice_datasets for prompt in prompts_of_dataset[name]]


def thin_pairs(prompt_index: torch.Tensor, dataset: SegmentationDataset, config: TrainConfig) -> torch.Tensor | None:
    """Which pairs (by `prompt_index` into `dataset.prompt_list`) clDice applies to; None when it is off."""
    prompts = thin_prompts(config, dataset.prompts_of_dataset)
    if not prompts:
        return None
    thin = torch.tensor([dataset.prompt_index[prompt] for prompt in prompts], dtype=prompt_index.dtype)
    return torch.isin(prompt_index, thin.to(prompt_index.device))


def pair_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    prompt_index: torch.Tensor,
    dataset: SegmentationDataset,
    config: TrainConfig,
) -> torch.Tensor:
    """`segmentation_loss` of a batch's pairs with the config's weights."""
    thin = thin_pairs(prompt_index.to(logits.device), dataset, config)
    return segmentation_loss(logits, masks, config.bce_weight, config.dice_weight, thin, config.cldice_weight)


def pair_scores(logits: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair IoU and Dice of `sigmoid(logits) >= threshold` against binary masks; empty vs empty = 1."""
    predicted = (torch.sigmoid(logits.float()) >= threshold).flatten(1)  # metrics.binarize's rule
    truth = masks.flatten(1) > 0.5
    intersection = (predicted & truth).sum(1).float()
    union = (predicted | truth).sum(1).float()
    total = predicted.sum(1).float() + truth.sum(1).float()
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))
    return iou, dice


# ----------------------------------------------------------------------------------------------
# Checkpoints


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int, log: Callable[[str], None] = print
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the per-step LR schedule (linear warm-up first); `log`
    gets the warning of a warm-up that spans the whole run."""
    warmup_steps, steps = round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch
    if warning := warmup_warning(config, warmup_steps, steps):
        log(warning)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if config.scheduler == "cosine":
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
        f"train: warning: the warm-up ({_count(warmup_steps, 'step')}, train.warmup_epochs={config.warmup_epochs:g}) "
        f"covers all {_count(steps, 'optimizer step')}, so {outcome}; lower train.warmup_epochs"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class _Run:
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
    set_determinism(config.seed, config.num_threads)
    device_ = select_device(device)
    prompts, train_records, val_records = _read_splits(config, manifest_path, root)
    fingerprint = config_fingerprint(config, manifest_path)

    resume_state = _resume_state_or_clear(work, fingerprint, log)
    if work != output_dir:
        shutil.rmtree(output_dir / "best", ignore_errors=True)  # published again when this run ends
    last = work / "last" if resume_state is not None else None
    model, processor = _initial_model(config, last, train_records, prompt_order(prompts), log)
    model.to(device_)
    normalisation = (processor.image_processor.image_mean, processor.image_processor.image_std)
    train_set, val_set = _datasets(config, model, normalisation, prompts, train_records, val_records)
    cache = ActivationCache(model, cache_dir) if config.uses_cache else None
    optimizer, scheduler = make_optimizer(model, config, math.ceil(len(train_set) / config.batch_size), log)
    average = weight_average(model, config.ema_decay)

    run, start_epoch = _resumed_run(work, resume_state, optimizer, scheduler, average, log, on_epoch)

    forward, val_forward = _forwards(model, average, processor, train_set.prompt_list, device_, cache)
    epoch_runner = _EpochRunner(
        config,
        forward,
        val_forward,
        average,
        train_set,
        val_set,
        optimizer,
        scheduler,
        _loader_options(device_),
        progress,
    )
    for epoch in range(start_epoch, config.epochs + 1):
        row, val = epoch_runner.run(epoch, run)
        improved, stop = run.record(row, config.early_stopping_patience)
        state = _resume_record(
            config, epoch, stop or epoch == config.epochs, fingerprint, train_set.prompt_list, run, tracking_run_id
        )
        save_epoch(work, model, processor, state, improved, optimizer, scheduler, average)
        write_history(history_path, run.history)
        log(_epoch_line(row, val))
        if on_epoch is not None:
            on_epoch(row)
        if stop:
            log(f"train: early stop after epoch {epoch}: no val mIoU gain for {run.epochs_without_improvement} epochs")
            break

    if work != output_dir:
        publish_checkpoint(work / "best", output_dir)
    summary = _summary(config, run, start_epoch, started, model, device_, train_set, val_set, cache)
    write_history(history_path, run.history)
    write_json(metrics_path, summary)
    return summary


def _read_splits(config: TrainConfig, manifest_path: str | Path, root: str | Path) -> tuple[dict, list, list]:
    """The manifest's prompts per dataset and its train and val images. A bad `train.cldice_datasets`
    fails here, before a model is built."""
    rows = read_manifest(manifest_path)
    prompts = prompts_by_dataset(rows)
    thin_prompts(config, prompts)
    return prompts, image_records(rows, "train", root), image_records(rows, "val", root)


def _resumed_run(
    work: Path,
    resume_state: dict[str, Any] | None,
    optimizer,
    scheduler,
    average,
    log: Callable[[str], None],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> tuple[_Run, int]:
    """The run record and first epoch: fresh, or where `last/` stopped (its optimizer, scheduler,
    RNG and weight average restored). A resume hands `on_epoch` the rows of the epochs before it
    again: a kill between an epoch's checkpoint and its callback must not lose that epoch's row."""
    if resume_state is None:
        return _Run(history=[]), 1
    restore_optimizer(work / "last", optimizer, scheduler, average)
    log(f"train: resuming from last/ after epoch {resume_state['epoch']} (config fingerprint matches)")
    run = _Run(**resume_state["run"])
    for row in run.history if on_epoch is not None else []:
        on_epoch(row)
    return run, resume_state["epoch"] + 1


def _resume_state_or_clear(output_dir: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The resume state of an unfinished run of this config, or None after clearing other runs' checkpoints."""
    recover_checkpoints(output_dir, log)
    state = resumable_state(output_dir / "last", fingerprint, log)
    if state is None:
        for name in ("best", "last"):  # another config's checkpoints must not pass for this run's
            shutil.rmtree(output_dir / name, ignore_errors=True)
    return state


def _epoch_line(row: dict[str, Any], val: dict[str, float]) -> str:
    extra = f", negative-prompt IoU {val['val_negative_iou']:.3f}" if "val_negative_iou" in val else ""
    return (
        f"train: epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {val['val_loss']:.4f}, "
        f"val mIoU {val['val_miou']:.4f}, val Dice {val['val_dice']:.4f}{extra}, {row['seconds']:.1f}s"
    )


def _initial_model(
    config: TrainConfig, last: Path | None, train_records, all_prompts: list[str], log: Callable[[str], None]
):
    """The model to train: `last/` when resuming, else the configured weights, else a scratch model
    normalising with the train images' channel statistics."""
    if last is not None:
        model, processor = build_model(config.preset, last, config.image_size, config.freeze_backbone)
    elif config.weights:
        model, processor = build_model(config.preset, config.weights, config.image_size, config.freeze_backbone)
    else:
        mean, std = channel_statistics(train_records, config.image_size)
        log(f"train: from scratch; normalising with the train images' mean {mean} and std {std}")
        model, processor = build_model(
            config.preset,
            None,
            config.image_size,
            config.freeze_backbone,
            prompts=all_prompts,
            image_mean=mean,
            image_std=std,
            conv_stem=config.conv_stem,
        )
    if last is None:
        model, processor = reloaded(model, processor)  # saves the same bytes as a model resumed from last/
    set_backbone_trainable(model, not config.freeze_backbone)
    config.inference.attach(model)  # saved in every checkpoint's config.json: inference reads it from there
    return model, processor


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """With `decay` > 0, an exponential moving average of the model's weights and buffers (updated
    after every optimizer step), else None. From scratch on ~1,500 photos, val mIoU swings by +-0.02
    from epoch to epoch at one lr; the average is what validation scores and `best/` holds."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _forwards(model, average: AveragedModel | None, processor, prompts: list[str], device, cache):
    """The training forward (the trained weights) and the validation one (their average when there is one)."""
    forward = PairForward(model, processor, prompts, device, cache)
    return forward, (PairForward(average.module, processor, prompts, device, cache) if average else forward)


@dataclass
class _EpochRunner:
    """One epoch: train over a seeded shuffle of the train set, then validate (the weight average when there is one)."""

    config: TrainConfig
    forward: PairForward
    val_forward: PairForward
    average: AveragedModel | None
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader_options: dict[str, Any]
    progress: bool

    def run(self, epoch: int, run: _Run) -> tuple[dict[str, Any], dict[str, float]]:
        config, epoch_started = self.config, time.perf_counter()
        self.train_set.set_epoch(epoch - 1)
        loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate_pairs,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
            **self.loader_options,
        )
        # disable=None: a bar on a terminal, none in CI logs (the epoch line still prints)
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=None if self.progress else True, leave=False)
        trainable = self.optimizer.param_groups[0]["params"]  # what gradient clipping covers
        train_loss = _train_epoch(
            self.forward, bar, self.train_set, self.optimizer, self.scheduler, trainable, config, self.average
        )
        val = validate(self.val_forward, self.val_set, config, self.loader_options)
        run.seconds += time.perf_counter() - epoch_started
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val["val_loss"],
            "val_miou": val["val_miou"],
            "val_dice": val["val_dice"],
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - epoch_started,
        }
        # the row keeps every val score (negative-prompt IoU too), so a replay after a resume has them
        return row | {key: value for key, value in val.items() if key not in row}, val


def _resume_record(
    config: TrainConfig,
    epoch: int,
    complete: bool,
    fingerprint: str,
    prompts: list[str],
    run: _Run,
    tracking_run_id: str | None,
) -> dict[str, Any]:
    """What a checkpoint's training_state.json holds: enough to resume, and to say what made it."""
    return {
        "epoch": epoch,
        "complete": complete,
        "fingerprint": fingerprint,
        "config": asdict(config),
        "weights_init": config.weights_init,
        "prompts": prompts,
        "best_epoch": run.best_epoch,
        "best_val_miou": run.best_val_miou,
        "run": asdict(run),
        "mlflow_run_id": tracking_run_id,
    }


def _summary(
    config: TrainConfig,
    run: _Run,
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


def _datasets(
    config: TrainConfig,
    model: CLIPSegForImageSegmentation,
    normalisation: tuple[list[float], list[float]],
    prompts: dict[str, list[str]],
    train_records: list,
    val_records: list,
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The train and val datasets. Native-scale training (inference mode whole/sliding): crops of the
    model's input size from the photo at the inference scale; validation then scores whole photos at
    that scale, the way evaluation and predict make masks."""
    mean, std = normalisation
    native = config.inference.native
    geometry = {
        "working_scale": config.inference.scale if native else None,
        "patch_size": model.config.vision_config.patch_size,
    }
    train_set = SegmentationDataset(
        train_records,
        prompts,
        config.image_size,
        mean,
        std,
        augment=config.augment,
        negative_prompts=config.negative_prompts,
        seed=config.seed,
        views=config.cached_views if config.uses_cache else None,
        crop=config.crop() if native else None,
        resize_augment=config.resize_augment(),
        sample_prompts=config.sample_prompts,
        **geometry,
    )
    val_set = SegmentationDataset(  # every pair: val checks each prompt, and that the wrong ones stay empty
        val_records,
        prompts,
        config.image_size,
        mean,
        std,
        augment=False,
        negative_prompts=config.negative_prompts,
        seed=config.seed,
        **geometry,
    )
    return train_set, val_set


def _loader_options(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":  # workers decode images while the GPU computes; pinned memory for async copies
        return {"num_workers": min(4, os.cpu_count() or 1), "pin_memory": True, "persistent_workers": False}
    return {"num_workers": 0}  # CPU: the model needs every core


def resumable_run_id(config: TrainConfig, manifest_path: str | Path, work_dir: str | Path) -> str | None:
    """The MLflow run of the unfinished training that `train` would resume, if it recorded one."""
    if not Path(manifest_path).is_file():
        return None
    state = resumable_state(Path(work_dir) / "last", config_fingerprint(config, manifest_path), lambda _: None)
    return state.get("mlflow_run_id") if state else None


class PairForward:
    """Logits of a batch's (image, prompt) pairs: one vision pass (or cache read) per image, the
    prompt set encoded once when the text encoder is frozen, else on every call."""

    def __init__(
        self,
        model: CLIPSegForImageSegmentation,
        processor: CLIPSegProcessor,
        prompts: list[str],
        device: torch.device,
        cache: ActivationCache | None,
    ):
        self.model, self.device, self.cache = model, device, cache
        self.input_ids, self.attention_mask = tokenize_prompts(processor, prompts, device)
        text_trainable = any(p.requires_grad for p in model.clip.text_model.parameters()) or any(
            p.requires_grad for p in model.clip.text_projection.parameters()
        )
        self.fixed_conditional = None
        if not text_trainable:
            with torch.no_grad(), autocast(device):
                self.fixed_conditional = encode_prompts(model, self.input_ids, self.attention_mask).float()

    def conditionals(self) -> torch.Tensor:
        if self.fixed_conditional is not None:
            return self.fixed_conditional
        return encode_prompts(self.model, self.input_ids, self.attention_mask)

    def __call__(
        self, batch: dict[str, torch.Tensor], dataset: SegmentationDataset
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits, masks)` of the batch's pairs, float32 on the device, logits at the masks' size."""
        masks = batch["masks"].to(self.device, non_blocking=True)
        with autocast(self.device):
            if self.cache is not None:
                activations = self.cache.activations_for(self.model, batch, dataset, self.device)
            else:
                activations = encode_images(self.model, batch["pixel_values"].to(self.device, non_blocking=True))
            conditional = self.conditionals()[batch["prompt_index"].to(self.device)]
            logits = decode(
                self.model, pair_activations(activations, batch["image_index"].to(self.device)), conditional
            )
        return resize_logits(logits.float(), tuple(masks.shape[-2:])), masks

    def native(self, batch: dict[str, torch.Tensor], config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits, masks)` of whole images at the working scale through inference's own path
        (`native_logits`: one pass, or sliding windows), every prompt decoded, the batch's pairs kept."""
        masks = batch["masks"].to(self.device, non_blocking=True)
        with autocast(self.device):
            all_logits = native_logits(
                self.model,
                batch["pixel_values"].to(self.device, non_blocking=True),
                self.conditionals(),
                config.inference,
                window=config.image_size,
            )
        image_index = batch["image_index"].to(self.device)
        logits = all_logits[image_index, batch["prompt_index"].to(self.device)]
        return logits.float(), masks


def _train_epoch(
    forward: PairForward,
    batches: Iterable[dict[str, torch.Tensor]],
    dataset: SegmentationDataset,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.nn.Parameter],
    config: TrainConfig,
    average: AveragedModel | None = None,
) -> float:
    """One pass over the batches (updating `average` after each step); returns the mean loss per pair."""
    forward.model.train()
    loss_sum, pairs = 0.0, 0
    for batch in batches:
        logits, masks = forward(batch, dataset)
        loss = pair_loss(logits, masks, batch["prompt_index"], dataset, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
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
    if config.inference.native:
        loader = DataLoader(
            val_set,
            batch_sampler=size_grouped_batches(val_set, config.batch_size),
            collate_fn=collate_pairs,
            **loader_options,
        )
    else:
        loader = DataLoader(
            val_set, batch_size=config.batch_size, shuffle=False, collate_fn=collate_pairs, **loader_options
        )
    loss_sum, pairs = 0.0, 0
    ious, dices, positive = [], [], []
    for batch in loader:
        logits, masks = forward.native(batch, config) if config.inference.native else forward(batch, val_set)
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
