"""Team scale with real processes: a shared `mlflow server` (database backend, artifact proxying) that
the pipeline logs to, a DVC remote that a teammate pulls from, and a queued sweep that stays grouped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from small_repo import free_port, make_small_repo, model_hash, run, wait_until_serving

SECRET = "rf-secret-key-must-not-travel"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
        + ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_until_serving(process, f"{uri}/health", timeout=120)
    yield uri, root / "artifacts"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, server):
    """A small repo whose `dvc repro` logged to the server, its results committed."""
    uri, _ = server
    repo = make_small_repo(tmp_path_factory.mktemp("team") / "repo")
    run(["dvc", "repro"], repo, env={"MLFLOW_TRACKING_URI": uri, "ROBOFLOW_API_KEY": SECRET})
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline results"], repo)
    return repo


def test_the_pipeline_logs_to_a_shared_server(pipeline, server, tmp_path, monkeypatch):
    uri, artifacts = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the registry of this server
    assert not (pipeline / "mlflow.db").exists() and not (pipeline / "mlartifacts").exists()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("drywall-qa")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("drywall_qa.role") == "pipeline"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    stages = {"download", "convert", "split", "train", "evaluate", "register", "visualize", "report"}
    assert set(children) == stages and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert parent.data.metrics["test.miou"] == pytest.approx(
        json.loads((pipeline / "metrics/eval.json").read_text())["test.miou"]
    )
    evaluate_files = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"eval.json", "headline.json"} <= evaluate_files
    assert any(a.path.endswith(".png") for a in client.list_artifacts(children["visualize"].info.run_id, "figures"))
    # the checkpoint went through the server's artifact proxy into its artifact folder
    assert list(artifacts.rglob("model.safetensors")), "no checkpoint under the server's artifact root"
    # the registered version, with the val-chosen thresholds it carries, comes back through the server
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            "models:/drywall-qa-clipseg/1", dst_path=str(tmp_path / "m"), tracking_uri=uri
        )
    )
    (thresholds_file,) = model_dir.rglob("thresholds.json")
    evaluation = json.loads((pipeline / "metrics/eval.json").read_text())
    assert json.loads(thresholds_file.read_text())["segment crack"] == evaluation["threshold.segment_crack"]
    out = tmp_path / "masks"
    image = next((pipeline / "data/raw/cracks").rglob("*.jpg"))
    result = run(
        [
            sys.executable,
            "-m",
            "drywall_qa.cli",
            "predict",
            "--model",
            "models:/drywall-qa-clipseg/1",
            "--out",
            str(out),
            str(image),
        ],
        pipeline,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert len(list(out.glob("*.png"))) == 2, result.stdout  # the default prompts: crack, taping area
    assert not (pipeline / "mlflow.db").exists()


def test_a_teammate_pulls_the_results_from_a_dvc_remote_and_has_nothing_to_rerun(pipeline, tmp_path):
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], pipeline)
    run(["dvc", "push"], pipeline)
    run(["git", "commit", "-qam", "shared remote"], pipeline)
    teammate = tmp_path / "teammate"
    run(["git", "clone", "-q", str(pipeline), str(teammate)], tmp_path)
    run(["dvc", "pull"], teammate)
    for path in ("models/clipseg/best/model.safetensors", "data/manifest.csv", "data/masks"):
        assert (teammate / path).exists(), path
    assert model_hash(teammate) == model_hash(pipeline)
    assert "up to date" in run(["dvc", "status"], teammate).stdout
    assert (
        "didn't change" in run(["dvc", "repro"], teammate).stdout.lower()
        or "up to date" in run(["dvc", "repro"], teammate).stdout.lower()
    )
    assert not (teammate / "mlflow.db").exists()
    travelled = [p for p in remote.rglob("*") if p.is_file()] + [teammate / "dvc.lock"]
    assert not any(SECRET.encode() in p.read_bytes() for p in travelled)


def test_a_queued_sweep_runs_every_point_each_with_its_own_parent(pipeline, server):
    uri, _ = server
    env = {"MLFLOW_TRACKING_URI": uri}
    run(["dvc", "exp", "run", "--queue", "-S", "lr=1e-4,1e-3"], pipeline, env=env)
    run(["dvc", "queue", "start", "-j", "1"], pipeline, env=env)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], pipeline, env=env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    experiments = [
        exp
        for rev in shown
        for exp in (rev.get("experiments") or [])
        if exp.get("revs") and exp["revs"][0]["data"].get("params")
    ]
    names = {exp["name"] for exp in experiments}
    assert len(names) == 2, shown
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("drywall-qa")
    parents = {
        r.info.run_name: r
        for r in client.search_runs([experiment.experiment_id], "tags.`drywall_qa.role` = 'pipeline'")
    }
    assert names <= set(parents), (names, set(parents))
    assert {parents[name].data.params["lr"] for name in names} == {"0.0001", "0.001"}
    assert all(parents[name].info.status == "FINISHED" for name in names)
    # the swept lr reached each point's training, not just its params: after the epoch's update the
    # val losses differ (the epoch's train loss is measured before it)
    train_runs = {
        name: client.search_runs(
            [experiment.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parents[name].info.run_id}' and tags.stage = 'train'",
        )[0]
        for name in names
    }
    assert {run_.data.params["lr"] for run_ in train_runs.values()} == {"0.0001", "0.001"}
    assert len({run_.data.metrics["val_loss"] for run_ in train_runs.values()}) == 2
    # what a user compares, printed for the CI log (pytest -s): the sweep in a terminal, the runs on the server
    table = run(
        ["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", r"^(Experiment|lr|test\.miou|val\.miou)$"],
        pipeline,
        env={**env, "COLUMNS": "120"},
    ).stdout
    print(f"\n{table}")
    for parent in sorted(parents.values(), key=lambda r: r.info.start_time):
        children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        stages = ", ".join(sorted(f"{c.info.run_name} {c.info.status}" for c in children))
        val_loss = next((c.data.metrics.get("val_loss") for c in children if c.info.run_name == "train"), None)
        print(
            f"{parent.info.run_name} | {parent.info.status} | lr {parent.data.params['lr']} | val loss {val_loss} | {stages}"
        )
