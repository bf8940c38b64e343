"""Copy the record of a finished `dvc exp run --temp -n <name>` into a folder of the repo.

An experiment run with `--temp` leaves the workspace alone: its git-tracked outputs (metrics/*.json,
plots/*.csv, plots/figures/) are in the experiment's commit (`refs/exps/.../<name>`), and the
stages' MLflow runs (tag `DVC_EXP_NAME=<name>`) hold what git does not: `data/raw/source.json`
(download stage) and each stage's wall time (`stage_seconds`). This script gathers both into `--out`
and rebuilds the report from them with this checkout's report code (so it shows every stage's wall
time, the report stage's included):

    metrics/real/{source,conversion,split,train,eval}.json, eval_per_prompt.csv,
    train_history.csv, stage_seconds.json, report.md, figures/*.jpg

The report's figure links (`../plots/figures/x.png`) are rewritten to `figures/x.png`; only the
figures the report shows are copied, as JPEGs at most `--max-figure-width` pixels wide (the PNGs of
a real run are ~6 MB together; the full-size ones stay in the experiment commit and in MLflow).

Usage: python scripts/collect_experiment.py --name real --out metrics/real [--since <unix seconds>]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from drywall_qa.params import load_params_text
from drywall_qa.report import build_report, load_inputs
from drywall_qa.tracking import configure

GIT_FILES = {  # path in the experiment commit -> file name in --out
    "metrics/conversion.json": "conversion.json",
    "metrics/split.json": "split.json",
    "metrics/train.json": "train.json",
    "metrics/eval.json": "eval.json",
    "metrics/headline.json": "headline.json",  # the next real run's gate baseline (gate.baseline_file)
    "plots/eval_per_prompt.csv": "eval_per_prompt.csv",
    "plots/train_history.csv": "train_history.csv",
    "plots/threshold_sweep.csv": "threshold_sweep.csv",  # val mIoU per threshold, unsnapped (the ablation reads it)
}
STAGES = ("download", "convert", "split", "train", "evaluate", "register", "visualize", "report")
FIGURE_LINK = re.compile(r"\]\(\.\./plots/figures/([^)\s]+)\)")


class CollectError(RuntimeError):
    pass


def git(*args: str) -> bytes:
    result = subprocess.run(["git", *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise CollectError(f"git {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout


def experiment_ref(name: str) -> str:
    """The newest `refs/exps/<baseline>/<name>` ref (`dvc exp run -n <name>` writes one per baseline)."""
    refs = git("for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps/").decode().split()
    matching = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not matching:
        raise CollectError(f"no DVC experiment named {name!r} (git refs/exps/*/{name}); run it first")
    return matching[0]


def stage_runs(name: str, since_ms: int) -> dict[str, mlflow.entities.Run]:
    """The newest MLflow child run of each stage of experiment `name` that started after `since_ms`."""
    experiment_id = configure()
    client = MlflowClient()
    found: dict[str, mlflow.entities.Run] = {}
    for stage in STAGES:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.DVC_EXP_NAME = '{name}' and tags.stage = '{stage}' "
            f"and attributes.start_time >= {since_ms}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise CollectError(f"no MLflow run of stage {stage!r} for experiment {name!r} since {since_ms} ms")
        found[stage] = runs[0]
    return found


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the record from other users
    os.replace(tmp, path)


def small_jpeg(png: bytes, max_width: int) -> bytes:
    """A figure as a JPEG at most `max_width` wide: photo grids shrink ~10x against the PNG."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80, optimize=True)
    return out.getvalue()


def jpeg_name(png_name: str) -> str:
    return str(Path(png_name).with_suffix(".jpg"))


def rebuild_report(ref: str, staging: Path, runs: dict, seconds: dict, tmp: Path) -> str:
    """The report of the experiment, built by this checkout's report code from the experiment's
    record (its params, metrics and figures): the same generator as the report stage, now with every
    stage's wall time, the report stage's included."""
    figures_dir = tmp / "figures"
    figures_dir.mkdir()
    for path in git("ls-tree", "--name-only", f"{ref}:plots/figures").decode().split():
        (figures_dir / path).write_bytes(git("show", f"{ref}:plots/figures/{path}"))
    params = load_params_text(git("show", f"{ref}:params.yaml").decode())
    lock = yaml.safe_load(git("show", f"{ref}:dvc.lock").decode()) or {}
    raw_hash = next(
        (
            out.get("md5")
            for stage in (lock.get("stages") or {}).values()
            for out in stage.get("outs") or []
            if out.get("path") == "data/raw"
        ),
        None,
    )
    inputs = load_inputs(
        source_json=staging / "source.json",
        conversion_json=staging / "conversion.json",
        split_json=staging / "split.json",
        train_json=staging / "train.json",
        eval_json=staging / "eval.json",
        figures_dir=figures_dir,
    )
    mlflow_ids = {
        "pipeline run": runs["report"].data.tags.get("mlflow.parentRunId", "none"),
        "report stage run": runs["report"].info.run_id,
    }
    commit = git("rev-parse", ref).decode().strip()
    return build_report(
        inputs,
        params=params,
        git_commit=commit,
        raw_data_hash=raw_hash,
        mlflow_ids=mlflow_ids,
        stage_seconds={stage: value for stage, value in seconds.items() if value is not None},
    )


def collect(name: str, out: Path, since: float, max_figure_width: int) -> dict:
    ref = experiment_ref(name)
    runs = stage_runs(name, int(since * 1000))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, 0o755)
    try:
        for source, target in GIT_FILES.items():
            write_bytes_atomic(staging / target, git("show", f"{ref}:{source}"))
        seconds = {stage: run.data.metrics.get("stage_seconds") for stage, run in runs.items()}
        with tempfile.TemporaryDirectory() as tmp:
            source_json = mlflow.artifacts.download_artifacts(
                run_id=runs["download"].info.run_id, artifact_path="source.json", dst_path=tmp
            )
            shutil.copy(source_json, staging / "source.json")
            report = rebuild_report(ref, staging, runs, seconds, Path(tmp))
        figures = sorted(set(FIGURE_LINK.findall(report)))
        for figure in figures:
            png = git("show", f"{ref}:plots/figures/{figure}")
            write_bytes_atomic(staging / "figures" / jpeg_name(figure), small_jpeg(png, max_figure_width))
        report = FIGURE_LINK.sub(lambda match: f"](figures/{jpeg_name(match.group(1))})", report)
        if (out / "ablation.md").is_file():
            report = report.replace(
                "\n## Goal", "\nRecipe levers compared on val: [ablation.md](ablation.md).\n\n## Goal", 1
            )
        write_bytes_atomic(staging / "report.md", report.encode())
        record = {
            "experiment": name,
            "experiment_ref": ref,
            "experiment_commit": git("rev-parse", ref).decode().strip(),
            "mlflow_runs": {stage: run.info.run_id for stage, run in runs.items()},
            "stage_seconds": seconds,
            "total_stage_seconds": round(sum(v for v in seconds.values() if v is not None), 1),
        }
        write_bytes_atomic(staging / "stage_seconds.json", (json.dumps(record, indent=2) + "\n").encode())
        if out.exists():
            for kept in out.glob("ablation*"):  # the val ablation (scripts/ablate_real.py) is not the run's
                shutil.copy2(kept, staging / kept.name)
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the DVC experiment name (dvc exp run -n)")
    parser.add_argument("--out", required=True, type=Path, help="folder to (re)write, e.g. metrics/real")
    parser.add_argument(
        "--since",
        type=float,
        default=0.0,
        help="unix time the run started: older MLflow runs of the same name are ignored",
    )
    parser.add_argument("--max-figure-width", type=int, default=900)
    args = parser.parse_args()
    try:
        record = collect(args.name, args.out, args.since, args.max_figure_width)
    except (CollectError, mlflow.exceptions.MlflowException) as error:
        print(f"collect: {error}", file=sys.stderr)
        return 1
    print(
        f"collect: {args.out}/ from {record['experiment_ref']} "
        f"({record['total_stage_seconds']:.0f} s over {len(record['stage_seconds'])} stages)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
