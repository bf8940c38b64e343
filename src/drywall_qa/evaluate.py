"""Evaluation: per-prompt thresholds chosen on val, test metrics, prediction masks, runtime and footprint.

The model enters only as a `PredictFn`: `(list of PIL images, list of prompts) -> list of float32
arrays [n_prompts, H, W]` of probabilities at each image's original size (the signature of
`drywall_qa.inference.predict_probs` with the model bound). `run_evaluation` binds the real model;
the functions below it take any such callable.

Images are read as stored (no EXIF rotation), the orientation the ground-truth masks were drawn in.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from drywall_qa.contracts.atomic import replace_dir, write_csv_atomic, write_json_atomic
from drywall_qa.contracts.manifest import ImageRecord, image_records, prompt_order, read_manifest
from drywall_qa.contracts.mask_rule import SNAPS
from drywall_qa.contracts.masks import binarize, read_mask, write_mask
from drywall_qa.contracts.naming import mask_file_name, prompt_slug, source_group
from drywall_qa.contracts.thresholds import boxed_metrics, eval_key
from drywall_qa.errors import DrywallQAError
from drywall_qa.intervals import group_bootstrap
from drywall_qa.metrics import Counts, confusion_counts, dice, iou, precision, recall, summarize, threshold_counts
from drywall_qa.runtime import device_name, folder_bytes, measure_runtime, peak_rss_bytes

PredictFn = Callable[[list[Image.Image], list[str]], list[np.ndarray]]

PER_IMAGE_COLUMNS = ["image_id", "dataset", "prompt", "iou", "dice", "gt_fg_fraction", "pred_fg_fraction"]
PER_PROMPT_COLUMNS = [
    "prompt",
    "dataset",
    "test_miou",
    "test_dice",
    "zero_shot_miou",
    "threshold",
    "boxes",
    "arms",
    "pairs",
]
SWEEP_COLUMNS = ["prompt", "threshold", "val_miou", "val_dice", "precision", "recall"]
ZERO_SHOT_THRESHOLD = 0.5
DECIMALS = 6  # rounding of written scores: stable files, far below any meaningful difference


class EvaluationError(DrywallQAError, RuntimeError):
    """Evaluation cannot run on this input; the message names the file or value at fault."""


# ---------------------------------------------------------------- reading inputs


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise EvaluationError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise EvaluationError(f"image {path} cannot be read: {error}") from None


def predict_images(
    predict_fn: PredictFn,
    images: Sequence[ImageRecord],
    prompts_of: Callable[[ImageRecord], list[str]],
    chunk_size: int,
) -> Iterator[tuple[ImageRecord, list[str], np.ndarray]]:
    """Yield (image, prompts, probabilities [n_prompts, H, W]) image by image.

    Images go to `predict_fn` in chunks of images sharing one prompt list, so memory holds one
    chunk of probability maps at a time.
    """
    pending: list[ImageRecord] = []

    def flush() -> Iterator[tuple[ImageRecord, list[str], np.ndarray]]:
        prompts = prompts_of(pending[0])
        pil_images = [load_image(item.image_path) for item in pending]
        for item, pil in zip(pending, pil_images, strict=True):
            if pil.size != (item.width, item.height):
                raise EvaluationError(
                    f"image {item.image_path} is {pil.size[0]}x{pil.size[1]}, the manifest says {item.width}x{item.height}"
                )
        outputs = predict_fn(pil_images, prompts)
        if len(outputs) != len(pending):
            raise EvaluationError(f"the model returned {len(outputs)} outputs for {len(pending)} images")
        for item, probs in zip(pending, outputs, strict=True):
            expected = (len(prompts), item.height, item.width)
            if tuple(probs.shape) != expected:
                raise EvaluationError(
                    f"the model returned {tuple(probs.shape)} for {item.image_id}, expected {expected}"
                )
            yield item, prompts, probs
        pending.clear()

    for image in images:
        if pending and (len(pending) >= chunk_size or prompts_of(image) != prompts_of(pending[0])):
            yield from flush()
        pending.append(image)
    if pending:
        yield from flush()


# ---------------------------------------------------------------- thresholds on val


Sweep = dict[tuple[str, str | None], list[list[Counts]]]  # (prompt, snap or None) -> per pair, counts per threshold


def sweep_thresholds(
    predict_fn: PredictFn,
    images: Sequence[ImageRecord],
    thresholds: Sequence[float],
    chunk_size: int = 8,
    snaps: Sequence[str] = (),
) -> Sweep:
    """For every prompt, unsnapped and snapped each way of `snaps` (`contracts.mask_rule.SNAPS`): per
    (image, prompt) pair, the pixel counts at each threshold."""
    counts: Sweep = defaultdict(list)
    for image, prompts, probs in predict_images(predict_fn, images, lambda i: list(i.prompts), chunk_size):
        for prompt, prob in zip(prompts, probs, strict=True):
            gt = read_mask(image.mask_paths[prompt], (image.width, image.height))
            counts[(prompt, None)].append(threshold_counts(prob, gt, thresholds))
            for snap in snaps:
                counts[(prompt, snap)].append([confusion_counts(binarize(prob, t, snap), gt) for t in thresholds])
    return dict(counts)


def choose_thresholds(sweep: Sweep, thresholds: Sequence[float]) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """Per prompt, the rule (threshold, snapped or not and how) with the highest val mIoU, the prompts
    snapped (each with its snap), and the sweep table of the unsnapped thresholds.

    Ties go to unsnapped, then boxes before arms, then to the threshold closest to 0.5, then the lower
    one, so a flat curve (e.g. a model that predicts nothing at any threshold) gives the neutral choice.
    """
    if not thresholds:
        raise EvaluationError("evaluate.thresholds is empty")
    best: dict[str, tuple[tuple, float, str | None]] = {}
    rows: list[dict] = []
    preference = {None: 0} | {snap: -1 - rank for rank, snap in enumerate(SNAPS)}
    for (prompt, snap), pairs in sorted(sweep.items(), key=lambda item: (item[0][0], -preference[item[0][1]])):
        if not pairs:
            raise EvaluationError(f"no val pairs for prompt {prompt!r}: cannot choose its threshold")
        for index, threshold in enumerate(thresholds):
            per_pair = [pair[index] for pair in pairs]
            miou = float(np.mean([iou(c) for c in per_pair]))
            if snap is None:
                total = sum(per_pair, Counts(0, 0, 0, 0))
                rows.append(
                    {
                        "prompt": prompt,
                        "threshold": float(threshold),
                        "val_miou": miou,
                        "val_dice": float(np.mean([dice(c) for c in per_pair])),
                        "precision": precision(total),
                        "recall": recall(total),
                    }
                )
            score = (miou, preference[snap], -abs(threshold - 0.5), -threshold)
            if prompt not in best or score > best[prompt][0]:
                best[prompt] = (score, float(threshold), snap)
    chosen = {prompt: threshold for prompt, (_, threshold, _) in best.items()}
    boxed = {prompt: snap for prompt, (_, _, snap) in best.items() if snap is not None}
    return chosen, boxed, rows


# ---------------------------------------------------------------- scoring a split


@dataclass
class SplitScores:
    pairs: list[dict]  # one per (image, own prompt): PER_IMAGE_COLUMNS + "counts"
    cross_prompt_fg: list[float]  # predicted foreground fraction of (image, other dataset's prompt) pairs


def score_split(
    predict_fn: PredictFn,
    images: Sequence[ImageRecord],
    thresholds: dict[str, float] | float,
    all_prompts: Sequence[str] = (),
    predictions_dir: str | Path | None = None,
    chunk_size: int = 8,
    boxed: Mapping[str, str] | None = None,
) -> SplitScores:
    """Score each image under its own prompts; also predict `all_prompts` the image does not own.

    `thresholds` is one threshold or one per prompt; the prompts in `boxed` are snapped its way. With `predictions_dir`, every binarised
    prediction (own and other prompts) is written there as `<dataset>/<image_id>__<prompt_slug>.png`.
    """
    threshold_of = (lambda p: thresholds[p]) if isinstance(thresholds, dict) else (lambda p: float(thresholds))
    boxed = boxed or {}
    extra = list(dict.fromkeys(all_prompts))

    def prompts_of(image: ImageRecord) -> list[str]:
        return list(image.prompts) + [p for p in extra if p not in image.mask_paths]

    scores = SplitScores([], [])
    for image, prompts, probs in predict_images(predict_fn, images, prompts_of, chunk_size):
        for prompt, prob in zip(prompts, probs, strict=True):
            try:
                pred = binarize(prob, threshold_of(prompt), boxed.get(prompt))
            except KeyError:
                raise EvaluationError(f"no threshold for prompt {prompt!r}") from None
            if predictions_dir is not None:
                write_mask(Path(predictions_dir) / image.dataset / mask_file_name(image.image_id, prompt), pred)
            if prompt not in image.mask_paths:
                scores.cross_prompt_fg.append(float(pred.mean()))
                continue
            gt = read_mask(image.mask_paths[prompt], (image.width, image.height))
            counts = confusion_counts(pred, gt)
            scores.pairs.append(
                {
                    "image_id": image.image_id,
                    "dataset": image.dataset,
                    "prompt": prompt,
                    "iou": iou(counts),
                    "dice": dice(counts),
                    "gt_fg_fraction": (counts.tp + counts.fn) / counts.pixels,
                    "pred_fg_fraction": (counts.tp + counts.fp) / counts.pixels,
                    "counts": counts,
                }
            )
    return scores


ALL_METRICS = ("miou", "dice", "iou_dataset", "dice_dataset", "pixel_accuracy", "precision", "recall", "pairs")
GROUP_METRICS = ("miou", "dice", "iou_dataset", "precision", "recall", "pairs")


def summary_metrics(
    pairs: list[dict],
    prefix: str,
    overall: Sequence[str] = ALL_METRICS,
    per_group: Sequence[str] = GROUP_METRICS,
    groups: Sequence[str] = ("dataset", "prompt"),
) -> dict[str, float]:
    """Flat metrics of scored pairs under `prefix`: `overall` ones over all pairs, `per_group` ones per
    dataset (`<prefix>.<dataset>.<metric>`) and per prompt (`<prefix>.<prompt_slug>.<metric>`).

    Fewer keys for the secondary evaluations keep `dvc exp show` readable.
    """
    if not pairs:
        raise EvaluationError(f"no scored pairs for {prefix!r}")
    summary = summarize(p["counts"] for p in pairs)
    metrics = {f"{prefix}.{key}": summary[key] for key in overall}
    for column in groups:
        name_of = prompt_slug if column == "prompt" else str
        for value in sorted({p[column] for p in pairs}):
            subset = summarize(p["counts"] for p in pairs if p[column] == value)
            metrics |= {f"{prefix}.{name_of(value)}.{key}": subset[key] for key in per_group}
    return metrics


# ---------------------------------------------------------------- the whole evaluation


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    per_image: list[dict]
    per_prompt: list[dict]
    sweep: list[dict]
    thresholds: dict[str, float]
    boxed: dict[str, str] = field(default_factory=dict)  # snapped prompt -> its snap (boxes | arms)


def evaluate_predictions(
    predict_fn: PredictFn,
    val: Sequence[ImageRecord],
    test: Sequence[ImageRecord],
    all_prompts: Sequence[str],
    thresholds: Sequence[float],
    predictions_dir: str | Path | None,
    chunk_size: int = 8,
    snaps: Sequence[str] = (),
    groups: Mapping[tuple[str, str], str] | None = None,
    seed: int = 0,
) -> EvaluationResult:
    """Choose a mask rule per prompt on val (its threshold, and whether snapping it to boxes in one of
    the ways of `snaps` scores higher), score test with it, write the test predictions.

    Test images are also predicted under the prompts of the other datasets (their masks are
    written too; `cross_prompt.*` measures how much foreground those prompts produce). Each dataset's
    val and test mIoU gets a 95% bootstrap interval over source photos (`groups`: (dataset, image_id)
    -> the manifest's group; by default the Roboflow source of the image id), seeded with `seed`.
    """
    unknown = sorted({p for image in [*val, *test] for p in image.prompts} - set(all_prompts))
    if unknown:
        raise EvaluationError(f"manifest prompts {unknown} are not in params.yaml `prompts`: re-run `split`")
    for name, images in (("val", val), ("test", test)):
        if not images:
            raise EvaluationError(f"the manifest has no {name} images")
    missing_val = sorted(set(all_prompts) - {p for image in val for p in image.prompts})
    if missing_val:
        raise EvaluationError(f"no val pairs for prompt(s) {missing_val}: cannot choose their thresholds")

    sweep = sweep_thresholds(predict_fn, val, thresholds, chunk_size, snaps)
    chosen, boxed, sweep_rows = choose_thresholds(sweep, thresholds)
    metrics: dict[str, Any] = {eval_key(p): t for p, t in chosen.items()}
    metrics |= boxed_metrics(list(chosen), boxed)
    # val only chose the rules: its scores with them, overall and per prompt
    val_pairs = val_pairs_at(sweep, chosen, boxed, thresholds, val)
    metrics |= summary_metrics(val_pairs, "val", overall=("miou", "dice"), per_group=("miou",))
    metrics |= dataset_intervals(val_pairs, "val", groups, seed)

    test_scores = score_split(predict_fn, test, chosen, all_prompts, predictions_dir, chunk_size, boxed)
    metrics |= summary_metrics(test_scores.pairs, "test")
    metrics |= dataset_intervals(test_scores.pairs, "test", groups, seed)
    if test_scores.cross_prompt_fg:
        fg = np.asarray(test_scores.cross_prompt_fg)
        metrics["cross_prompt.test.pred_fg_fraction"] = float(fg.mean())
        metrics["cross_prompt.test.empty_rate"] = float((fg == 0).mean())
        metrics["cross_prompt.test.pairs"] = int(fg.size)

    per_prompt = []
    for dataset, prompt in sorted({(p["dataset"], p["prompt"]) for p in test_scores.pairs}):
        slug = prompt_slug(prompt)
        per_prompt.append(
            {
                "prompt": prompt,
                "dataset": dataset,
                "test_miou": metrics[f"test.{slug}.miou"],
                "test_dice": metrics[f"test.{slug}.dice"],
                "zero_shot_miou": "",  # filled by add_zero_shot
                "threshold": chosen[prompt],
                "boxes": int(prompt in boxed),  # 1: val chose snapping to boxes
                "arms": int(boxed.get(prompt) == "arms"),  # 1: ... one box per straight arm
                "pairs": metrics[f"test.{slug}.pairs"],
            }
        )
    per_image = [{column: pair[column] for column in PER_IMAGE_COLUMNS} for pair in test_scores.pairs]
    return EvaluationResult(metrics, per_image, per_prompt, sweep_rows, chosen, boxed)


def add_zero_shot(
    result: EvaluationResult,
    zero_shot_predict_fn: PredictFn,
    test: Sequence[ImageRecord],
    chunk_size: int = 8,
) -> None:
    """Score test with the untrained model at threshold 0.5 into `zero_shot.test.*` and the per-prompt rows."""
    pairs = score_split(zero_shot_predict_fn, test, ZERO_SHOT_THRESHOLD, (), None, chunk_size).pairs
    zero_shot = summary_metrics(
        pairs, "zero_shot.test", overall=("miou", "dice", "iou_dataset"), per_group=("miou", "dice")
    )
    result.metrics |= zero_shot
    result.metrics["zero_shot.threshold"] = ZERO_SHOT_THRESHOLD
    for row in result.per_prompt:
        row["zero_shot_miou"] = zero_shot[f"zero_shot.test.{prompt_slug(row['prompt'])}.miou"]


def val_pairs_at(
    sweep: Sweep,
    chosen: Mapping[str, float],
    boxed: Mapping[str, str],
    thresholds: Sequence[float],
    val: Sequence[ImageRecord],
) -> list[dict]:
    """Val pairs with each prompt's chosen rule, in the shape `summary_metrics` reads, plus each pair's
    image id and IoU. The sweep lists a prompt's pairs in the order of the val images that own it."""
    pairs = []
    for prompt, threshold in chosen.items():
        index = list(thresholds).index(threshold)
        owners = [image for image in val if prompt in image.mask_paths]
        counts = sweep[(prompt, boxed.get(prompt))]
        if len(owners) != len(counts):
            raise EvaluationError(f"the sweep has {len(counts)} pairs of {prompt!r}, val has {len(owners)}")
        pairs += [
            {"image_id": image.image_id, "dataset": image.dataset, "prompt": prompt, "counts": c[index]}
            | {"iou": iou(c[index])}
            for image, c in zip(owners, counts, strict=True)
        ]
    return pairs


def manifest_groups(rows: Sequence[Mapping[str, str]]) -> dict[tuple[str, str], str]:
    """(dataset, image_id) -> the source photo group the split kept together (the manifest's `group`)."""
    return {(row["dataset"], row["image_id"]): row["group"] for row in rows}


def dataset_intervals(
    pairs: Sequence[Mapping[str, Any]], prefix: str, groups: Mapping[tuple[str, str], str] | None, seed: int
) -> dict[str, float]:
    """`<prefix>.<dataset>.miou_ci_low` / `_ci_high`: each dataset's mIoU 95% bootstrap interval,
    resampling source photos (see `drywall_qa.intervals`)."""
    metrics = {}
    for dataset in sorted({pair["dataset"] for pair in pairs}):
        subset = [pair for pair in pairs if pair["dataset"] == dataset]
        names = [
            groups[(dataset, pair["image_id"])] if groups is not None else source_group(pair["image_id"])
            for pair in subset
        ]
        interval = group_bootstrap([pair["iou"] for pair in subset], names, seed=seed)
        metrics[f"{prefix}.{dataset}.miou_ci_low"] = interval.low
        metrics[f"{prefix}.{dataset}.miou_ci_high"] = interval.high
    return metrics


def _rounded(value: Any) -> Any:
    return round(value, DECIMALS) if isinstance(value, float) else value


def write_outputs(result: EvaluationResult, metrics_path: str | Path, plots_dir: str | Path) -> None:
    """metrics/eval.json (sorted flat keys) and the three plot tables, each written atomically."""
    plots_dir = Path(plots_dir)
    write_json_atomic(metrics_path, {key: _rounded(result.metrics[key]) for key in sorted(result.metrics)})
    tables = (
        ("eval_per_image.csv", PER_IMAGE_COLUMNS, result.per_image),
        ("eval_per_prompt.csv", PER_PROMPT_COLUMNS, result.per_prompt),
        ("threshold_sweep.csv", SWEEP_COLUMNS, result.sweep),
    )
    for name, columns, rows in tables:
        write_csv_atomic(plots_dir / name, columns, ({k: _rounded(row[k]) for k in columns} for row in rows))


@dataclass(frozen=True)
class EvaluateSettings:
    """What the evaluation does (params `evaluate`, `prompts`, `model`, `seed`)."""

    prompts: dict[str, list[str]]
    model_params: dict[str, Any]  # for the zero-shot model: build_model(**model_params)
    thresholds: tuple[float, ...]
    batch_size: int
    zero_shot: bool
    timing_images: int
    seed: int
    snaps: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateSettings:
        evaluate = params["evaluate"]
        return cls(
            params["prompts"],
            params["model"],
            tuple(evaluate["thresholds"]),
            evaluate["batch_size"],
            evaluate["zero_shot"],
            evaluate["timing_images"],
            params["seed"],
            tuple(evaluate["box_snapping"]),
        )


def _footprint(model: Any, model_dir: Path, device: Any) -> dict[str, int]:
    """The trained model's size and the peak memory of its evaluation."""
    import torch

    footprint = {
        "footprint.params": sum(p.numel() for p in model.parameters()),
        "footprint.checkpoint_bytes": folder_bytes(model_dir),
        "footprint.peak_rss_bytes": peak_rss_bytes(),
    }
    if torch.device(device).type == "cuda":
        footprint["footprint.peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return footprint


def run_evaluation(
    model_dir: str | Path,
    manifest_path: str | Path,
    settings: EvaluateSettings,
    predictions_dir: str | Path,
    metrics_path: str | Path,
    plots_dir: str | Path,
    repo_root: str | Path = ".",
    device: str | None = None,
) -> EvaluationResult:
    """The `evaluate` stage: load the trained model, evaluate, time it, write every output.

    Predictions are written to a temporary sibling of `predictions_dir` that replaces it only when
    the evaluation succeeded. The zero-shot model is `build_model(**settings.model_params)` seeded with
    `settings.seed`: for pretrained `weights` the model before fine-tuning, for scratch the random
    initialisation. `device`: None picks CUDA, then MPS, then CPU.
    """
    import torch

    from drywall_qa.inference import InferenceConfig, predict_probs, select_device
    from drywall_qa.model import build_model, load_model

    model_dir, predictions_dir, repo_root = Path(model_dir), Path(predictions_dir), Path(repo_root)
    if not model_dir.is_dir():
        raise EvaluationError(f"model folder {model_dir} does not exist: run the `train` stage first")
    all_prompts = prompt_order(settings.prompts)
    batch_size = settings.batch_size
    rows = read_manifest(manifest_path)
    val, test = image_records(rows, "val", repo_root), image_records(rows, "test", repo_root)
    device = select_device(device)
    model, processor = load_model(str(model_dir))
    inference = InferenceConfig.of(model)  # how the checkpoint makes masks; the zero-shot model does the same
    predict_fn = functools.partial(predict_probs, model, processor, device=device, batch_size=batch_size)

    timing = [load_image(image.image_path) for image in test[: settings.timing_images]]
    runtime = measure_runtime(predict_fn, timing, all_prompts[:1], all_prompts)
    del timing

    predictions_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = predictions_dir.parent / f".{predictions_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = evaluate_predictions(
            predict_fn,
            val,
            test,
            all_prompts,
            settings.thresholds,
            staging,
            batch_size,
            settings.snaps,
            manifest_groups(rows),
            settings.seed,
        )
        footprint = _footprint(model, model_dir, device)  # read before a second model is built
        del model, predict_fn
        if settings.zero_shot:
            torch.manual_seed(settings.seed)
            zs_model, zs_processor = build_model(**settings.model_params, prompts=all_prompts)
            inference.attach(zs_model)
            zs_predict = functools.partial(predict_probs, zs_model, zs_processor, device=device, batch_size=batch_size)
            add_zero_shot(result, zs_predict, test, batch_size)
        replace_dir(staging, predictions_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.metrics |= (
        runtime
        | footprint
        | {
            "runtime.device": device_name(device),
            "inference.mode": inference.mode,
            "inference.scale": inference.scale,
            "inference.views": inference.views,  # vision passes per photo (or window); ms/image counts them all
        }
    )
    write_outputs(result, metrics_path, plots_dir)
    return result
