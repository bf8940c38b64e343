"""MLflow grouping: one parent run per pipeline execution, one child per stage."""

from __future__ import annotations

import socket

import mlflow
import pytest

from drywall_qa import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _runs(root):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("drywall-qa")
    return client.search_runs([experiment.experiment_id])


def test_stages_of_one_execution_share_a_parent(store):
    all_params = {"seed": 1, "lr": 0.001}
    for stage in ("download", "convert"):
        with tracking.stage_run(stage, params={"seed": 1}, all_params=all_params):
            mlflow.log_metric("images", 3)
    runs = _runs(store)
    parents = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == "pipeline"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in children) == ["convert", "download"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert parents[0].data.params == {"seed": "1", "lr": "0.001"}
    assert all(r.data.metrics["images"] == 3 for r in children)
    # artifacts live beside the store, under the DVC root, not in the current directory
    assert parents[0].info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_experiments_get_their_own_parent(store, monkeypatch):
    for name in ("exp-a", "exp-b"):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        with tracking.stage_run("train", params={"lr": 1}, all_params={"lr": 1}):
            pass
    parents = [r for r in _runs(store) if r.data.tags.get(tracking.PARENT_TAG) == "pipeline"]
    assert sorted(r.info.run_name for r in parents) == ["exp-a", "exp-b"]


def test_unreachable_server_fails_before_work(store, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{port}")
    entered = False
    with pytest.raises(tracking.TrackingUnavailableError) as error, tracking.stage_run("train", params={}):
        entered = True
    assert not entered
    assert "unreachable" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_redact_uri_hides_credentials():
    assert tracking.redact_uri("https://me:tok@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert tracking.redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_dataset_digest_prefers_dvc_lock(store, tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  split:\n    outs:\n    - path: data/manifest.csv\n      md5: abc123\n"
    )
    assert tracking.dvc_lock_digest("data/manifest.csv", tmp_path) == "abc123"
    assert tracking.dvc_lock_digest("data/other.csv", tmp_path) is None


@pytest.mark.parametrize(
    ("raise_in_stage", "status"),
    [
        (lambda: (_ for _ in ()).throw(RuntimeError("boom")), "FAILED"),
        (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "KILLED"),
        (lambda: __import__("os").kill(__import__("os").getpid(), __import__("signal").SIGTERM), "KILLED"),
    ],
)
def test_a_stage_that_dies_ends_its_run_failed_or_killed(store, raise_in_stage, status):
    with (
        pytest.raises((RuntimeError, KeyboardInterrupt)),
        tracking.stage_run("train", params={"lr": 1}, all_params={"lr": 1}),
    ):
        raise_in_stage()
    (child,) = [r for r in _runs(store) if r.info.run_name == "train"]
    assert child.info.status == status and "stage_seconds" not in child.data.metrics


def _kill_inside_a_stage(root: str) -> None:
    import os
    import signal

    os.environ["DVC_ROOT"] = root
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tracking.stage_run("train", params={"lr": 1}, all_params={"lr": 1}):
        mlflow.log_metric("val_miou", 0.1, step=1)
        os.kill(os.getpid(), signal.SIGKILL)  # no handler runs: the run stays RUNNING


def test_a_run_left_running_by_a_killed_process_is_closed_and_resumed_as_one_history(store):
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_kill_inside_a_stage, args=(str(store),))
    process.start()
    process.join(120)
    assert process.exitcode == -9
    (killed,) = [r for r in _runs(store) if r.info.run_name == "train"]
    assert killed.info.status == "RUNNING"  # what the dead process left
    with tracking.stage_run("train", params={"lr": 1}, all_params={"lr": 1}, resume_run_id=killed.info.run_id):
        mlflow.log_metric("val_miou", 0.2, step=2)
    runs = [r for r in _runs(store) if r.info.run_name == "train"]
    assert [r.info.run_id for r in runs] == [killed.info.run_id] and runs[0].info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(killed.info.run_id, "val_miou")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
    assert runs[0].data.tags["drywall_qa.resumed"] == "true"


def test_a_dead_processes_running_run_is_closed_at_the_next_start(store):
    import subprocess
    import sys

    with tracking.stage_run("download", params={}, all_params={"lr": 1}):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("drywall-qa")
    orphan = client.create_run(
        experiment.experiment_id,
        run_name="train",
        tags={tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: dead.stdout.strip()},
    )
    with tracking.stage_run("convert", params={}, all_params={"lr": 1}):
        pass
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
