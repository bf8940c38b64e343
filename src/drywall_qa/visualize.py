"""Figures from the evaluation's outputs (no model runs here): examples, prompt sensitivity, failure
cases, threshold sweep and training curves, as PNG files.

Choices are deterministic: examples are spread evenly over each prompt's IoU ranking (from best to
worst, so they are typical rather than hand-picked); failure cases are the lowest IoUs (ties by
image id).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (CI, servers)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from drywall_qa.contracts.manifest import read_manifest
from drywall_qa.contracts.masks import read_mask
from drywall_qa.contracts.naming import mask_file_name, prompt_slug
from drywall_qa.errors import DrywallQAError

PANEL_INCHES = 2.6
PRED_COLOUR = (1.0, 0.15, 0.15)  # red fill: prediction
GT_COLOUR = "lime"  # green outline: ground truth


class VisualizationError(DrywallQAError, RuntimeError):
    """An input of the figures is missing or inconsistent; the message names the file."""


def read_csv(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise VisualizationError(f"{path} does not exist: run the stage that writes it first")
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise VisualizationError(f"{path}: missing column(s) {missing}")
    return table


def read_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise VisualizationError(f"image {path} does not exist")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def spread_over_ranking(per_image: pd.DataFrame, prompt: str, n: int) -> pd.DataFrame:
    """`n` pairs of `prompt` evenly spaced over the IoU ranking (best first), preferring pairs whose
    ground truth is not empty (an empty mask shows little)."""
    rows = per_image[per_image["prompt"] == prompt]
    with_gt = rows[rows["gt_fg_fraction"] > 0]
    rows = with_gt if len(with_gt) >= min(n, len(rows)) else rows
    ranked = rows.sort_values(["iou", "image_id"], ascending=[False, True], kind="stable")
    if len(ranked) <= n:
        return ranked
    picks = np.unique(np.linspace(0, len(ranked) - 1, n).round().astype(int))
    return ranked.iloc[picks]


def worst_cases(per_image: pd.DataFrame, prompt: str, k: int) -> pd.DataFrame:
    rows = per_image[per_image["prompt"] == prompt]
    return rows.sort_values(["iou", "image_id"], kind="stable").head(k)


def overlay(image: np.ndarray, pred: np.ndarray, ax: plt.Axes, gt: np.ndarray | None = None) -> None:
    """The image with the prediction filled in translucent red and the ground truth outlined in green."""
    ax.imshow(image)
    fill = np.zeros((*pred.shape, 4))
    fill[pred] = (*PRED_COLOUR, 0.45)
    ax.imshow(fill)
    if gt is not None and gt.any() and not gt.all():
        ax.contour(gt.astype(float), levels=[0.5], colors=GT_COLOUR, linewidths=1.0)


def _clean(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def pairs_figure(
    rows: pd.DataFrame, manifest: pd.DataFrame, predictions_dir: Path, repo_root: Path, title: str
) -> plt.Figure:
    """One row per (image, prompt): image | ground truth | prediction | overlay, IoU in the row title."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(4 * PANEL_INCHES, len(rows) * PANEL_INCHES), squeeze=False)
    for ax_row, row in zip(axes, rows.itertuples(index=False), strict=True):
        entry = _manifest_entry(manifest, row.dataset, row.image_id, row.prompt)
        image = read_rgb(repo_root / entry["image_path"])
        gt = read_mask(repo_root / entry["mask_path"])
        pred = read_mask(predictions_dir / row.dataset / mask_file_name(row.image_id, row.prompt))
        ax_row[0].imshow(image)
        ax_row[1].imshow(gt, cmap="gray", vmin=0, vmax=1)
        ax_row[2].imshow(pred, cmap="gray", vmin=0, vmax=1)
        overlay(image, pred, ax_row[3], gt)
        ax_row[0].set_title(_short(row.image_id), fontsize=8, loc="left")
        ax_row[1].set_title(f"ground truth ({row.gt_fg_fraction:.1%} fg)", fontsize=8)
        ax_row[2].set_title(f"prediction ({row.pred_fg_fraction:.1%} fg)", fontsize=8)
        ax_row[3].set_title(f"IoU {row.iou:.3f}  Dice {row.dice:.3f}", fontsize=8)
        for ax in ax_row:
            _clean(ax)
    fig.suptitle(f"{title}\nred: prediction, green outline: ground truth", fontsize=10)
    fig.tight_layout()
    return fig


def prompt_sensitivity_figure(
    image_rows: pd.DataFrame, prompts: Sequence[str], manifest: pd.DataFrame, predictions_dir: Path, repo_root: Path
) -> plt.Figure:
    """Each image (rows) under every prompt (columns), including the other dataset's prompts."""
    fig, axes = plt.subplots(
        len(image_rows),
        len(prompts) + 1,
        figsize=((len(prompts) + 1) * PANEL_INCHES, len(image_rows) * PANEL_INCHES),
        squeeze=False,
    )
    for ax_row, row in zip(axes, image_rows.itertuples(index=False), strict=True):
        entry = _manifest_entry(manifest, row.dataset, row.image_id, row.prompt)
        image = read_rgb(repo_root / entry["image_path"])
        gt = read_mask(repo_root / entry["mask_path"])
        overlay(image, np.zeros_like(gt), ax_row[0], gt)
        ax_row[0].set_title(
            f"{row.dataset}: {_short(row.image_id)}\n(green: ground truth of {row.prompt!r})", fontsize=7
        )
        for ax, prompt in zip(ax_row[1:], prompts, strict=True):
            pred = read_mask(predictions_dir / row.dataset / mask_file_name(row.image_id, prompt))
            overlay(image, pred, ax)
            ax.set_title(f"{prompt!r}\n{pred.mean():.1%} predicted", fontsize=8)
        for ax in ax_row:
            _clean(ax)
    fig.suptitle("Prompt sensitivity: one image, every prompt (red: prediction)", fontsize=10)
    fig.tight_layout()
    return fig


def threshold_sweep_figure(sweep: pd.DataFrame, chosen: dict[str, float]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for prompt, rows in sweep.groupby("prompt", sort=True):
        line = ax.plot(rows["threshold"], rows["val_miou"], marker="o", label=prompt)[0]
        if prompt in chosen:
            best = rows[np.isclose(rows["threshold"], chosen[prompt])]
            ax.scatter(best["threshold"], best["val_miou"], s=120, facecolors="none", edgecolors=line.get_color())
    ax.set_xlabel("threshold")
    ax.set_ylabel("val mIoU")
    ax.set_title("Threshold sweep on val (circle: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame) -> plt.Figure:
    fig, (loss_ax, score_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_ax.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    loss_ax.plot(history["epoch"], history["val_loss"], marker="o", label="val")
    loss_ax.set_title("loss (BCE + Dice)")
    score_ax.plot(history["epoch"], history["val_miou"], marker="o", label="val mIoU")
    score_ax.plot(history["epoch"], history["val_dice"], marker="o", label="val Dice")
    score_ax.set_title("validation scores")
    lr_ax.plot(history["epoch"], history["lr"], marker="o")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, score_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    score_ax.legend()
    fig.tight_layout()
    return fig


def make_figures(
    manifest_path: str | Path,
    per_image_csv: str | Path,
    per_prompt_csv: str | Path,
    threshold_sweep_csv: str | Path,
    train_history_csv: str | Path,
    predictions_dir: str | Path,
    out_dir: str | Path,
    examples_per_prompt: int,
    worst_k: int,
    repo_root: str | Path = ".",
) -> list[Path]:
    """Write every figure into `out_dir` (replaced as a whole once all are drawn); returns their paths.

    Files: `examples__<slug>.png` and `failures__<slug>.png` per prompt, `prompt_sensitivity.png`,
    `threshold_sweep.png`, `training_curves.png`.
    """
    if examples_per_prompt < 1 or worst_k < 1:
        raise VisualizationError("visualize.examples_per_prompt and visualize.worst_k must be >= 1")
    repo_root, predictions_dir, out_dir = Path(repo_root), Path(predictions_dir), Path(out_dir)
    manifest = pd.DataFrame(read_manifest(manifest_path))
    per_image = read_csv(
        per_image_csv, ["image_id", "dataset", "prompt", "iou", "dice", "gt_fg_fraction", "pred_fg_fraction"]
    )
    per_prompt = read_csv(per_prompt_csv, ["prompt", "threshold"])
    sweep = read_csv(threshold_sweep_csv, ["prompt", "threshold", "val_miou"])
    history = read_csv(train_history_csv, ["epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr"])
    if per_image.empty:
        raise VisualizationError(f"{per_image_csv} has no rows")
    if not predictions_dir.is_dir():
        raise VisualizationError(f"{predictions_dir} does not exist: run the `evaluate` stage first")
    test = manifest[manifest["split"] == "test"]
    prompts = list(dict.fromkeys(test["prompt"]))  # manifest order: dataset, then prompt

    figures: dict[str, plt.Figure] = {}
    try:
        for prompt in prompts:
            slug = prompt_slug(prompt)
            figures[f"examples__{slug}.png"] = pairs_figure(
                spread_over_ranking(per_image, prompt, examples_per_prompt),
                test,
                predictions_dir,
                repo_root,
                f"Test examples for {prompt!r} (spread over the IoU ranking, best first)",
            )
            figures[f"failures__{slug}.png"] = pairs_figure(
                worst_cases(per_image, prompt, worst_k),
                test,
                predictions_dir,
                repo_root,
                f"Failure cases for {prompt!r}: the {worst_k} lowest test IoUs",
            )
        # per dataset, the middle one of three pairs spread over its first prompt's ranking: a typical image
        typical = [spread_over_ranking(per_image, p, 3) for p in test.drop_duplicates("dataset")["prompt"]]
        sensitivity = pd.concat([rows.iloc[[len(rows) // 2]] for rows in typical if not rows.empty])
        figures["prompt_sensitivity.png"] = prompt_sensitivity_figure(
            sensitivity, prompts, test, predictions_dir, repo_root
        )
        chosen = dict(zip(per_prompt["prompt"], per_prompt["threshold"].astype(float), strict=True))
        figures["threshold_sweep.png"] = threshold_sweep_figure(sweep, chosen)
        figures["training_curves.png"] = training_curves_figure(history)
        return _save_all(figures, out_dir)
    finally:
        for figure in figures.values():
            plt.close(figure)


def _save_all(figures: dict[str, plt.Figure], out_dir: Path) -> list[Path]:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, figure in figures.items():
            figure.savefig(staging / name, dpi=100)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in figures]


def _manifest_entry(manifest: pd.DataFrame, dataset: str, image_id: str, prompt: str) -> dict:
    match = manifest[
        (manifest["dataset"] == dataset) & (manifest["image_id"] == image_id) & (manifest["prompt"] == prompt)
    ]
    if match.empty:
        raise VisualizationError(
            f"({dataset}, {image_id}, {prompt!r}) is in eval_per_image.csv but not in the test manifest"
        )
    return match.iloc[0].to_dict()


def _short(image_id: str, length: int = 28) -> str:
    return image_id if len(image_id) <= length else image_id[: length - 1] + "…"
