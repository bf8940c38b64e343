"""MLflow tracking for pipeline stages: one parent run per pipeline execution, one child run per stage.

Stage scripts are the only callers; library functions stay free of MLflow so they can be tested alone.

Store: `MLFLOW_TRACKING_URI` if set (a team server), else `sqlite:///<DVC_ROOT>/mlflow.db` with artifacts
in `<DVC_ROOT>/mlartifacts`. DVC sets `DVC_ROOT` for every stage, also for `dvc exp run --temp` and queued
experiments that run in a temporary copy of the repo, so their runs land in the user's store.

Grouping: stages of one execution share a parent run, found by the tag `drywall_qa.pipeline_key`
(under `dvc exp run` the experiment name, `DVC_EXP_NAME`; else git commit + params hash):
- the latest parent of that key is continued unless it FINISHED under another execution (another
  `dvc` process): a re-run after a kill or a failure continues its parent, a new execution of a
  finished pipeline gets a new one;
- the parent is RUNNING while stages run, FINISHED when the last stage (`report`) ends, FAILED or
  KILLED when a stage dies. A parent whose `dvc` process is gone (SIGKILL, or a partial
  `dvc repro <stage>` that ended before `report`) is closed when the next stage starts: KILLED if a
  stage of it did not finish, else FINISHED;
- stages run by hand (`python stages/<stage>.py`, no dvc process) share one parent per key, the
  `by-hand` execution: each stage reopens it and finishes it when it ends, since none may follow;
- the parent carries every param, tags (data source, weights, DVC experiment, baseline), the
  headline metrics the stages log onto it (`log_to_pipeline`) and each stage's wall time
  (`stage_seconds.<stage>`); the report stage writes its description.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import psutil
from mlflow.tracking import MlflowClient

from drywall_qa.errors import DrywallQAError
from drywall_qa.params import flatten

PIPELINE_KEY_TAG = "drywall_qa.pipeline_key"
PARENT_TAG = "drywall_qa.role"
DEFAULT_EXPERIMENT = "drywall-qa"


HOST_TAG = "drywall_qa.host"
PID_TAG = "drywall_qa.pid"
EXECUTION_TAG = "drywall_qa.execution"  # `<pid>-<start time>` of the dvc process that last ran a stage of it
BY_HAND = "by-hand"  # the execution of stages run without dvc
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's (or experiment's) description
# the experiment's type for MLflow: a training experiment, not a GenAI one. (MLflow 3.17's UI still takes its
# GenAI / Model training mode from `?workflowType=` in the URL or the browser's last choice: the link in docs/experiments.md.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
LAST_STAGE = "report"  # its end finishes the parent run
EXPERIMENT_DESCRIPTION = (
    "drywall-qa pipeline executions. Each parent run is one `dvc repro` or `dvc exp run`: every param, "
    "the headline metrics (test mIoU and Dice per prompt, best val mIoU, thresholds, wall time per stage, "
    "footprint) and the report's first lines. Its children are the stages. Select two parents and press "
    "Compare to see them side by side."
)


class TrackingUnavailableError(DrywallQAError, RuntimeError):
    """The MLflow tracking store cannot be reached; raised before any work starts."""


class StageTerminated(KeyboardInterrupt):
    """SIGTERM reached a stage: it ends its MLflow run as KILLED, like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise StageTerminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _process_gone(pid_text: str) -> bool:
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not psutil.pid_exists(int(pid_text))


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Close the RUNNING runs of this host whose process is gone (a SIGKILL, a power cut): stage runs
    as KILLED, then parents (see the module docstring) as KILLED or FINISHED from their stages."""
    host = socket.gethostname()
    stale = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    closed = []
    stages = [run for run in stale if run.data.tags.get(PARENT_TAG) != "pipeline"]
    for run in stages:
        if _process_gone(run.data.tags.get(PID_TAG, "")):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    for run in stale:
        if run.data.tags.get(PARENT_TAG) == "pipeline" and _process_gone(run.data.tags.get(PID_TAG, "")):
            children = client.search_runs(
                [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=1000
            )
            unfinished = any(child.info.status != "FINISHED" for child in children)
            client.set_terminated(run.info.run_id, status="KILLED" if unfinished else "FINISHED")
            closed.append(run.info.run_id)
    return closed


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def redact_uri(uri: str) -> str:
    """Hide credentials embedded in a URI (`https://user:token@host`) before it is printed or logged."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return uri


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dvc_execution_id() -> str | None:
    """Identify the `dvc repro`/`dvc exp run` process that runs this stage, if any.

    Every stage of one execution is a descendant of the same dvc process, so its pid and start
    time name the execution.
    """
    with contextlib.suppress(psutil.Error):
        for ancestor in psutil.Process().parents():
            cmdline = " ".join(ancestor.cmdline()[:3])
            if re.search(r"(^|[/\s])dvc(\s|$)", cmdline):
                return f"{ancestor.pid}-{int(ancestor.create_time())}"
    return None


def pipeline_key(commit: str, all_params: dict[str, Any]) -> str:
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        return f"exp:{exp_name}"
    return f"{commit[:12]}-{params_hash(all_params)}"


def pipeline_run_name(commit: str, all_params: dict[str, Any]) -> str:
    """The DVC experiment's name, else `repro <short commit> <data source>/<weights>`."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        return exp_name
    model = all_params.get("model", {})
    weights = model.get("weights") or f"scratch-{model.get('preset', '?')}"
    return f"repro {commit[:7]} {all_params.get('data', {}).get('source', '?')}/{weights}"


def _check_reachable(uri: str) -> None:
    """Fail at stage start, not after an hour of training, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=5)
        response.raise_for_status()
    except requests.RequestException as error:
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({type(error).__name__}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None


def configure(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    root = repo_root()
    uri = tracking_uri(root)
    project_store = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri sets it
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if project_store and mlflow.get_experiment_by_name(experiment) is None:
        artifact_root = (root / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifact_root)
    found = mlflow.set_experiment(experiment)
    if DESCRIPTION_TAG not in found.tags:
        MlflowClient().set_experiment_tag(found.experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)
    kind = found.tags.get(EXPERIMENT_KIND_TAG, "")
    if not kind or kind.endswith("_inferred"):  # an inferred kind may be a GenAI guess; a user's choice stays
        MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found.experiment_id


def _execution_tags() -> dict[str, str]:
    """Who runs the pipeline: the dvc process, or a stage run by hand (`python stages/train.py`); the
    pid is watched by `close_dead_runs`. Stages run by hand share one execution, `by-hand`."""
    execution = dvc_execution_id()
    if execution is None:
        return {EXECUTION_TAG: BY_HAND, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    return {EXECUTION_TAG: execution, PID_TAG: execution.split("-")[0], HOST_TAG: socket.gethostname()}


def _parent_run_id(client: MlflowClient, experiment_id: str, key: str, name: str, tags: dict[str, str]) -> str:
    """This execution's parent: the latest of `key`, unless it finished under another execution."""
    execution = _execution_tags()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{PARENT_TAG}` = 'pipeline'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        parent = found[0]
        same_execution = bool(execution) and parent.data.tags.get(EXECUTION_TAG) == execution[EXECUTION_TAG]
        if parent.info.status != "FINISHED" or same_execution:
            if parent.info.status != "RUNNING":
                client.update_run(parent.info.run_id, status="RUNNING")
            for tag, value in execution.items():
                client.set_tag(parent.info.run_id, tag, value)
            return parent.info.run_id
    run = client.create_run(
        experiment_id, run_name=name, tags={PIPELINE_KEY_TAG: key, PARENT_TAG: "pipeline", **tags, **execution}
    )
    return run.info.run_id


def log_to_pipeline(metrics: dict[str, float], run: Any = None) -> None:
    """Log `metrics` on the pipeline's parent run of the active (or given) stage run: what people
    compare across executions sits on the parent, one row per execution in the runs table."""
    from mlflow.entities import Metric

    run = run or mlflow.active_run()
    parent_id = run.data.tags.get("mlflow.parentRunId") if run is not None else None
    if not parent_id or not metrics:
        return
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(batch), 1000):  # MLflow's log_batch takes up to 1000 metrics
        client.log_batch(parent_id, metrics=batch[start : start + 1000])


def describe_run(run_id: str, text: str) -> None:
    """Set a run's description (the MLflow UI's "Description" box)."""
    MlflowClient().set_tag(run_id, DESCRIPTION_TAG, text)


def tag_run(run_id: str, tags: dict[str, str]) -> None:
    """Set `tags` on a run other than the active one (the pipeline's parent)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _log_params(params: dict[str, Any], client: MlflowClient | None = None, run_id: str | None = None) -> None:
    """`params` flattened (`train.epochs`) on the active run, or on `run_id` through `client`."""
    from mlflow.entities import Param

    flat = {key: str(value)[:6000] for key, value in flatten(params).items()}
    if not flat:
        return
    if client is None:
        mlflow.log_params(flat)
        return
    batch = [Param(key, value) for key, value in flat.items()]
    for start in range(0, len(batch), 100):  # MLflow's log_batch takes up to 100 params
        client.log_batch(run_id, params=batch[start : start + 100])


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any],
    all_params: dict[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the child run of `stage` under this pipeline execution's parent run.

    `params` are the keys this stage depends on (logged on the child); `all_params` (the whole
    params.yaml) are logged once on the parent and define the grouping hash. `resume_run_id`: reopen
    that run (a training resumed after a kill continues its own run: one per-epoch history).
    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM; RUNNING runs that
    a dead process of this host left behind are closed as KILLED first.
    """
    experiment_id = configure(experiment)
    root = repo_root()
    commit = git_commit(root)
    everything = all_params if all_params is not None else params
    key = pipeline_key(commit, everything)
    common_tags = {
        "git_commit": commit,
        "params_hash": params_hash(everything),
        "DVC_EXP_NAME": os.environ.get("DVC_EXP_NAME", ""),
        "DVC_EXP_BASELINE_REV": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        **(tags or {}),
    }
    client = MlflowClient()
    close_dead_runs(client, experiment_id)
    parent_tags = common_tags | _source_tags(everything)
    parent_id = _parent_run_id(client, experiment_id, key, pipeline_run_name(commit, everything), parent_tags)
    if all_params is not None and not client.get_run(parent_id).data.params:
        # through the client: `with mlflow.start_run(run_id=parent_id)` would end the parent on exit
        _log_params(all_params, client, parent_id)
    stage_tags = {
        **common_tags,
        "DVC_STAGE": os.environ.get("DVC_STAGE", stage),
        "stage": stage,
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }
    resumed = bool(resume_run_id) and _run_exists(client, resume_run_id)
    if resumed:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags({**stage_tags, "drywall_qa.resumed": "true"})
    else:
        run = mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags=stage_tags)
        _log_params(params)
    started = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            yield run
            seconds = time.perf_counter() - started
            mlflow.log_metric("stage_seconds", seconds)
            log_to_pipeline({f"stage_seconds.{stage}": seconds}, run)
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    if stage == LAST_STAGE or dvc_execution_id() is None:
        # by hand no process above the stage ends the parent, and whether another stage follows is
        # unknown: the parent finishes with its stage, and the next stage run by hand reopens it
        client.set_terminated(parent_id, status="FINISHED")


def _source_tags(all_params: dict[str, Any]) -> dict[str, str]:
    """Where a pipeline's numbers come from: data source and weights (the report says the same)."""
    model = all_params.get("model", {})
    scratch = f"scratch ({model.get('preset', '')}" + ("+conv_stem" if model.get("conv_stem") else "") + ")"
    return {  # the same words as the report's (`report.describe_weights` of train.json's `weights_init`)
        "data_source": str(all_params.get("data", {}).get("source", "")),
        "weights": str(model.get("weights") or scratch),
    }


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def pipeline_stage_seconds(parent_run_id: str) -> dict[str, float]:
    """Wall time of each stage that ran under this pipeline parent (the latest run of each stage)."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    seconds: dict[str, float] = {}
    for run in runs:
        stage = run.data.tags.get("stage")
        if stage and "stage_seconds" in run.data.metrics:
            seconds[stage] = run.data.metrics["stage_seconds"]
    return seconds


def log_dataset(path: str | Path, name: str, context: str) -> None:
    """Log a file or folder as an MLflow dataset input of the active run.

    The digest is DVC's hash: a file's md5 (what DVC records for a file), or for a folder the
    `.dir` hash from dvc.lock (an input from an earlier stage), else a content hash.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path)
    digest = file_md5(path) if path.is_file() else (dvc_lock_digest(path.as_posix()) or content_digest(path))
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both are local files
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path.resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:36]), context=context)


def file_md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def content_digest(folder: Path) -> str:
    """md5 over relative file names and their md5s, sorted."""
    digest = hashlib.md5()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}:{file_md5(file)}\n".encode())
    return digest.hexdigest()


def dvc_lock_digest(out_path: str, root: Path | None = None) -> str | None:
    """The md5 DVC recorded in dvc.lock for an output path, if any."""
    import yaml

    # the stage's working copy (cwd), not DVC_ROOT: `dvc exp run --temp` runs stages in a copy of the repo
    lock_file = (root or Path.cwd()) / "dvc.lock"
    if not lock_file.exists():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == out_path:
                return out.get("md5")
    return None
