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
    with pytest.raises(tracking.TrackingUnavailableError) as error:
        with tracking.stage_run("train", params={}):
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
