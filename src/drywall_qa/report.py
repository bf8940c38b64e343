"""The generated report: every number comes from the pipeline's metrics files, every figure from
plots/figures/. Nothing here is hand-written about results.

Markdown always; HTML too when `markdown_it` (markdown-it-py, installed with dvc's `rich`) imports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from drywall_qa.contracts.naming import prompt_slug
from drywall_qa.errors import DrywallQAError
from drywall_qa.params import InferenceParams, TrainParams
from drywall_qa.training.config import TrainConfig

SPLITS = ("train", "val", "test")
FIGURES_FROM_REPORT = "../plots/figures"  # reports/ -> plots/figures/


class ReportError(DrywallQAError, RuntimeError):
    """A report input is missing or lacks a value; the message names the file."""


@dataclass
class ReportInputs:
    source: dict
    conversion: dict
    split: dict
    train: dict
    eval: dict
    figures_dir: Path


def read_json(path: str | Path, produced_by: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} does not exist: run the `{produced_by}` stage first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None


def load_inputs(
    source_json: str | Path,
    conversion_json: str | Path,
    split_json: str | Path,
    train_json: str | Path,
    eval_json: str | Path,
    figures_dir: str | Path,
) -> ReportInputs:
    figures_dir = Path(figures_dir)
    if not figures_dir.is_dir():
        raise ReportError(f"{figures_dir} does not exist: run the `visualize` stage first")
    return ReportInputs(
        source=read_json(source_json, "download"),
        conversion=read_json(conversion_json, "convert"),
        split=read_json(split_json, "split"),
        train=read_json(train_json, "train"),
        eval=read_json(eval_json, "evaluate"),
        figures_dir=figures_dir,
    )


# ---------------------------------------------------------------- formatting helpers


def _need(mapping: dict, key: str, file: str) -> Any:
    if key not in mapping:
        raise ReportError(f"{file} has no `{key}`: re-run the stage that writes it")
    return mapping[key]


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


def _score_with_interval(m: dict, key: str) -> str:
    """The score under `key` and, when eval.json has it, its 95% interval (`key`_ci_low / _ci_high)."""
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if isinstance(low, int | float) and isinstance(high, int | float):
        return f"{_score(m.get(key))} [{low:.3f}, {high:.3f}]"
    return _score(m.get(key))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _figure(inputs: ReportInputs, name: str, alt: str) -> str:
    if not (inputs.figures_dir / name).is_file():
        raise ReportError(f"{inputs.figures_dir / name} does not exist: re-run the `visualize` stage")
    return f"![{alt}]({FIGURES_FROM_REPORT}/{name})"


def describe_source(source: dict) -> tuple[str, str]:
    """(short label for the first line, longer description) of `data/raw/source.json`."""
    kind = _need(source, "source", "data/raw/source.json")
    datasets = source.get("datasets", {})
    if kind == "synthetic":
        return "synthetic (generated offline)", (
            f"seeded synthetic Roboflow-format COCO exports (seed {source.get('seed')}, "
            f"generator {json.dumps(source.get('generator', {}))}), mimicking "
            + ", ".join(f"`{d.get('workspace')}/{d.get('project')}`" for d in datasets.values())
        )
    if kind == "roboflow":
        projects = [f"`{d['workspace']}/{d['project']}` v{d['version']}" for d in datasets.values()]
        return (
            "real data (Roboflow exports via the SDK)",
            "Roboflow Universe exports downloaded with the SDK: " + ", ".join(projects),
        )
    if kind == "local":
        paths = [f"{name}: `{d.get('path')}`" for name, d in datasets.items()]
        sliced = source.get("limit_per_dataset") or 0
        note = f" (a seeded slice of at most {sliced} images per dataset)" if sliced else ""
        return "real data (Roboflow exports from local files)", "Roboflow exports read from local files: " + ", ".join(
            paths
        ) + note
    return str(kind), str(kind)


def describe_weights(weights_init: str) -> str:
    """`scratch:tiny` -> `scratch (tiny)`; a Hub id or folder stays as it is, marked pretrained."""
    if weights_init.startswith("scratch:"):
        return f"scratch ({weights_init.split(':', 1)[1]})"
    return f"pretrained `{weights_init}`"


# ---------------------------------------------------------------- sections


def headline(inputs: ReportInputs) -> str:
    label, _ = describe_source(inputs.source)
    weights_init = _need(inputs.train, "weights_init", "metrics/train.json")
    lines = [
        "# drywall-qa: text-prompted drywall segmentation",
        "",
        f"**Data: {label}, weights: {describe_weights(weights_init)}**",
        "",
    ]
    if inputs.source.get("source") == "synthetic":
        lines += [
            "> **Warning: synthetic data.** These results come from generated images with drawn cracks and",
            "> joints. They show that the pipeline works end to end and say **nothing** about how the",
            "> model performs on real photos. Run with `data.source: roboflow` or `local` for that.",
            "",
        ]
    if weights_init.startswith("scratch:"):
        lines += [
            "> The model was trained from randomly initialised weights (no pretrained CLIP), so it knows only",
            "> the prompts it was trained with and nothing about the language beyond them.",
            "",
        ]
    m = inputs.eval
    summary = (
        f"Test mIoU **{_score(_need(m, 'test.miou', 'metrics/eval.json'))}**, "
        f"mean Dice **{_score(_need(m, 'test.dice', 'metrics/eval.json'))}** "
        f"over {m.get('test.pairs')} (image, prompt) pairs"
    )
    if "zero_shot.test.miou" in m:
        summary += f"; the same model before training: mIoU {_score(m['zero_shot.test.miou'])}"
    return "\n".join(lines + [summary + "."])


def pipeline_headline(inputs: ReportInputs, registration: Mapping[str, Any]) -> str:
    """The first line of the MLflow parent run's description, the one line the run page shows without
    a click: test and val mIoU per dataset, data, weights, gate verdict and the registered version."""
    m = inputs.eval
    datasets = sorted(inputs.source.get("datasets") or {})

    def per_dataset(split: str) -> str:
        return " · ".join(f"{d} {_score(m[f'{split}.{d}.miou'])}" for d in datasets if f"{split}.{d}.miou" in m)

    label, _ = describe_source(inputs.source)
    weights = describe_weights(_need(inputs.train, "weights_init", "metrics/train.json"))
    version = f"models:/{registration['name']}/{registration['version']}"
    verdict = f"gate passed: {version} @champion" if registration.get("champion") else f"gate failed: {version}"
    return f"**Test mIoU {per_dataset('test')} | val mIoU {per_dataset('val')} | data: {label} | weights: {weights} | {verdict}**"


def pipeline_tags(inputs: ReportInputs, registration: Mapping[str, Any]) -> dict[str, str]:
    """The parent run's tags, in the description's words: where the numbers and the model come from."""
    return {
        "data_source": str(_need(inputs.source, "source", "data/raw/source.json")),
        "weights": describe_weights(_need(inputs.train, "weights_init", "metrics/train.json")),
        "gate": "passed" if registration.get("gate_passed") else "failed",
        "registered_model": f"models:/{registration['name']}/{registration['version']}",
        "logged_model": str(registration["model_uri"]),
    }


def goal_section() -> str:
    return "\n".join(
        [
            "## Goal",
            "",
            "Given a photo of a drywall surface and a text prompt, return a binary mask of what the prompt",
            "names: cracks (`segment crack`) or taping areas / joints (`segment taping area`), for",
            "automated quality assurance. One model serves every prompt.",
        ]
    )


def approach_section(inputs: ReportInputs, params: dict) -> str:
    config, m = TrainConfig.from_params(params), inputs.eval
    model, train = config.model, config.train
    prompt_rows = [(dataset, ", ".join(f"`{p}`" for p in prompts)) for dataset, prompts in params["prompts"].items()]
    trainable = inputs.train.get("trainable_params")
    lines = [
        "## Approach and model",
        "",
        "CLIPSeg (`transformers` `CLIPSegForImageSegmentation`): a CLIP image encoder, a CLIP text encoder",
        "whose prompt embedding conditions (FiLM) a light transformer decoder that outputs mask logits.",
        "The image is encoded once and every prompt is decoded against it. Fine-tuned on all prompts of",
        "both datasets with a weighted BCE + Dice loss; the mask threshold is chosen per prompt on val.",
        "",
        _table(
            ["setting", "value"],
            [
                ("weights", describe_weights(_need(inputs.train, "weights_init", "metrics/train.json"))),
                ("architecture preset (scratch only)", f"`{model.preset}`"),
                (
                    "patch embedding (scratch only)",
                    f"convolutional stem, 3x3 stride-2 layers of {model.conv_stem} channels"
                    if model.conv_stem
                    else "ViT's patchify convolution",
                ),
                (
                    "mask upsampler",
                    f"skip-connected (U-Net style) on the conv stem's {len(model.skip_decoder)} finest maps but one, "
                    f"widths {model.skip_decoder}"
                    if model.skip_decoder
                    else "CLIPSeg's transposed convolutions from the 1/16 token grid",
                ),
                ("input size", f"{model.image_size} x {model.image_size}"),
                ("training images", describe_training_geometry(config)),
                ("masks made by", describe_inference(config)),
                ("backbone", "frozen (decoder only)" if inputs.train.get("frozen_backbone") else "trained"),
                (
                    "parameters",
                    f"{int(_need(m, 'footprint.params', 'metrics/eval.json')):,}"
                    + (f" ({int(trainable):,} trainable)" if trainable is not None else ""),
                ),
                ("loss", describe_loss(train)),
                (
                    "weights validated and published",
                    f"a moving average over optimizer steps (train.ema_decay {train.ema_decay:g})"
                    if train.ema_decay
                    else "the trained weights of the best val epoch",
                ),
                (
                    "negative prompts",
                    "yes: images also paired with the other dataset's prompts and an empty mask"
                    if train.negative_prompts
                    else "no",
                ),
                (
                    "pairs per photo and epoch",
                    "one of its prompts and one negative, drawn per epoch (train.sample_prompts)"
                    if train.sample_prompts
                    else "all of its prompts" + (" and every negative" if train.negative_prompts else ""),
                ),
            ],
        ),
        "",
        "Prompts per dataset:",
        "",
        _table(["dataset", "prompts"], prompt_rows),
    ]
    return "\n".join(lines)


def describe_training_geometry(config: TrainConfig) -> str:
    inference, train, side = config.inference, config.train, config.model.image_size
    if inference.mode == "resize":
        return f"whole photos resized to {side} x {side}"
    low, high = train.crop_scale_jitter
    return (
        f"{side} x {side} crops of the photo scaled by {inference.scale:g} (jitter x{low:g}-{high:g}), "
        f"{train.crop_foreground_prob:.0%} of them centred on foreground"
    )


def describe_inference(config: TrainConfig) -> str:
    inference, side = config.inference, config.model.image_size
    mode, scale, flips = inference.mode, inference.scale, inference.flips
    mirrors = f"; also mirrored {' and '.join(flips)}, the views' logits averaged" if flips else ""
    if mode == "whole":
        return f"one pass over the whole photo scaled by {scale:g}, upsampled to its size{mirrors}"
    if mode == "sliding":
        return (
            f"{side} px windows over the photo scaled by {scale:g}, overlap {inference.overlap:g}, "
            f"logits averaged{mirrors}"
        )
    sides = " and ".join(f"{size} x {size}" for size in inference.sizes or [side])
    return f"the photo resized to {sides} (the model trains at {side} x {side}), logits upsampled to its size{mirrors}"


def data_section(inputs: ReportInputs) -> str:
    _, description = describe_source(inputs.source)
    lines = ["## Data and splits", "", f"Source: {description}.", "", _source_table(inputs), ""]
    return "\n".join(lines + _conversion_lines(inputs) + _split_lines(inputs))


def _source_table(inputs: ReportInputs) -> str:
    source_rows = []
    for name, d in inputs.source.get("datasets", {}).items():
        folders = ", ".join(f"{split} {c['images']}" for split, c in d.get("splits", {}).items())
        source_rows.append(
            (
                name,
                d.get("format", "?"),
                d.get("geometry", "?"),
                d.get("images", "?"),
                d.get("annotations", "?"),
                folders,
            )
        )
    return _table(["dataset", "format", "geometry", "images", "annotations", "export folders"], source_rows)


def _conversion_lines(inputs: ReportInputs) -> list[str]:
    conversion = _need(inputs.conversion, "datasets", "metrics/conversion.json")
    rows, skip_lines = [], []
    for name, d in conversion.items():
        annotations, images = d["annotations"], d["images"]
        kinds = ", ".join(f"{k} {v}" for k, v in annotations.get("converted_by_kind", {}).items() if v)
        rows.append(
            (
                name,
                images["seen"],
                images["converted"],
                images["skipped"],
                images.get("empty_masks", "?"),
                annotations["seen"],
                annotations["converted"],
                kinds or "–",
                annotations["skipped"],
            )
        )
        for what, counts in (("annotations", annotations), ("images", images)):
            reasons = {r: n for r, n in counts.get("skipped_by_reason", {}).items() if n}
            if reasons:
                skip_lines.append(
                    f"- {name}: skipped {what} by reason: " + ", ".join(f"`{r}` {n}" for r, n in reasons.items())
                )
    lines = [
        "Conversion to masks (one {0, 255} PNG per image and prompt; the union of the image's instances):",
        "",
        _table(
            [
                "dataset",
                "images seen",
                "converted",
                "skipped",
                "empty masks",
                "annotations seen",
                "converted",
                "converted as",
                "skipped",
            ],
            rows,
        ),
        "",
    ]
    return lines + (skip_lines or ["- No annotation or image was skipped."]) + [""]


def _split_lines(inputs: ReportInputs) -> list[str]:
    split = _need(inputs.split, "datasets", "metrics/split.json")
    split_rows = []
    for name, per_split in split.items():
        for s in SPLITS:
            c = per_split[s]
            split_rows.append((name, s, c["images"], c["groups"], c["pairs"], f"{c['image_fraction']:.1%}"))
        # groups never cross splits, so the per-split counts add up to the dataset's unique source images
        split_rows.append(
            (
                f"**{name}**",
                "all",
                sum(per_split[s]["images"] for s in SPLITS),
                sum(per_split[s]["groups"] for s in SPLITS),
                sum(per_split[s]["pairs"] for s in SPLITS),
                "100%",
            )
        )
    leaks = ", ".join(f"{name} {d.get('groups_across_source_splits', '?')}" for name, d in split.items())
    return [
        f"Split (seed {inputs.split.get('seed')}): Roboflow's own folders are merged and re-split per dataset, "
        "grouped by source image, so no source image (and none of its augmented copies) is in two splits. "
        f"Source images that Roboflow had spread over more than one folder: {leaks}.",
        "",
        _table(
            ["dataset", "split", "images", "unique source images", "(image, prompt) pairs", "share of images"],
            split_rows,
        ),
    ]


def describe_loss(train: TrainParams) -> str:
    text = f"{train.bce_weight} x BCE + {train.dice_weight} x Dice"
    if train.cldice_weight > 0:
        text += f" + {train.cldice_weight} x soft clDice on the {', '.join(train.cldice_datasets)} prompts"
    return text


def describe_augmentation(config: TrainConfig) -> str:
    train = config.train
    if not train.augment:
        return "none"
    if config.inference.mode != "resize":
        low, high = train.crop_scale_jitter
        return f"crops at scale {low:g}–{high:g}, flips, right-angle turns, small rotation, brightness/contrast"
    low, high = train.augment_scale
    text = f"flips, zoom {low:g}–{high:g}, ±15° rotation, brightness/contrast"
    return text + (f", colour jitter {train.augment_color:g}" if train.augment_color > 0 else "")


def training_section(inputs: ReportInputs, params: dict) -> str:
    config, t = TrainConfig.from_params(params), inputs.train
    train = config.train
    config_rows = [
        ("learning rate", config.lr),
        ("epochs (max)", train.epochs),
        ("batch size", train.batch_size),
        ("weight decay", train.weight_decay),
        ("scheduler", f"{train.scheduler}, {train.warmup_epochs} warm-up epoch(s)"),
        ("early stopping patience", train.early_stopping_patience),
        ("gradient clipping", train.grad_clip),
        ("augmentation", describe_augmentation(config)),
        ("seed (split / training)", f"{config.seed} / {config.training_seed}"),
    ]
    result_rows = [
        ("epochs run", t.get("epochs_run", "–")),
        ("best epoch (highest val mIoU)", t.get("best_epoch", "–")),
        ("best val mIoU / Dice", f"{_score(t.get('best_val_miou'))} / {_score(t.get('best_val_dice'))}"),
        ("training images / val images", f"{t.get('train_images', '–')} / {t.get('val_images', '–')}"),
        ("training time", describe_training_time(t)),
        ("device", f"`{t.get('device', '–')}`"),
    ]
    return "\n".join(
        [
            "## Training",
            "",
            _table(["parameter", "value"], config_rows),
            "",
            _table(["result", "value"], result_rows),
            "",
            "The checkpoint with the best val mIoU is the one evaluated.",
            "",
            _figure(inputs, "training_curves.png", "training curves"),
        ]
    )


def results_section(inputs: ReportInputs, params: dict) -> str:
    m = inputs.eval
    columns = [
        "dataset",
        "prompt",
        "threshold",
        "mIoU",
        "Dice",
        "IoU (dataset)",
        "precision",
        "recall",
        "zero-shot mIoU",
        "pairs",
    ]
    lines = ["## Test results", "", _table(columns, _result_rows(m, params)), "", *_result_notes(inputs)]
    lines += ["", _figure(inputs, "threshold_sweep.png", "threshold sweep on val")]
    return "\n".join(lines)


def _snap_label(m: dict, prompt: str) -> str:
    if m.get(f"boxes.{prompt_slug(prompt)}") != 1:
        return ""
    return " + arms" if m.get(f"arms.{prompt_slug(prompt)}") == 1 else " + boxes"


def _result_rows(m: dict, params: dict) -> list[tuple]:
    """One row per prompt, one per dataset over its prompts, and one over everything."""
    rows = []
    for dataset, prompts in params["prompts"].items():
        for prompt in prompts:
            key = f"test.{prompt_slug(prompt)}"
            rows.append(
                (
                    dataset,
                    f"`{prompt}`",
                    f"{_need(m, f'threshold.{prompt_slug(prompt)}', 'metrics/eval.json'):g}" + _snap_label(m, prompt),
                    _score(_need(m, f"{key}.miou", "metrics/eval.json")),
                    _score(m.get(f"{key}.dice")),
                    _score(m.get(f"{key}.iou_dataset")),
                    _score(m.get(f"{key}.precision")),
                    _score(m.get(f"{key}.recall")),
                    _score(m.get(f"zero_shot.{key}.miou")),
                    m.get(f"{key}.pairs"),
                )
            )
        rows.append(
            (
                f"**{dataset}**",
                "all its prompts",
                "",
                _score_with_interval(m, f"test.{dataset}.miou"),
                _score(m.get(f"test.{dataset}.dice")),
                _score(m.get(f"test.{dataset}.iou_dataset")),
                _score(m.get(f"test.{dataset}.precision")),
                _score(m.get(f"test.{dataset}.recall")),
                _score(m.get(f"zero_shot.test.{dataset}.miou")),
                m.get(f"test.{dataset}.pairs"),
            )
        )
    rows.append(
        (
            "**all**",
            "",
            "",
            _score(m["test.miou"]),
            _score(m.get("test.dice")),
            _score(m.get("test.iou_dataset")),
            _score(m.get("test.precision")),
            _score(m.get("test.recall")),
            _score(m.get("zero_shot.test.miou")),
            m.get("test.pairs"),
        )
    )
    return rows


def _result_notes(inputs: ReportInputs) -> list[str]:
    m = inputs.eval
    lines = [
        "Definitions:",
        "",
        "- **mIoU** is the mean over (image, prompt) pairs of the foreground IoU |P ∩ G| / |P ∪ G|; "
        "**Dice** likewise 2|P ∩ G| / (|P| + |G|). A pair with an empty ground truth scores 1 when the "
        "prediction is empty too and 0 otherwise. Rows over several prompts average all their pairs.",
        "- **[low, high]** after a dataset's mIoU: its 95% bootstrap interval, resampling source photos (the "
        "augmented copies of one photo together), so it shows how much the score would move on other photos.",
        "- **IoU (dataset)** sums intersections and unions over all pairs before dividing (large objects weigh "
        "more, empty pairs add nothing). **Precision** and **recall** are pixel-level, from summed counts. "
        "An undefined ratio (0/0) is 1 only when there is neither ground truth nor prediction, else 0.",
        "- **threshold**: the probability a pixel must reach to be foreground, chosen per prompt as the value "
        f"of `evaluate.thresholds` with the highest val mIoU (ties: closest to 0.5). Val mIoU at the chosen "
        f"thresholds: {_score(m.get('val.miou'))}.",
        "- **+ boxes** / **+ arms**: with `evaluate.box_snapping`, val also decides per prompt whether the "
        "mask snaps to boxes (the taping ground truth is drawn as boxes), and how: **boxes** replaces each "
        "predicted component by its bounding rectangle; **arms** keeps only straight horizontal and vertical "
        "runs at least a fifth of the photo's shorter side long and boxes each arm, so an L-shaped joint "
        "becomes two thin boxes and a blob without a long straight run is dropped. `drywall-qa predict`, "
        "the registered model and the ONNX runner apply the same rule.",
    ]
    if "zero_shot.test.miou" in m:
        lines.append(
            f"- **zero-shot**: the same evaluation of the configured model before fine-tuning (threshold "
            f"{m.get('zero_shot.threshold')}): {describe_weights(inputs.train.get('weights_init', ''))} "
            "initial weights. The gap to the mIoU column is what training bought."
        )
    else:
        lines.append("- zero-shot evaluation is off (`evaluate.zero_shot: false`).")
    if "cross_prompt.test.pred_fg_fraction" in m:
        lines.append(
            f"- **cross-prompt**: on test images of one dataset, the prompts of the other dataset mark "
            f"{m['cross_prompt.test.pred_fg_fraction']:.2%} of the pixels on average and predict an empty mask "
            f"for {m['cross_prompt.test.empty_rate']:.0%} of {m['cross_prompt.test.pairs']} such pairs "
            "(no ground truth exists for these pairs; a prompt-aware model marks little there)."
        )
    return lines


def examples_section(inputs: ReportInputs, params: dict) -> str:
    lines = [
        "## Visual examples",
        "",
        "Test images per prompt, spread evenly over the prompt's IoU ranking (best first), so they are",
        "typical rather than picked. Columns: image, ground truth, prediction, overlay (red: prediction,",
        "green outline: ground truth).",
    ]
    for prompts in params["prompts"].values():
        for prompt in prompts:
            lines += ["", f"### `{prompt}`", "", _figure(inputs, f"examples__{prompt_slug(prompt)}.png", prompt)]
    lines += [
        "",
        "### Prompt sensitivity",
        "",
        "One test image per dataset under every prompt, including the other dataset's prompts:",
        "",
        _figure(inputs, "prompt_sensitivity.png", "prompt sensitivity"),
    ]
    return "\n".join(lines)


def failures_section(inputs: ReportInputs, params: dict) -> str:
    lines = ["## Failure cases", "", "The lowest-IoU test pairs of each prompt (ties by image id)."]
    for prompts in params["prompts"].values():
        for prompt in prompts:
            lines += ["", f"### `{prompt}`", "", _figure(inputs, f"failures__{prompt_slug(prompt)}.png", prompt)]
    return "\n".join(lines)


def stage_seconds_section(stage_seconds: dict[str, float] | None) -> str | None:
    if not stage_seconds:
        return None
    rows = [(stage, f"{seconds:,.1f}") for stage, seconds in stage_seconds.items()]
    rows.append(("**all stages above**", f"**{sum(stage_seconds.values()):,.1f}**"))
    return "\n".join(
        [
            "### Wall time per stage",
            "",
            "Seconds each stage of this pipeline execution took (MLflow `stage_seconds` of its child runs; the",
            "report stage itself is not finished when this is written; stages DVC skipped as unchanged are absent).",
            "",
            _table(["stage", "seconds"], rows),
        ]
    )


def _passes(inference: InferenceParams) -> str:
    """The vision passes per photo the latency covers: one per test-time view (params `inference`).
    `InferenceConfig.views` counts the same, but importing it brings in torch, which the report stage
    must not import before `cpu_numerics` is configured."""
    views = (1 + len(inference.flips)) * max(1, len(inference.sizes))
    return "one vision pass" if views == 1 else f"{views} test-time views, one vision pass each"


def describe_training_time(train_summary: dict) -> str:
    """Total seconds and seconds per epoch (each epoch's validation included)."""
    seconds, epochs = train_summary.get("seconds"), train_summary.get("epochs_run")
    if not isinstance(seconds, int | float):
        return "–"
    per_epoch = (
        f" ({seconds / epochs:.1f} s per epoch, validation included)" if isinstance(epochs, int) and epochs else ""
    )
    return f"{seconds:.0f} s{per_epoch}"


def runtime_section(inputs: ReportInputs, params: dict) -> str:
    m = inputs.eval
    need = lambda key: _need(m, key, "metrics/eval.json")  # noqa: E731
    rows = [
        ("device", f"`{need('runtime.device')}`"),
        ("latency, 1 prompt", f"{need('runtime.ms_per_image_1_prompt'):.1f} ms / image"),
        (
            f"latency, all {need('runtime.n_prompts_all')} prompts ({_passes(TrainConfig.from_params(params).inference)})",
            f"{need('runtime.ms_per_image_all_prompts'):.1f} ms / image",
        ),
        (
            f"throughput, batch of {need('runtime.timing_images')} images, all prompts",
            f"{need('runtime.images_per_s'):.1f} images / s",
        ),
        ("parameters", f"{int(need('footprint.params')):,}"),
        (
            "checkpoint on disk",
            f"{_mib(need('footprint.checkpoint_bytes'))} ({int(need('footprint.checkpoint_bytes')):,} bytes)",
        ),
        ("peak memory (RSS) of the evaluation", _mib(need("footprint.peak_rss_bytes"))),
    ]
    if "footprint.peak_gpu_bytes" in m:
        rows.append(("peak GPU memory allocated", _mib(m["footprint.peak_gpu_bytes"])))
    return "\n".join(
        [
            "## Runtime and footprint",
            "",
            _table(["measure", "value"], rows),
            "",
            f"Latency is the median over {need('runtime.timing_images')} test images, one image per call, after "
            "warm-up calls; it covers preprocessing, the model and resizing the probabilities to the image's "
            "size (reading the file excluded).",
        ]
    )


def reproducibility_section(
    params: dict, git_commit: str, raw_data_hash: str | None, mlflow_ids: dict[str, str]
) -> str:
    lines = [
        "## Reproducibility",
        "",
        _table(
            ["item", "value"],
            [
                ("seed", params["seed"]),
                ("git commit", f"`{git_commit}`"),
                ("DVC hash of `data/raw` (dvc.lock)", f"`{raw_data_hash}`" if raw_data_hash else "not in dvc.lock"),
                *[(f"MLflow {name}", f"`{run_id}`") for name, run_id in mlflow_ids.items()],
            ],
        ),
        "",
        "Reproduce with `dvc repro` (or `dvc exp run -S key=value` for a variant); compare experiments with",
        "`dvc exp show` and `dvc metrics diff`. Parameters of this run (`params.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines)


def build_report(
    inputs: ReportInputs,
    params: dict,
    git_commit: str,
    raw_data_hash: str | None,
    mlflow_ids: dict[str, str],
    stage_seconds: dict[str, float] | None = None,
) -> str:
    """The report as Markdown, figures referenced relative to `reports/`."""
    sections = [
        headline(inputs),
        goal_section(),
        approach_section(inputs, params),
        data_section(inputs),
        training_section(inputs, params),
        results_section(inputs, params),
        examples_section(inputs, params),
        failures_section(inputs, params),
        runtime_section(inputs, params),
        stage_seconds_section(stage_seconds),
        reproducibility_section(params, git_commit, raw_data_hash, mlflow_ids),
    ]
    return "\n\n".join(section for section in sections if section is not None) + "\n"


def markdown_to_html(markdown: str, title: str = "drywall-qa report") -> str | None:
    """A standalone HTML page of the report, or None when markdown-it-py is not installed."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
        "img{max-width:100%}blockquote{border-left:4px solid #d33;margin-left:0;padding-left:1em;color:#333}"
        "code{background:#f4f4f4;padding:0 .2em}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def write_report(markdown: str, out_dir: str | Path) -> list[Path]:
    """Write `report.md` (and `report.html` when possible) atomically; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.md", markdown), ("report.html", markdown_to_html(markdown))):
        if text is None:
            continue
        path = out_dir / name
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
