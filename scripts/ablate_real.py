"""Ablation of the real-data recipe on val only, one subcommand a mode; each writes its record into
`OUT/ablation.json` and regenerates `OUT/ablation.md`. The test split is never read here.

    python scripts/ablate_real.py train --manifest /tmp/real/data/manifest.csv --root /tmp/real \\
        --out metrics/real --epochs 8 --variant baseline --variant crop='{"inference.mode": "whole"}'
    python scripts/ablate_real.py compare --manifest ... --root ... A_CHECKPOINT B_CHECKPOINT

- `train`: train each variant (`name`: params.yaml as it is plus the `--set` overrides shared by all
  variants; `name=<JSON of dotted params overrides>`), score its best checkpoint on val, and keep its
  per-epoch history and per-pair val IoU (`OUT/<name>.history.csv`, `OUT/<name>.val_pairs.csv`) with
  its record. Every variant but the baseline (`--baseline`, default the first `--variant`) records
  its paired difference from the baseline. `--also-score mode` scores each checkpoint once more with
  another inference mode (no retraining).
- `score`: score a trained checkpoint on val (its own mode and `--also-score` modes).
- `views`: score a trained checkpoint on val with other test-time views (`inference.flips/sizes`).
- `compare`: score two checkpoints on the same val images; per dataset, each one's mIoU and their
  difference with its 95% paired bootstrap interval over source photos.
- `snaps`: score one checkpoint on val as evaluation chooses its rules under candidate sets of mask
  snaps (`--candidate boxes=boxes --candidate arms=boxes,arms`), each paired with the first (or `--baseline`).
- `full-run` / `stopped-run`: add a finished real run's record (its eval.json, train.json and history)
  or a run stopped early, compared per epoch with the reference run.

Scoring is evaluation's own (`drywall_qa.evaluate`): per prompt, the threshold of
`evaluate.thresholds` and, with `evaluate.box_snapping`, the box snapping with the highest val mIoU,
ties broken as evaluation breaks them. A dataset's val mIoU is the mean over its (image, prompt) pairs.
Intervals resample source photos (the manifest's `group`), seeded (`drywall_qa.intervals`): a lever
is kept when its interval says it helps, or it is neutral and cheaper.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from drywall_qa.contracts.atomic import write_csv_atomic, write_json_atomic, write_text_atomic
from drywall_qa.intervals import RESAMPLES, SEED, paired_group_bootstrap, verdict
from drywall_qa.params import load_params

PAIR_COLUMNS = ["image_id", "dataset", "prompt", "group", "iou"]
DATASETS = ("cracks", "taping")  # the table columns; records keep every dataset they scored


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    node = params
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, overrides = text.partition("=")
    return name, (json.loads(overrides) if overrides else {})


# ---------------------------------------------------------------- scoring on val, as evaluation does


@dataclasses.dataclass
class ValScoring:
    """A checkpoint's val pairs at evaluation's val-chosen rules, the rules, and the seconds it took."""

    pairs: list[dict[str, Any]]  # PAIR_COLUMNS
    rules: dict[str, str]  # prompt -> "0.4" or "0.4 + boxes"
    seconds: float

    def record(self) -> dict[str, Any]:
        """val.<dataset>.miou and .rule (its prompts' rules), val.all.miou, val_seconds."""
        record: dict[str, Any] = {}
        for dataset in sorted({pair["dataset"] for pair in self.pairs}):
            values = [pair["iou"] for pair in self.pairs if pair["dataset"] == dataset]
            prompts = dict.fromkeys(pair["prompt"] for pair in self.pairs if pair["dataset"] == dataset)
            record[f"val.{dataset}.miou"] = round(sum(values) / len(values), 4)
            record[f"val.{dataset}.rule"] = ", ".join(dict.fromkeys(self.rules[p] for p in prompts))
        record["val.all.miou"] = round(sum(pair["iou"] for pair in self.pairs) / len(self.pairs), 4)
        record["val.rules"] = dict(self.rules)
        record["val_seconds"] = round(self.seconds, 1)
        return record


Adjust = Callable[[Any], Any]  # InferenceConfig -> InferenceConfig


def as_mode(mode: str) -> Adjust:
    """Score in inference `mode` (`sizes` apply to resize only)."""
    return lambda config: dataclasses.replace(config, mode=mode, sizes=config.sizes if mode == "resize" else ())


def with_views(views: dict[str, Any]) -> Adjust:
    """Score with the test-time views `{"flips": [...], "sizes": [...]}` instead of the checkpoint's."""
    return lambda config: dataclasses.replace(
        config, flips=tuple(views.get("flips", ())), sizes=tuple(views.get("sizes", ()))
    )


def score_val(
    model_dir: Path, manifest_path: Path, root: Path, params: dict[str, Any], adjust: Adjust | None = None
) -> ValScoring:
    """Val pairs of the checkpoint in `model_dir` (its inference setting changed by `adjust`), each
    prompt at the rule evaluation chooses on val with `params` (`evaluate.thresholds`, `.box_snapping`)."""
    sweep = val_sweep(model_dir, manifest_path, root, params, adjust)
    return sweep.scoring(tuple(params["evaluate"]["box_snapping"]))


@dataclasses.dataclass
class ValSweep:
    """A checkpoint's val pixel counts at every threshold and snap (`evaluate.sweep_thresholds`)."""

    counts: dict[tuple[str, str | None], list[list[Any]]]
    thresholds: tuple[float, ...]
    val: list[Any]  # the val ImageRecords, in the sweep's order
    groups: dict[tuple[str, str], str]
    seconds: float

    def scoring(self, snaps: Sequence[str]) -> ValScoring:
        """The val pairs at the rules evaluation chooses when val may snap only the ways of `snaps`."""
        from drywall_qa.evaluate import choose_thresholds, val_pairs_at

        missing = [snap for snap in snaps if not any(key[1] == snap for key in self.counts)]
        if missing:
            raise SystemExit(f"the sweep has no counts snapped as {missing}")
        allowed = {key: counts for key, counts in self.counts.items() if key[1] is None or key[1] in snaps}
        chosen, boxed, _ = choose_thresholds(allowed, self.thresholds)
        pairs = [
            {
                "image_id": pair["image_id"],
                "dataset": pair["dataset"],
                "prompt": pair["prompt"],
                "group": self.groups[(pair["dataset"], pair["image_id"])],
                "iou": pair["iou"],
            }
            for pair in val_pairs_at(allowed, chosen, boxed, self.thresholds, self.val)
        ]
        rules = {
            prompt: f"{threshold:g}" + (f" + {boxed[prompt]}" if prompt in boxed else "")
            for prompt, threshold in chosen.items()
        }
        return ValScoring(pairs, rules, self.seconds)


def val_sweep(
    model_dir: Path,
    manifest_path: Path,
    root: Path,
    params: dict[str, Any],
    adjust: Adjust | None = None,
    snaps: Sequence[str] | None = None,
) -> ValSweep:
    """The checkpoint's val sweep (its inference setting changed by `adjust`) at `evaluate.thresholds`,
    snapped each way of `snaps` (default `evaluate.box_snapping`)."""
    import functools

    from drywall_qa.contracts.manifest import image_records, read_manifest
    from drywall_qa.evaluate import EvaluateSettings, manifest_groups, sweep_thresholds
    from drywall_qa.inference import InferenceConfig, predict_probs, select_device
    from drywall_qa.model import load_model

    settings = EvaluateSettings.from_params(params)
    model, processor = load_model(model_dir)
    if adjust is not None:
        adjust(InferenceConfig.of(model)).attach(model)
    device = select_device(None)
    predict_fn = functools.partial(predict_probs, model, processor, device=device, batch_size=settings.batch_size)
    rows = read_manifest(manifest_path)
    val, groups = image_records(rows, "val", root), manifest_groups(rows)
    started = time.perf_counter()
    snaps = settings.snaps if snaps is None else tuple(snaps)
    counts = sweep_thresholds(predict_fn, val, settings.thresholds, settings.batch_size, snaps)
    return ValSweep(counts, settings.thresholds, val, groups, time.perf_counter() - started)


# ---------------------------------------------------------------- paired comparison


def write_pairs(path: Path, pairs: Sequence[dict[str, Any]]) -> None:
    write_csv_atomic(path, PAIR_COLUMNS, ({**pair, "iou": round(pair["iou"], 6)} for pair in pairs))


def read_pairs(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return [{**row, "iou": float(row["iou"])} for row in csv.DictReader(handle)]


def paired_differences(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, dict[str, Any]]:
    """Per dataset and over all pairs: the mIoU of `a` and of `b` on the same (image, prompt) pairs,
    a - b, its 95% paired bootstrap interval over source photos, and the verdict (helps / neutral / hurts)."""
    keyed_a = {(p["dataset"], p["image_id"], p["prompt"]): p for p in a}
    keyed_b = {(p["dataset"], p["image_id"], p["prompt"]): p for p in b}
    if set(keyed_a) != set(keyed_b):
        raise SystemExit(f"the two scorings differ in pairs: {len(set(keyed_a) ^ set(keyed_b))} not in both")
    keys = sorted(keyed_a)
    result = {}
    for dataset in [*sorted({key[0] for key in keys}), "all"]:
        subset = [key for key in keys if dataset in ("all", key[0])]
        scores_a = [keyed_a[key]["iou"] for key in subset]
        scores_b = [keyed_b[key]["iou"] for key in subset]
        groups = [f"{key[0]}/{keyed_a[key]['group']}" for key in subset]
        interval = paired_group_bootstrap(scores_a, scores_b, groups, resamples, seed)
        result[dataset] = {
            "a": round(sum(scores_a) / len(subset), 4),
            "b": round(sum(scores_b) / len(subset), 4),
            "difference": round(interval.mean, 4),
            "ci_low": round(interval.low, 4),
            "ci_high": round(interval.high, 4),
            "verdict": verdict(interval),
            "groups": interval.groups,
            "pairs": len(subset),
        }
    return result


def lever_decision(
    differences: dict[str, dict[str, Any]], seconds: float | None, baseline_seconds: float | None
) -> str:
    """Keep a lever when its paired intervals say it helps (on a dataset, hurting none), or it is
    neutral on every dataset and cheaper; `differences` is `paired_differences`' per dataset."""
    verdicts = {entry["verdict"] for dataset, entry in differences.items() if dataset != "all"}
    if "hurts" in verdicts:
        return "drop"
    if "helps" in verdicts:
        return "keep"
    if seconds is None or baseline_seconds is None:
        return "neutral"
    return "keep (neutral, cheaper)" if seconds < baseline_seconds else "drop (neutral, not cheaper)"


# ---------------------------------------------------------------- records


def history_rows(path: Path) -> list[dict[str, float]]:
    """A train_history.csv as numbers, one dict per epoch."""
    with open(path, newline="") as handle:
        rows = [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]
    return [row | {"epoch": int(row["epoch"])} if "epoch" in row else row for row in rows]


def load_document(out: Path) -> dict[str, Any]:
    out_file = out / "ablation.json"
    return json.loads(out_file.read_text()) if out_file.is_file() else {"records": [], "variants": {}}


def save_document(out: Path, document: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "ablation.json", document)
    write_text_atomic(out / "ablation.md", markdown(document))


def full_run_record(name: str, folder: Path, prompts: dict[str, list[str]]) -> dict[str, Any]:
    """Val mIoU per dataset (at the val-chosen thresholds), wall time and history of a finished real run."""
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
    boxed = [p for ps in prompts.values() for p in ps if evaluation.get(f"boxes.{prompt_slug(p)}") == 1]
    if boxed and (folder / "threshold_sweep.csv").is_file():
        record |= unsnapped_scores(folder / "threshold_sweep.csv", prompts, boxed)
    if any(key.startswith("boxes.") for key in evaluation):  # runs before box snapping existed did not try it
        record["boxed"] = boxed
    if (folder / "train_history.csv").is_file():
        record["history"] = history_rows(folder / "train_history.csv")
    return record


def unsnapped_scores(sweep_file: Path, prompts: dict[str, list[str]], boxed: list[str]) -> dict[str, float]:
    """The same run without snapping: each prompt's best unsnapped threshold on val (the sweep table)."""
    best: dict[str, float] = {}
    with open(sweep_file, newline="") as handle:
        for row in csv.DictReader(handle):
            best[row["prompt"]] = max(best.get(row["prompt"], 0.0), float(row["val_miou"]))
    record = {}
    for dataset, dataset_prompts in prompts.items():
        if any(p in boxed for p in dataset_prompts):
            values = [best[p] for p in dataset_prompts]
            record[f"val.{dataset}.miou_unsnapped"] = round(sum(values) / len(values), 4)
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


# ---------------------------------------------------------------- the subcommands


def trainer() -> tuple[Any, Callable[..., dict[str, Any]]]:
    """(TrainConfig, train) from wherever the training package keeps them."""
    from drywall_qa.training.config import TrainConfig
    from drywall_qa.training.loop import train

    return TrainConfig, train


def run_variant(name: str, params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant, score its best checkpoint on val, and return its record; its history and
    val pairs are written next to ablation.json."""
    train_config, train = trainer()
    config = train_config.from_params(params)
    history_file, pairs_file = args.out / f"{name}.history.csv", args.out / f"{name}.val_pairs.csv"
    with tempfile.TemporaryDirectory(prefix=f"ablate-{name}-") as work:
        best = Path(work) / "model" / "best"
        started = time.perf_counter()
        summary = train(
            config,
            manifest_path=args.manifest,
            output_dir=Path(work) / "model",
            metrics_path=Path(work) / "train.json",
            history_path=history_file,
            root=args.root,
            progress=False,
            log=lambda line: print(f"[{name}] {line}", flush=True),
        )
        record = {
            "variant": name,
            "train_seconds": round(time.perf_counter() - started, 1),
            "epochs_run": summary["epochs_run"],
            "best_epoch": summary["best_epoch"],
            "inference_mode": config.inference.mode,
            "params": summary["params"],
        }
        scoring = score_val(best, args.manifest, args.root, params)
        record |= scoring.record()
        for mode in args.also_score:
            if mode != config.inference.mode:
                record[f"as_{mode}"] = score_val(best, args.manifest, args.root, params, as_mode(mode)).record()
    write_pairs(pairs_file, scoring.pairs)
    record |= {"val_pairs_file": str(pairs_file), "history_file": str(history_file)}
    record["history"] = history_rows(history_file)
    print(f"[{name}] {json.dumps({k: v for k, v in record.items() if k != 'history'})}", flush=True)
    return record


def against_baseline(record: dict[str, Any], baseline: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The record's paired difference from the baseline variant's val pairs, per dataset and overall."""
    differences = paired_differences(
        read_pairs(Path(record["val_pairs_file"])),
        read_pairs(Path(baseline["val_pairs_file"])),
        args.resamples,
        args.seed,
    )
    decision = lever_decision(differences, record.get("train_seconds"), baseline.get("train_seconds"))
    return {"baseline": baseline["variant"], "decision": decision, "seed": args.seed} | differences


def cmd_train(args: argparse.Namespace) -> int:
    base = load_params(args.params)
    shared: dict[str, Any] = {"train.epochs": args.epochs}
    for item in args.set:
        key, _, value = item.partition("=")
        shared[key] = YAML(typ="safe", pure=True).load(value)  # YAML 1.2, as params.yaml is read
    document = load_document(args.out)
    variants = [parse_variant(text) for text in args.variant]
    baseline_name = args.baseline or variants[0][0]
    for name, overrides in variants:
        params = copy.deepcopy(base)
        for key, value in {**shared, **overrides}.items():
            set_dotted(params, key, value)
        args.out.mkdir(parents=True, exist_ok=True)
        record = run_variant(name, params, args) | {"shared": shared}
        baseline = next((r for r in document["records"] if r["variant"] == baseline_name), None)
        if name != baseline_name and baseline is not None and "val_pairs_file" in baseline:
            record["vs_baseline"] = against_baseline(record, baseline, args)
        document["records"] = [r for r in document["records"] if r["variant"] != name] + [record]
        document["variants"] = {**document.get("variants", {}), name: overrides}
        save_document(args.out, document)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    record = {"variant": args.name, "checkpoint": str(args.checkpoint)}
    record |= score_val(args.checkpoint, args.manifest, args.root, params).record()
    for mode in args.also_score:
        record[f"as_{mode}"] = score_val(args.checkpoint, args.manifest, args.root, params, as_mode(mode)).record()
    document = load_document(args.out)
    document["scored"] = [r for r in document.get("scored", []) if r["variant"] != args.name] + [record]
    save_document(args.out, document)
    print(json.dumps(record))
    return 0


def cmd_views(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    document = load_document(args.out)
    rows = [row for row in document.get("views", []) if row["checkpoint"] != args.name]
    for text in args.view:
        name, views = parse_variant(text)
        record = score_val(args.checkpoint, args.manifest, args.root, params, with_views(views)).record()
        rows.append({"checkpoint": args.name, "folder": str(args.checkpoint), "name": name, "views": views} | record)
        print(json.dumps(rows[-1]), flush=True)
        document["views"] = rows
        save_document(args.out, document)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    names = args.names or [str(args.a), str(args.b)]
    scorings = [score_val(folder, args.manifest, args.root, params) for folder in (args.a, args.b)]
    comparison = {
        "a": names[0],
        "b": names[1],
        "folders": [str(args.a), str(args.b)],
        "rules": [scoring.rules for scoring in scorings],
        "resamples": args.resamples,
        "seed": args.seed,
        "datasets": paired_differences(scorings[0].pairs, scorings[1].pairs, args.resamples, args.seed),
    }
    print(json.dumps(comparison, indent=2))
    if args.out is not None:
        document = load_document(args.out)
        kept = [c for c in document.get("comparisons", []) if (c["a"], c["b"]) != (names[0], names[1])]
        document["comparisons"] = [*kept, comparison]
        save_document(args.out, document)
    return 0


def cmd_snaps(args: argparse.Namespace) -> int:
    """One checkpoint's val probabilities, scored as evaluation chooses its rules under each candidate
    set of snaps; every set is compared with the baseline set on the same val pairs."""
    params = load_params(args.params)
    candidates = [parse_snaps(text) for text in args.candidates]
    every = tuple(dict.fromkeys(snap for _, snaps in candidates for snap in snaps))
    sweep = val_sweep(args.checkpoint, args.manifest, args.root, params, snaps=every)
    scorings = {name: sweep.scoring(snaps) for name, snaps in candidates}
    baseline = args.baseline or candidates[0][0]
    if baseline not in scorings:
        raise SystemExit(f"--baseline {baseline!r} is not one of the candidates {list(scorings)}")
    rows = []
    for name, snaps in candidates:
        row = {"checkpoint": args.name, "folder": str(args.checkpoint), "name": name, "snaps": list(snaps)}
        row |= scorings[name].record() | {"val_seconds": round(sweep.seconds, 1)}
        if name != baseline:
            differences = paired_differences(scorings[name].pairs, scorings[baseline].pairs, args.resamples, args.seed)
            row["vs_baseline"] = {"baseline": baseline, "seed": args.seed} | differences
        rows.append(row)
        print(json.dumps(row), flush=True)
    document = load_document(args.out)
    kept = [row for row in document.get("snaps", []) if row["checkpoint"] != args.name]
    document["snaps"] = kept + rows
    save_document(args.out, document)
    return 0


def parse_snaps(text: str) -> tuple[str, tuple[str, ...]]:
    """`NAME=SNAP,SNAP` (or `NAME=` for none) -> (name, snaps), each one of `contracts.mask_rule.SNAPS`."""
    from drywall_qa.contracts.mask_rule import SNAPS

    name, _, listed = text.partition("=")
    snaps = tuple(snap for snap in listed.split(",") if snap)
    unknown = [snap for snap in snaps if snap not in SNAPS]
    if unknown or not name:
        raise SystemExit(f"a candidate is NAME=SNAP,... with snaps among {list(SNAPS)}; got {text!r}")
    return name, snaps


def cmd_full_run(args: argparse.Namespace) -> int:
    document = load_document(args.out)
    runs = {run["name"]: run for run in document.get("full_runs", [])}
    for text in args.runs:
        name, _, folder = text.partition("=")
        runs[name] = full_run_record(name, Path(folder), load_params(args.params)["prompts"])
    document["full_runs"] = list(runs.values())
    save_document(args.out, document)
    return 0


def cmd_stopped_run(args: argparse.Namespace) -> int:
    document = load_document(args.out)
    stopped = {run["name"]: run for run in document.get("stopped_runs", [])}
    for text in args.runs:
        name, _, history = text.partition("=")
        stopped[name] = stopped_run_record(
            name, Path(history), args.reference_history or args.out / "train_history.csv"
        )
    document["stopped_runs"] = list(stopped.values())
    save_document(args.out, document)
    return 0


# ---------------------------------------------------------------- ablation.md


def _miou(scores: dict[str, Any], dataset: str) -> Any:
    return scores.get(f"val.{dataset}.miou", "")


def _rules(scores: dict[str, Any]) -> str:
    """The val-chosen rule per dataset, or the fixed threshold of records scored before."""
    if "val.rules" not in scores:
        return "0.5 (fixed)"
    return "; ".join(f"{d} {scores[f'val.{d}.rule']}" for d in DATASETS if f"val.{d}.rule" in scores)


def records_markdown(document: dict[str, Any]) -> list[str]:
    records = document["records"]
    shared = records[0]["shared"] if records else {}
    title = ["# Ablation on the real val split", ""]
    if not records:  # a record of scorings only (e.g. `snaps`)
        return [*title, "Generated by `scripts/ablate_real.py` (val only; the test split is not read)."]
    lines = [
        *title,
        "Generated by `scripts/ablate_real.py` (val only; the test split is not read). Each variant trains",
        f"from scratch with a short schedule ({shared.get('train.epochs', '?')} epochs max) on the real train split "
        "and is scored on val",
        "through the pipeline's inference path, each prompt at the rule evaluation chooses on val (its threshold",
        "and box snapping; records made before: threshold 0.5, `0.5 (fixed)`). Shared overrides:",
        f"`{json.dumps(shared)}`.",
        "",
        "| variant | overrides | inference | val mIoU cracks | val mIoU taping | val mIoU all | best epoch | train s "
        "| val rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        overrides = json.dumps(document["variants"][record["variant"]]) or "{}"
        lines.append(
            f"| {record['variant']} | `{overrides}` | {record['inference_mode']} | {_miou(record, 'cracks')} "
            f"| {_miou(record, 'taping')} | {record['val.all.miou']} | {record['best_epoch']} "
            f"| {record['train_seconds']:.0f} | {_rules(record)} |"
        )
        for key, scores in record.items():
            if key.startswith("as_"):
                lines.append(
                    f"| {record['variant']}, scored as {key[3:]} | (same checkpoint) | {key[3:]} "
                    f"| {_miou(scores, 'cracks')} | {_miou(scores, 'taping')} | {scores['val.all.miou']} | | "
                    f"| {_rules(scores)} |"
                )
    return lines + baseline_markdown(records)


def _difference(entry: dict[str, Any]) -> str:
    return f"{entry['difference']:+.4f} [{entry['ci_low']:+.4f}, {entry['ci_high']:+.4f}] {entry['verdict']}"


def baseline_markdown(records: list[dict[str, Any]]) -> list[str]:
    compared = [record for record in records if "vs_baseline" in record]
    if not compared:
        return []
    lines = [
        "",
        "## Each variant against the baseline, paired on the same val pairs",
        "",
        "val mIoU difference (variant - baseline) and its 95% paired bootstrap interval, resampling source",
        "photos; a lever is kept when it helps on a dataset and hurts on none, or it is neutral on every dataset",
        "and trains in less time.",
        "",
        "| variant | baseline | cracks | taping | all | decision |",
        "|---|---|---|---|---|---|",
    ]
    for record in compared:
        vs = record["vs_baseline"]
        cells = [_difference(vs[d]) if d in vs else "" for d in (*DATASETS, "all")]
        lines.append(f"| {record['variant']} | {vs['baseline']} | {' | '.join(cells)} | {vs['decision']} |")
    return lines


def comparisons_markdown(comparisons: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for comparison in comparisons:
        lines += [
            "",
            f"## {comparison['a']} against {comparison['b']}, paired on the same val pairs",
            "",
            f"Each at its own val-chosen rules; the interval resamples source photos ({comparison['resamples']} "
            f"resamples, seed {comparison['seed']}).",
            "",
            f"| dataset | {comparison['a']} | {comparison['b']} | difference [95% interval] | photos | pairs |",
            "|---|---|---|---|---|---|",
        ]
        for dataset, entry in comparison["datasets"].items():
            lines.append(
                f"| {dataset} | {entry['a']} | {entry['b']} | {_difference(entry)} | {entry['groups']} "
                f"| {entry['pairs']} |"
            )
    return lines


def snaps_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "## Mask rules on trained checkpoints, on val",
        "",
        "One checkpoint's val probabilities scored as evaluation chooses each prompt's rule (threshold, "
        "and whether and how its mask snaps to boxes) when val may choose only the listed snaps: `boxes`, each "
        "component's bounding box; `arms`, a box per straight horizontal or vertical arm at least 0.2 of the "
        "photo's shorter side long, other foreground dropped (`contracts/mask_rule.py`). Differences are paired "
        "on the same val pairs, with a 95% bootstrap interval over source photos. The rule sets cost nothing "
        "in training; `val s` is the scoring's time with every snap swept.",
        "",
        "| checkpoint | snaps val may choose | val mIoU cracks | rule | val mIoU taping | rule | vs | "
        "cracks difference | taping difference | val s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        versus = row.get("vs_baseline", {})
        lines.append(
            f"| {row['checkpoint']} | {row['name']} (`{', '.join(row['snaps']) or 'none'}`) "
            f"| {_miou(row, 'cracks')} | {row.get('val.cracks.rule', '')} "
            f"| {_miou(row, 'taping')} | {row.get('val.taping.rule', '')} | {versus.get('baseline', '')} "
            f"| {_difference(versus['cracks']) if 'cracks' in versus else ''} "
            f"| {_difference(versus['taping']) if 'taping' in versus else ''} | {row['val_seconds']} |"
        )
    return lines


def full_runs_markdown(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Full-length real runs, on val",
        "",
        "The complete pipeline (`scripts/run_real.sh` and its native-scale variant), val mIoU at the",
        "thresholds evaluation chose on val. This is what decided the recipe of `run_real.sh`.",
        "",
        "| run | inference | epochs | train s | val mIoU cracks | val mIoU taping | val mIoU all "
        "| snapped to boxes (val-chosen) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        unsnapped = [
            f"{dataset} without: {run[key]}" for dataset in DATASETS if (key := f"val.{dataset}.miou_unsnapped") in run
        ]
        snapping = ", ".join(f"`{p}`" for p in run.get("boxed", [])) or "none"
        if unsnapped:
            snapping += f" ({'; '.join(unsnapped)})"
        lines.append(
            f"| {run['name']} (`{run['folder']}`) | {run['inference_mode']} | {run['epochs_run']} "
            f"| {run['train_seconds']:.0f} | {run['val.cracks.miou']} | {run['val.taping.miou']} "
            f"| {run['val.all.miou']} | {snapping if 'boxed' in run else 'not tried'} |"
        )
    return lines


def scored_markdown(record: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## The final checkpoint ({record['variant']}), scored on val",
        "",
        "The full-length run's best checkpoint, scored on val without retraining: its own inference mode and",
        "the other modes. Records before the scoring reused evaluation's rules were scored at threshold 0.5,",
        "with taping masks also snapped to boxes (the taping ground truth is boxes).",
        "",
        "| scoring | val mIoU cracks | val mIoU taping | val mIoU all | val rule |",
        "|---|---|---|---|---|",
        f"| as trained | {_miou(record, 'cracks')} | {_miou(record, 'taping')} | {record['val.all.miou']} "
        f"| {_rules(record)} |",
    ]
    if "val.taping_snapped.miou" in record:
        lines.append(
            f"| taping snapped to boxes | {_miou(record, 'cracks')} | {record['val.taping_snapped.miou']} | | |"
        )
    for key, scores in record.items():
        if key.startswith("as_"):
            lines.append(
                f"| as {key[3:]} | {_miou(scores, 'cracks')} | {_miou(scores, 'taping')} "
                f"| {scores['val.all.miou']} | {_rules(scores)} |"
            )
    return lines


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


def views_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows):
        lines += [
            "",
            f"## Test-time views on the {checkpoint} checkpoint, on val",
            "",
            "One trained checkpoint scored on val with other `inference.flips` / `inference.sizes` (no retraining):",
            "each prompt at its best val threshold, with or without box snapping (the rule column). The val",
            "seconds show the cost of the extra vision passes.",
            "",
            "| views | flips | sizes | val mIoU cracks | rule | val mIoU taping | rule | val s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["checkpoint"] == checkpoint):
            flips = ", ".join(row["views"].get("flips", [])) or "none"
            sizes = ", ".join(str(v) for v in row["views"].get("sizes", [])) or "input size"
            lines.append(
                f"| {row['name']} | {flips} | {sizes} | {_miou(row, 'cracks')} | {row.get('val.cracks.rule', '')} "
                f"| {_miou(row, 'taping')} | {row.get('val.taping.rule', '')} | {row['val_seconds']:.0f} |"
            )
    return lines


def markdown(document: dict[str, Any]) -> str:
    lines = records_markdown(document)
    lines += full_runs_markdown(document.get("full_runs", []))
    for record in document.get("scored", []):
        lines += scored_markdown(record)
    lines += stopped_runs_markdown(document.get("stopped_runs", []))
    lines += views_markdown(document.get("views", []))
    lines += comparisons_markdown(document.get("comparisons", []))
    lines += snaps_markdown(document.get("snaps", []))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def _parents() -> dict[str, argparse.ArgumentParser]:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--manifest", type=Path, required=True)
    data.add_argument("--root", type=Path, required=True, help="folder the manifest's paths are relative to")
    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("--params", type=Path, default=Path("params.yaml"), help="params.yaml (scoring and training)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", type=Path, required=True, help="folder of ablation.json / ablation.md")
    bootstrap = argparse.ArgumentParser(add_help=False)
    bootstrap.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default %(default)s)")
    bootstrap.add_argument("--seed", type=int, default=SEED, help="bootstrap seed (default %(default)s)")
    checkpoint = argparse.ArgumentParser(add_help=False)
    checkpoint.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="a trained model folder")
    checkpoint.add_argument("--name", required=True, help="the checkpoint's name in the record")
    also = argparse.ArgumentParser(add_help=False)
    also.add_argument(
        "--also-score", action="append", default=[], choices=["resize", "whole", "sliding"], help="score once more as"
    )
    return {"data": data, "params": params, "out": out, "bootstrap": bootstrap, "checkpoint": checkpoint, "also": also}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _parents()
    train = commands.add_parser(
        "train", parents=[p["data"], p["params"], p["out"], p["also"], p["bootstrap"]], help="train and score variants"
    )
    train.add_argument("--epochs", type=int, required=True, help="max epochs of each variant")
    train.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="override for every variant")
    train.add_argument("--variant", action="append", required=True, metavar="NAME[=JSON]", help="a variant to train")
    train.add_argument("--baseline", metavar="NAME", help="the variant others are compared with (default: the first)")
    train.set_defaults(run=cmd_train)
    score = commands.add_parser(
        "score", parents=[p["data"], p["params"], p["out"], p["checkpoint"], p["also"]], help="score a checkpoint"
    )
    score.set_defaults(run=cmd_score)
    views = commands.add_parser(
        "views", parents=[p["data"], p["params"], p["out"], p["checkpoint"]], help="score test-time views"
    )
    views.add_argument(
        "--view", action="append", required=True, metavar='NAME={"flips": [...], "sizes": [...]}', help="views"
    )
    views.set_defaults(run=cmd_views)
    compare = commands.add_parser(
        "compare", parents=[p["data"], p["params"], p["bootstrap"]], help="two checkpoints, paired on val"
    )
    compare.add_argument("a", type=Path, metavar="A", help="checkpoint folder")
    compare.add_argument("b", type=Path, metavar="B", help="checkpoint folder compared with (A - B)")
    compare.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), help="their names (default: the folders)")
    compare.add_argument("--out", type=Path, help="also record the comparison in OUT/ablation.json")
    compare.set_defaults(run=cmd_compare)
    snaps = commands.add_parser(
        "snaps",
        parents=[p["data"], p["params"], p["out"], p["checkpoint"], p["bootstrap"]],
        help="a checkpoint's val under candidate sets of mask snaps",
    )
    snaps.add_argument(
        "--candidate", dest="candidates", action="append", required=True, metavar="NAME=SNAP,...", help="a snap set"
    )
    snaps.add_argument("--baseline", metavar="NAME", help="the candidate others are compared with (default: the first)")
    snaps.set_defaults(run=cmd_snaps)
    full = commands.add_parser("full-run", parents=[p["params"], p["out"]], help="add finished real runs")
    full.add_argument("runs", nargs="+", metavar="NAME=DIR", help="DIR holds eval.json, train.json, train_history.csv")
    full.set_defaults(run=cmd_full_run)
    stopped = commands.add_parser("stopped-run", parents=[p["out"]], help="add real runs stopped early")
    stopped.add_argument("runs", nargs="+", metavar="NAME=HISTORY_CSV", help="the stopped run's train_history.csv")
    stopped.add_argument(
        "--reference-history", type=Path, metavar="CSV", help="the run to compare with (default OUT/train_history.csv)"
    )
    stopped.set_defaults(run=cmd_stopped_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
