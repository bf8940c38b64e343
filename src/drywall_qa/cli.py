"""`drywall-qa` command line: `drywall-qa predict` writes masks for images with a trained model;
`drywall-qa export` writes the model as one ONNX file that `predict --runtime onnx` (or the
standalone `drywall_qa.onnx_runtime`) runs with ONNX Runtime.

    drywall-qa predict --model models/clipseg/best --out masks/ photos/ extra.jpg
    drywall-qa predict --model models:/drywall-qa-clipseg/1 --thresholds-from metrics/eval.json --out masks/ photos/
    drywall-qa export --model models:/drywall-qa-clipseg@champion --out model.onnx
    drywall-qa predict --runtime onnx --model model.onnx --out masks/ photos/

Masks follow the project's contract: `<out>/<image_id>__<prompt_slug>.png`, single-channel, values
{0, 255}, the image's original size (pixels as stored: no EXIF rotation, like the training data).

Errors: an unknown model or bad arguments stop at once with one line and exit code 2. An image that
cannot be read is reported on one line and skipped; the others are still predicted, and the exit
code is then 2 with a count of the skipped images (so scripts notice).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from drywall_qa.contracts.mask_rule import describe_rule
from drywall_qa.contracts.masks import binarize, write_mask
from drywall_qa.contracts.naming import image_id_of, mask_file_name
from drywall_qa.contracts.roboflow import IMAGE_SUFFIXES, is_image_file
from drywall_qa.contracts.thresholds import (
    DEFAULT_THRESHOLD,
    THRESHOLDS_FILE,
    eval_key,
    read_boxed,
    read_eval_boxed,
    read_eval_thresholds,
    read_thresholds,
)
from drywall_qa.errors import DrywallQAError

DEFAULT_PROMPTS = ["segment crack", "segment taping area"]
# `models:/name/1`, `runs:/<id>/model`, `mlflow-artifacts:/...`, `s3://...`: a scheme of 2+ characters
# (so a Windows drive letter `C:` is still a path).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class CliError(DrywallQAError):
    """A problem the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------- model


def is_mlflow_uri(model: str) -> bool:
    return bool(_URI.match(model)) and not Path(model).exists()


def find_checkpoint(root: Path) -> Path:
    """The `save_pretrained` folder in `root` or below (a model folder has `config.json` and weights)."""
    candidates = sorted(
        {
            p.parent
            for p in root.rglob("config.json")
            if any((p.parent / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
        },
        key=lambda p: (len(p.parts), str(p)),
    )
    if not candidates:
        raise CliError(f"{root} holds no saved CLIPSeg model (a folder with config.json and model.safetensors)")
    return candidates[0]


def resolve_model_dir(model: str, download_dir: Path) -> Path:
    """A local checkpoint folder for `model`: the folder itself, or the MLflow artifacts downloaded."""
    if is_mlflow_uri(model):
        import mlflow

        from drywall_qa.tracking import redact_uri, tracking_uri

        mlflow.set_tracking_uri(tracking_uri(Path.cwd()))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(download_dir))
        except Exception as error:
            detail = " ".join(str(error).split())[:300]
            raise CliError(f"cannot download MLflow model {redact_uri(model)}: {detail}") from None
        return find_checkpoint(Path(local))
    path = Path(model)
    if not path.is_dir():
        raise CliError(
            f"model folder {model} does not exist (give a save_pretrained folder or an MLflow URI "
            "such as models:/drywall-qa-clipseg/1)"
        )
    return find_checkpoint(path)


# ---------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly, plus the image files directly inside named folders (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
        elif path.is_file():
            paths.append(path)
        else:
            raise CliError(f"{item} does not exist")
    if not paths:
        raise CliError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    by_id: dict[str, Path] = {}
    for path in paths:
        other = by_id.setdefault(image_id_of(path.name), path)
        if other != path:
            raise CliError(
                f"{other} and {path} share the image id {image_id_of(path.name)!r}: their masks would collide"
            )
    return list(by_id.values())


def model_thresholds(model_root: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The val-chosen thresholds and snapped prompts (each with its snap) a logged MLflow model
    carries (its `thresholds.json`), if any."""
    found = sorted(model_root.rglob(THRESHOLDS_FILE), key=lambda p: len(p.parts))
    return (read_thresholds(found[0]), read_boxed(found[0])) if found else ({}, {})


def boxed_for(
    prompts: Sequence[str], thresholds_from: str | None, carried: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The prompts snapped to boxes, each with its snap: those `--thresholds-from` (an eval.json)
    records, else those the model carries. `--threshold` does not change it."""
    if thresholds_from:
        return read_eval_boxed(thresholds_from, prompts)
    return {prompt: snap for prompt, snap in (carried or {}).items() if prompt in prompts}


def thresholds_for(
    prompts: Sequence[str],
    threshold: float | None,
    thresholds_from: str | None,
    carried: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per prompt: `--threshold`; else `threshold.<slug>` of `--thresholds-from` (an eval.json); else the
    threshold the model carries (`carried`); else 0.5."""
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise CliError(f"--threshold must be within [0, 1], got {threshold}")
        return {prompt: threshold for prompt in prompts}
    chosen = {prompt: DEFAULT_THRESHOLD for prompt in prompts} | {
        prompt: value for prompt, value in (carried or {}).items() if prompt in prompts
    }
    if thresholds_from:
        recorded = read_eval_thresholds(thresholds_from, prompts)
        for prompt in prompts:
            if prompt not in recorded:
                print(
                    f"drywall-qa: {thresholds_from} has no {eval_key(prompt)}; using {chosen[prompt]:g} for {prompt!r}",
                    file=sys.stderr,
                )
        chosen |= recorded
    return chosen


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CliError(f"cannot read image {path}: {' '.join(str(error).split())[:200]}") from None


# ---------------------------------------------------------------- predicting


@dataclass
class PredictSummary:
    images: int = 0
    masks: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unreadable image


def predict_to_folder(
    probs_of: Callable[[list[Image.Image], list[str]], list[np.ndarray]],
    paths: Sequence[Path],
    prompts: Sequence[str],
    thresholds: dict[str, float],
    out_dir: Path,
    batch_size: int = 8,
    boxed: Mapping[str, str] | None = None,
) -> PredictSummary:
    """Masks of every readable image for every prompt; images go to `probs_of` (PyTorch's or ONNX
    Runtime's `predict_probs`) `batch_size` at a time, each through the vision encoder once for all prompts."""
    from tqdm import tqdm

    boxed = boxed or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary()
    progress = tqdm(total=len(paths), unit="img", desc="predict", disable=None)
    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append((path, read_image(path)))
            except CliError as error:
                summary.skipped.append(str(error))
                print(f"drywall-qa: {error} (skipped)", file=sys.stderr)
        if batch:
            probs = probs_of([image for _, image in batch], list(prompts))
            for (path, _), image_probs in zip(batch, probs, strict=True):
                for prompt, prob in zip(prompts, image_probs, strict=True):
                    mask = binarize(prob, thresholds[prompt], boxed.get(prompt))
                    write_mask(out_dir / mask_file_name(image_id_of(path.name), prompt), mask)
                    summary.masks += 1
                summary.images += 1
        progress.update(len(paths[start : start + batch_size]))
    progress.close()
    return summary


def load_checkpoint(model_dir: Path):
    from drywall_qa.model import load_model

    try:
        return load_model(model_dir)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load the model in {model_dir}: {' '.join(str(error).split())[:300]}") from None


def torch_predictor(model: str, download_dir: Path, device: str | None, batch_size: int):
    """`(probs_of, carried thresholds, carried snapped prompts)` of a checkpoint folder or MLflow model."""
    from drywall_qa.inference import predict_probs

    model_dir = resolve_model_dir(model, download_dir)
    carried = model_thresholds(download_dir) if is_mlflow_uri(model) else ({}, {})
    checkpoint, processor = load_checkpoint(model_dir)

    def probs_of(images, prompts):
        return predict_probs(checkpoint, processor, images, prompts, device=device, batch_size=batch_size)

    return probs_of, *carried


def onnx_predictor(model: str, download_dir: Path, batch_size: int):
    """`(probs_of, carried thresholds, carried snapped prompts)` of an exported .onnx file, or of an
    MLflow model that carries one; the rules come from the file's metadata."""
    from drywall_qa.onnx_runtime import load_onnx_model, onnx_predict_probs

    if is_mlflow_uri(model):
        resolve_model_dir(model, download_dir)  # downloads it
        found = sorted(download_dir.rglob("*.onnx"), key=lambda p: len(p.parts))
        if not found:
            raise CliError(f"MLflow model {model} carries no ONNX file; export one with `drywall-qa export`")
        path = found[0]
    else:
        path = Path(model)
        if path.suffix != ".onnx" or not path.is_file():
            raise CliError(
                f"--runtime onnx takes an .onnx file (from `drywall-qa export`) or an MLflow URI, got {model}"
            )
    onnx_model = load_onnx_model(path)
    thresholds = {prompt: onnx_model.rule(prompt)[0] for prompt in onnx_model.prompts}
    boxed = {prompt: onnx_model.rule(prompt)[1] for prompt in onnx_model.prompts if onnx_model.rule(prompt)[1]}

    def probs_of(images, prompts):
        return onnx_predict_probs(onnx_model, images, prompts, batch_size=batch_size)

    return probs_of, thresholds, boxed


def predict_command(args: argparse.Namespace) -> int:
    prompts = list(dict.fromkeys(args.prompt or DEFAULT_PROMPTS))
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = collect_images(args.inputs)
    # a downloaded MLflow model lives in a temporary folder for as long as it is used (weights may be mmapped)
    with tempfile.TemporaryDirectory(prefix="drywall-qa-model-") as download_dir:
        if args.runtime == "onnx":
            probs_of, carried, carried_boxed = onnx_predictor(args.model, Path(download_dir), args.batch_size)
        else:
            probs_of, carried, carried_boxed = torch_predictor(
                args.model, Path(download_dir), args.device, args.batch_size
            )
        thresholds = thresholds_for(prompts, args.threshold, args.thresholds_from, carried)
        boxed = boxed_for(prompts, args.thresholds_from, carried_boxed)
        summary = predict_to_folder(probs_of, paths, prompts, thresholds, Path(args.out), args.batch_size, boxed)
    shown = ", ".join(f"{p!r} at {describe_rule(t, boxed.get(p))}" for p, t in thresholds.items())
    print(f"drywall-qa: wrote {summary.masks} masks for {summary.images} images to {args.out} ({shown})")
    if summary.skipped:
        print(
            f"drywall-qa: {len(summary.skipped)} of {len(paths)} images could not be read and were skipped",
            file=sys.stderr,
        )
        return 2
    return 0


def export_command(args: argparse.Namespace) -> int:
    from drywall_qa.onnx_export import export_onnx

    if not args.out.endswith(".onnx"):
        raise CliError(f"--out must name an .onnx file, got {args.out}")
    with tempfile.TemporaryDirectory(prefix="drywall-qa-model-") as download_dir:
        model_dir = resolve_model_dir(args.model, Path(download_dir))
        carried, carried_boxed = model_thresholds(Path(download_dir)) if is_mlflow_uri(args.model) else ({}, {})
        # default: every prompt the registered model has a val-chosen rule for
        prompts = list(dict.fromkeys(args.prompt or list(carried) or DEFAULT_PROMPTS))
        thresholds = thresholds_for(prompts, args.threshold, args.thresholds_from, carried)
        boxed = boxed_for(prompts, args.thresholds_from, carried_boxed)
        model, processor = load_checkpoint(model_dir)
        export_onnx(model, processor, args.out, prompts, thresholds, boxed)
    size = Path(args.out).stat().st_size / 1e6
    shown = ", ".join(f"{p!r} at {describe_rule(t, boxed.get(p))}" for p, t in thresholds.items())
    print(f"drywall-qa: wrote {args.out} ({size:.1f} MB; {shown})")
    return 0


MODEL_HELP = (
    "a save_pretrained folder (models/clipseg/best) or an MLflow model URI "
    "(models:/drywall-qa-clipseg/1, models:/drywall-qa-clipseg@champion, runs:/<run_id>/<logged model name>)"
)


def add_rule_arguments(command: argparse.ArgumentParser, prompt_default: str) -> None:
    """The prompt and mask-rule options `predict` and `export` share."""
    command.add_argument("--prompt", action="append", help=f"a prompt; repeat for several (default: {prompt_default})")
    command.add_argument("--threshold", type=float, help="probability threshold for every prompt")
    command.add_argument(
        "--thresholds-from",
        metavar="EVAL_JSON",
        help="take each prompt's threshold and box snapping from `threshold.<prompt_slug>` and "
        "`boxes.<prompt_slug>` of this metrics/eval.json (default: the val-chosen rules a registered "
        f"MLflow model or an ONNX export carries, else {DEFAULT_THRESHOLD} unsnapped; --threshold replaces the threshold only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drywall-qa", description="Text-prompted drywall segmentation (CLIPSeg).")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict",
        help="write masks for images",
        description="Write a {0,255} mask per image and prompt, named <image_id>__<prompt_slug>.png. "
        "Unreadable images are skipped and make the exit code 2.",
    )
    predict.add_argument("--model", required=True, help=MODEL_HELP + "; with --runtime onnx, an .onnx file or URI")
    predict.add_argument("--out", required=True, help="folder for the masks (created)")
    add_rule_arguments(predict, ", ".join(DEFAULT_PROMPTS))
    predict.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the checkpoint with PyTorch (default); onnx: an exported model with ONNX Runtime on the CPU",
    )
    predict.add_argument("--device", help="cpu, cuda, mps (default: the best available; runtime torch)")
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    predict.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files, or folders whose image files are all predicted",
    )
    predict.set_defaults(handler=predict_command)
    export = commands.add_parser(
        "export",
        help="write the model as one ONNX file for ONNX Runtime",
        description="Export the whole inference path (vision pass, prompts, decoder) to ONNX, with the "
        "tokenised prompts and their mask rules in the file's metadata.",
    )
    export.add_argument("--model", required=True, help=MODEL_HELP)
    export.add_argument("--out", required=True, help="the .onnx file to write")
    add_rule_arguments(export, "the prompts a registered model has rules for, else " + ", ".join(DEFAULT_PROMPTS))
    export.set_defaults(handler=export_command)
    plots = commands.add_parser(
        "plots",
        help="render the pipeline's DVC plots offline",
        description="`dvc plots show` with Vega inlined into the page, so the charts render with no "
        "internet. Arguments after `--` go to `dvc plots show`.",
    )
    plots.add_argument("--out", default="dvc_plots", help="folder for index.html (default dvc_plots)")
    plots.add_argument("dvc_args", nargs="*", help="extra `dvc plots show` arguments (targets, options)")
    plots.set_defaults(handler=plots_command)
    return parser


def plots_command(args: argparse.Namespace) -> int:
    from drywall_qa.plots import render_offline

    page = render_offline(".", args.out, args.dvc_args)
    print(f"drywall-qa: plots written to {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DrywallQAError as error:  # the project's errors say what is wrong; no traceback
        print(f"drywall-qa: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
