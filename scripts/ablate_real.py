"""Ablation of the real-data recipe on val only: train each variant, score its best checkpoint on the
val split per dataset, record wall time, and write `ablation.json` and `ablation.md`.

    python scripts/ablate_real.py --manifest /tmp/real/data/manifest.csv --root /tmp/real \
        --epochs 8 --out metrics/real --variant baseline --variant crop='{"inference.mode": "whole"}'

A variant is `name` (params.yaml as it is, plus `--set` overrides shared by all variants) or
`name=<JSON of dotted params overrides>`. `--also-score mode` scores each variant's checkpoint once
more with another inference mode (no retraining): that is how whole and sliding are compared.
The test split is never read here.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from drywall_qa.contracts.atomic import write_json_atomic, write_text_atomic
from drywall_qa.contracts.masks import snap_to_boxes
from drywall_qa.params import load_params


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    node = params
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, overrides = text.partition("=")
    return name, (json.loads(overrides) if overrides else {})


def val_scores(
    model_dir: Path, manifest_path: Path, root: Path, inference_mode: str | None, snap_datasets: Sequence[str] = ()
) -> dict[str, float]:
    """Val mIoU per dataset at threshold 0.5 through the inference path that evaluation uses; for
    `snap_datasets` also with predicted components snapped to their bounding rectangles."""
    import functools

    from drywall_qa.contracts.manifest import image_records, read_manifest
    from drywall_qa.contracts.masks import binarize, read_mask
    from drywall_qa.evaluate import predict_images
    from drywall_qa.inference import InferenceConfig, predict_probs
    from drywall_qa.metrics import confusion_counts, summarize
    from drywall_qa.model import load_model

    model, processor = load_model(model_dir)
    if inference_mode is not None:
        current = InferenceConfig.of(model)
        sizes = current.sizes if inference_mode == "resize" else ()
        dataclasses.replace(current, mode=inference_mode, sizes=sizes).attach(model)
    predict_fn = functools.partial(predict_probs, model, processor, device="cpu", batch_size=8)
    images = image_records(read_manifest(manifest_path), "val", root)
    counts: dict[str, list] = {}
    started = time.perf_counter()
    for image, prompts, probs in predict_images(predict_fn, images, lambda item: list(item.prompts), 8):
        for prompt, prob in zip(prompts, probs, strict=True):
            gt = read_mask(image.mask_paths[prompt], (image.width, image.height))
            predicted = binarize(prob, 0.5)
            counts.setdefault(image.dataset, []).append(confusion_counts(predicted, gt))
            if image.dataset in snap_datasets:
                counts.setdefault(f"{image.dataset}_snapped", []).append(confusion_counts(snap_to_boxes(predicted), gt))
    scores = {f"val.{dataset}.miou": summarize(pairs)["miou"] for dataset, pairs in sorted(counts.items())}
    scores["val.all.miou"] = summarize(
        [c for name, pairs in counts.items() if not name.endswith("_snapped") for c in pairs]
    )["miou"]
    scores["val_seconds"] = time.perf_counter() - started
    return scores


def views_scores(
    model_dir: Path, manifest_path: Path, root: Path, views: dict[str, Any], thresholds: Sequence[float]
) -> dict[str, Any]:
    """Val mIoU per dataset of a checkpoint made with the test-time `views` (`inference.flips` /
    `inference.sizes` overrides), each dataset at its best val threshold with and without box
    snapping, as evaluation chooses them; and the seconds the val predictions took."""
    import functools

    from drywall_qa.contracts.manifest import image_records, read_manifest
    from drywall_qa.contracts.masks import binarize, read_mask
    from drywall_qa.evaluate import predict_images
    from drywall_qa.inference import InferenceConfig, predict_probs
    from drywall_qa.metrics import confusion_counts, summarize
    from drywall_qa.model import load_model

    model, processor = load_model(model_dir)
    dataclasses.replace(
        InferenceConfig.of(model), flips=tuple(views.get("flips", ())), sizes=tuple(views.get("sizes", ()))
    ).attach(model)
    predict_fn = functools.partial(predict_probs, model, processor, device="cpu", batch_size=8)
    counts: dict[tuple[str, float, bool], list] = {}
    started = time.perf_counter()
    for image, prompts, probs in predict_images(
        predict_fn, image_records(read_manifest(manifest_path), "val", root), lambda item: list(item.prompts), 8
    ):
        for prompt, prob in zip(prompts, probs, strict=True):
            gt = read_mask(image.mask_paths[prompt], (image.width, image.height))
            for threshold in thresholds:
                predicted = binarize(prob, threshold)
                for snapped in (False, True):
                    mask = snap_to_boxes(predicted) if snapped else predicted
                    counts.setdefault((image.dataset, threshold, snapped), []).append(confusion_counts(mask, gt))
    record: dict[str, Any] = {"val_seconds": round(time.perf_counter() - started, 1)}
    for dataset in sorted({key[0] for key in counts}):
        scored = [
            (summarize(pairs)["miou"], -t, not snapped) for (d, t, snapped), pairs in counts.items() if d == dataset
        ]
        miou, negative_threshold, unsnapped = max(scored)  # ties: the lower threshold, then unsnapped
        record[f"val.{dataset}.miou"] = round(miou, 4)
        record[f"val.{dataset}.rule"] = f"{-negative_threshold:g}" + ("" if unsnapped else " + boxes")
    return record


def full_run_record(name: str, folder: Path, prompts: dict[str, list[str]]) -> dict[str, Any]:
    """Val mIoU per dataset (at the val-chosen thresholds) and wall time of a finished real run."""
    from drywall_qa.contracts.naming import prompt_slug

    evaluation = json.loads((folder / "eval.json").read_text())
    training = json.loads((folder / "train.json").read_text())
    record = {
        "name": name,
        "folder": str(folder),
        "epochs_run": training["epochs_run"],
        "train_seconds": round(training["seconds"], 1),
        "inference_mode": evaluation.get("inference.mode", "resize"),
    }
    for dataset, dataset_prompts in prompts.items():
        # every prompt of a dataset scores the same images, so the dataset's mIoU is their mean
        values = [evaluation[f"val.{prompt_slug(p)}.miou"] for p in dataset_prompts]
        record[f"val.{dataset}.miou"] = round(sum(values) / len(values), 4)
    record["val.all.miou"] = round(evaluation["val.miou"], 4)
    sweep_file = folder / "threshold_sweep.csv"
    boxed = [p for ps in prompts.values() for p in ps if evaluation.get(f"boxes.{prompt_slug(p)}") == 1]
    if boxed and sweep_file.is_file():
        # the same run without snapping: each prompt's best unsnapped threshold on val (the sweep table)
        best: dict[str, float] = {}
        with open(sweep_file, newline="") as handle:
            for row in csv.DictReader(handle):
                best[row["prompt"]] = max(best.get(row["prompt"], 0.0), float(row["val_miou"]))
        for dataset, dataset_prompts in prompts.items():
            if any(p in boxed for p in dataset_prompts):
                values = [best[p] for p in dataset_prompts]
                record[f"val.{dataset}.miou_unsnapped"] = round(sum(values) / len(values), 4)
    if any(key.startswith("boxes.") for key in evaluation):  # runs before box snapping existed did not try it
        record["boxed"] = boxed
    return record


def stopped_run_record(name: str, history: Path, reference: Path) -> dict[str, Any]:
    """A real run stopped before its end, against the reference run at the same epoch: their per-epoch
    val mIoU (all prompts, plain view, threshold 0.5; train's validation) and seconds per epoch. The
    reference's values are copied in, so the record keeps its meaning when the reference is replaced."""
    with open(history, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(reference, newline="") as handle:
        reference_rows = {row["epoch"]: row for row in csv.DictReader(handle)}
    if not rows:
        raise SystemExit(f"{history} has no epochs")
    last = rows[-1]
    if last["epoch"] not in reference_rows:
        raise SystemExit(f"{reference} has no epoch {last['epoch']} to compare {history} with")
    compared = [reference_rows[row["epoch"]] for row in rows]
    return {
        "name": name,
        "history": str(history),
        "reference": str(reference),
        "epochs_run": int(last["epoch"]),
        "val_miou": round(float(last["val_miou"]), 4),
        "val_loss": round(float(last["val_loss"]), 4),
        "reference_val_miou": round(float(compared[-1]["val_miou"]), 4),
        "reference_val_loss": round(float(compared[-1]["val_loss"]), 4),
        "seconds_per_epoch": round(sum(float(row["seconds"]) for row in rows) / len(rows), 1),
        "reference_seconds_per_epoch": round(sum(float(row["seconds"]) for row in compared) / len(compared), 1),
    }


def stopped_runs_markdown(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Real runs stopped early, on val",
        "",
        "Stopped once they trailed the recipe clearly, to spend the time on other levers: each run's per-epoch",
        "val (all prompts, plain view, threshold 0.5, as training validates) against the reference run's at",
        "the same epoch, and both runs' seconds per epoch over those epochs.",
        "",
        "| run | history | stopped after epoch | val mIoU | reference | its val mIoU then | val loss (reference) "
        "| s / epoch (reference) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['name']} | `{run['history']}` | {run['epochs_run']} | {run['val_miou']} | `{run['reference']}` "
            f"| {run['reference_val_miou']} | {run['val_loss']} ({run['reference_val_loss']}) "
            f"| {run['seconds_per_epoch']:.0f} ({run['reference_seconds_per_epoch']:.0f}) |"
        )
    return lines


def add_runs(args: argparse.Namespace) -> int:
    """--full-run / --stopped-run: add those records to the --out folder's ablation (replacing same names)."""
    out_file = args.out / "ablation.json"
    document = json.loads(out_file.read_text()) if out_file.is_file() else {"records": [], "variants": {}}
    runs = {run["name"]: run for run in document.get("full_runs", [])}
    for text in args.full_run:
        name, _, folder = text.partition("=")
        runs[name] = full_run_record(name, Path(folder), load_params(args.params)["prompts"])
    document["full_runs"] = list(runs.values())
    stopped = {run["name"]: run for run in document.get("stopped_runs", [])}
    for text in args.stopped_run:
        name, _, history = text.partition("=")
        stopped[name] = stopped_run_record(
            name, Path(history), args.reference_history or args.out / "train_history.csv"
        )
    if stopped:
        document["stopped_runs"] = list(stopped.values())
    write_json_atomic(out_file, document)
    write_text_atomic(args.out / "ablation.md", markdown(document))
    return 0


def run_variant(
    name: str, params: dict[str, Any], manifest: Path, root: Path, also_score: list[str], log_dir: Path
) -> dict[str, Any]:
    from drywall_qa.train import TrainConfig, train

    config = TrainConfig.from_params(params)
    with tempfile.TemporaryDirectory(prefix=f"ablate-{name}-") as work:
        work_dir = Path(work)
        started = time.perf_counter()
        summary = train(
            config,
            manifest_path=manifest,
            output_dir=work_dir / "model",
            metrics_path=work_dir / "train.json",
            history_path=log_dir / f"{name}.history.csv",
            root=root,
            progress=False,
            log=lambda line: print(f"[{name}] {line}", flush=True),
        )
        train_seconds = time.perf_counter() - started
        record = {
            "variant": name,
            "train_seconds": round(train_seconds, 1),
            "epochs_run": summary["epochs_run"],
            "best_epoch": summary["best_epoch"],
            "inference_mode": config.inference.mode,
            "params": summary["params"],
        }
        record |= {
            key: round(value, 4) for key, value in val_scores(work_dir / "model" / "best", manifest, root, None).items()
        }
        for mode in also_score:
            if mode != config.inference.mode:
                scores = val_scores(work_dir / "model" / "best", manifest, root, mode)
                record[f"as_{mode}"] = {key: round(value, 4) for key, value in scores.items()}
    print(f"[{name}] {json.dumps(record)}", flush=True)
    return record


def markdown(document: dict[str, Any]) -> str:
    records = document["records"]
    settings = {
        "epochs": records[0]["shared"]["train.epochs"] if records else "?",
        "shared": records[0]["shared"] if records else {},
        "variants": document["variants"],
    }
    lines = [
        "# Ablation on the real val split",
        "",
        "Generated by `scripts/ablate_real.py` (val only; the test split is not read). Each variant trains",
        f"from scratch with a short schedule ({settings['epochs']} epochs max) on the real train split and is",
        "scored on val at threshold 0.5 through the pipeline's inference path. Shared overrides:",
        f"`{json.dumps(settings['shared'])}`.",
        "",
        "| variant | overrides | inference | val mIoU cracks | val mIoU taping | val mIoU all | best epoch | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        overrides = json.dumps(settings["variants"][record["variant"]]) or "{}"
        lines.append(
            f"| {record['variant']} | `{overrides}` | {record['inference_mode']} | {record.get('val.cracks.miou', '')} "
            f"| {record.get('val.taping.miou', '')} | {record['val.all.miou']} | {record['best_epoch']} "
            f"| {record['train_seconds']:.0f} |"
        )
        for key, scores in record.items():
            if key.startswith("as_"):
                lines.append(
                    f"| {record['variant']}, scored as {key[3:]} | (same checkpoint) | {key[3:]} "
                    f"| {scores.get('val.cracks.miou', '')} | {scores.get('val.taping.miou', '')} "
                    f"| {scores['val.all.miou']} | | |"
                )
    if document.get("full_runs"):
        lines += [
            "",
            "## Full-length real runs, on val",
            "",
            "The complete pipeline (`scripts/run_real.sh` and its native-scale variant), val mIoU at the",
            "thresholds evaluation chose on val. This is what decided the recipe of `run_real.sh`.",
            "",
            "| run | inference | epochs | train s | val mIoU cracks | val mIoU taping | val mIoU all | snapped to boxes (val-chosen) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in document["full_runs"]:
            unsnapped = [
                f"{dataset} without: {run[key]}"
                for dataset in ("cracks", "taping")
                if (key := f"val.{dataset}.miou_unsnapped") in run
            ]
            snapping = ", ".join(f"`{p}`" for p in run.get("boxed", [])) or "none"
            if unsnapped:
                snapping += f" ({'; '.join(unsnapped)})"
            lines.append(
                f"| {run['name']} (`{run['folder']}`) | {run['inference_mode']} | {run['epochs_run']} "
                f"| {run['train_seconds']:.0f} | {run['val.cracks.miou']} | {run['val.taping.miou']} "
                f"| {run['val.all.miou']} | {snapping if 'boxed' in run else 'not tried'} |"
            )
    for record in document.get("scored", []):
        lines += [
            "",
            f"## The final checkpoint ({record['variant']}), scored on val",
            "",
            "The full-length run's best checkpoint, scored on val without retraining: its own inference mode, the",
            "other modes, and taping masks with each predicted component snapped to its bounding rectangle",
            "(the taping ground truth is boxes). Threshold 0.5.",
            "",
            "| scoring | val mIoU cracks | val mIoU taping | val mIoU all |",
            "|---|---|---|---|",
            f"| as trained | {record.get('val.cracks.miou', '')} | {record.get('val.taping.miou', '')} | {record['val.all.miou']} |",
            f"| taping snapped to boxes | {record.get('val.cracks.miou', '')} | {record.get('val.taping_snapped.miou', '')} | |",
        ]
        for key, scores in record.items():
            if key.startswith("as_"):
                lines.append(
                    f"| as {key[3:]} | {scores.get('val.cracks.miou', '')} | {scores.get('val.taping.miou', '')} "
                    f"| {scores['val.all.miou']} |"
                )
    lines += stopped_runs_markdown(document.get("stopped_runs", []))
    lines += views_markdown(document.get("views", []))
    return "\n".join(lines) + "\n"


def score_views(args: argparse.Namespace) -> int:
    checkpoint_name = parse_variant(args.variant[0])[0]
    thresholds = load_params(args.params)["evaluate"]["thresholds"]
    out_file = args.out / "ablation.json"
    document = json.loads(out_file.read_text()) if out_file.is_file() else {"records": [], "variants": {}}
    rows = [row for row in document.get("views", []) if row["checkpoint"] != checkpoint_name]
    for text in args.score_views:
        name, views = parse_variant(text)
        record = views_scores(args.score_checkpoint, args.manifest, args.root, views, thresholds)
        rows.append(
            {"checkpoint": checkpoint_name, "folder": str(args.score_checkpoint), "name": name, "views": views} | record
        )
        print(json.dumps(rows[-1]), flush=True)
        document["views"] = rows
        write_json_atomic(out_file, document)
        write_text_atomic(args.out / "ablation.md", markdown(document))
    return 0


def views_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows):
        lines += [
            "",
            f"## Test-time views on the {checkpoint} checkpoint, on val",
            "",
            "One trained checkpoint scored on val with other `inference.flips` / `inference.sizes` (no retraining):",
            "each dataset at its best val threshold, with or without box snapping (the rule column). The val",
            "seconds show the cost of the extra vision passes.",
            "",
            "| views | flips | sizes | val mIoU cracks | rule | val mIoU taping | rule | val s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["checkpoint"] == checkpoint):
            flips = ", ".join(row["views"].get("flips", [])) or "none"
            sizes = ", ".join(str(v) for v in row["views"].get("sizes", [])) or "input size"
            lines.append(
                f"| {row['name']} | {flips} | {sizes} | {row.get('val.cracks.miou', '')} | {row.get('val.cracks.rule', '')} "
                f"| {row.get('val.taping.miou', '')} | {row.get('val.taping.rule', '')} | {row['val_seconds']:.0f} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="folder the manifest's paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--epochs", type=int, help="max epochs of each trained variant (training mode only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="override for every variant")
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=JSON overrides to train, or the scored checkpoint's name"
    )
    parser.add_argument("--also-score", action="append", default=[], choices=["resize", "whole", "sliding"])
    parser.add_argument("--out", type=Path, required=True, help="folder for ablation.json / ablation.md")
    parser.add_argument(
        "--score-checkpoint",
        type=Path,
        metavar="DIR",
        help="score this trained checkpoint on val (its own mode, --also-score modes, taping "
        "snapped to boxes) as variant --variant, without training",
    )
    parser.add_argument(
        "--score-views",
        action="append",
        default=[],
        metavar='NAME={"flips": [...], "sizes": [...]}',
        help="with --score-checkpoint: score it on val with these test-time views instead (thresholds and "
        "box snapping chosen on val per dataset)",
    )
    parser.add_argument(
        "--full-run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="add a finished real run's val scores (DIR holds its eval.json and train.json)",
    )
    parser.add_argument(
        "--stopped-run",
        action="append",
        default=[],
        metavar="NAME=HISTORY_CSV",
        help="add a real run stopped early (its train_history.csv), compared per epoch with --reference-history",
    )
    parser.add_argument(
        "--reference-history",
        type=Path,
        metavar="CSV",
        help="with --stopped-run: the run to compare with (default: OUT/train_history.csv, the recipe's)",
    )
    args = parser.parse_args()
    adding = bool(args.full_run or args.stopped_run)
    if not adding and not args.variant:
        parser.error("--variant is required (a variant to train, or the name of the --score-checkpoint)")
    if not adding and not args.score_checkpoint and args.epochs is None:
        parser.error("--epochs is required to train variants")
    if adding:
        return add_runs(args)
    if args.score_checkpoint and args.score_views:
        return score_views(args)
    if args.score_checkpoint:
        name = parse_variant(args.variant[0])[0]
        record = {"variant": name, "checkpoint": str(args.score_checkpoint)}
        record |= {
            k: round(v, 4)
            for k, v in val_scores(args.score_checkpoint, args.manifest, args.root, None, ("taping",)).items()
        }
        for mode in args.also_score:
            record[f"as_{mode}"] = {
                k: round(v, 4) for k, v in val_scores(args.score_checkpoint, args.manifest, args.root, mode).items()
            }
        args.out.mkdir(parents=True, exist_ok=True)
        out_file = args.out / "ablation.json"
        previous = json.loads(out_file.read_text()) if out_file.is_file() else {"records": [], "variants": {}}
        previous["scored"] = [r for r in previous.get("scored", []) if r["variant"] != name] + [record]
        write_json_atomic(out_file, previous)
        write_text_atomic(args.out / "ablation.md", markdown(previous))
        print(json.dumps(record))
        return 0

    base = load_params(args.params)
    shared: dict[str, Any] = {"train.epochs": args.epochs}
    for item in args.set:
        key, _, value = item.partition("=")
        shared[key] = YAML(typ="safe", pure=True).load(value)  # YAML 1.2, as params.yaml is read
    out_file = args.out / "ablation.json"
    previous = json.loads(out_file.read_text()) if out_file.is_file() else {"records": [], "variants": {}}
    records = list(previous["records"])
    variants = dict(previous.get("variants", {}))
    args.out.mkdir(parents=True, exist_ok=True)
    for text in args.variant:
        name, overrides = parse_variant(text)
        params = copy.deepcopy(base)
        for key, value in {**shared, **overrides}.items():
            set_dotted(params, key, value)
        record = run_variant(name, params, args.manifest, args.root, args.also_score, args.out)
        record["shared"] = shared
        records = [r for r in records if r["variant"] != name] + [record]
        variants[name] = overrides
        previous |= {"records": records, "variants": variants}
        write_json_atomic(out_file, previous)
        write_text_atomic(args.out / "ablation.md", markdown(previous))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
