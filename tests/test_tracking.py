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


def _parents(root):
    return [r for r in _runs(root) if r.data.tags.get(tracking.PARENT_TAG) == "pipeline"]


PIPELINE_PARAMS = {"seed": 1, "data": {"source": "synthetic"}, "model": {"weights": None, "preset": "tiny"}}


def test_the_parent_spans_its_execution_and_holds_what_people_compare(store, monkeypatch):
    monkeypatch.setattr(tracking, "git_commit", lambda root: "0123456789abcdef")
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: f"{__import__('os').getpid()}-1")
    with tracking.stage_run("train", params={}, all_params=PIPELINE_PARAMS):
        tracking.log_to_pipeline({"train.best_val_miou": 0.3})
    (parent,) = _parents(store)
    assert parent.info.status == "RUNNING"  # stages remain
    assert parent.info.run_name == "repro 0123456 synthetic/scratch-tiny"
    assert parent.data.tags["data_source"] == "synthetic" and parent.data.tags["weights"] == "scratch (tiny)"
    assert parent.data.tags["git_commit"] == "0123456789abcdef" and "params_hash" in parent.data.tags
    assert parent.data.params["model.preset"] == "tiny" and parent.data.params["seed"] == "1"
    with tracking.stage_run("report", params={}, all_params=PIPELINE_PARAMS) as run:
        tracking.describe_run(run.data.tags["mlflow.parentRunId"], "# drywall-qa\nTest mIoU 0.3")
    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["train.best_val_miou"] == 0.3
    assert {"stage_seconds.train", "stage_seconds.report"} <= set(parent.data.metrics)
    assert parent.data.tags[tracking.DESCRIPTION_TAG].startswith("# drywall-qa")
    experiment = mlflow.MlflowClient().get_experiment(parent.info.experiment_id)
    assert "parent run is one `dvc repro`" in experiment.tags[tracking.DESCRIPTION_TAG]
    # a training experiment: the MLflow UI opens its runs in "Model training" mode, not its GenAI mode
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_guessed_experiment_kind_is_replaced_and_a_chosen_one_kept(store):
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment_id = tracking.configure()
    client.set_experiment_tag(experiment_id, tracking.EXPERIMENT_KIND_TAG, "genai_development_inferred")
    tracking.configure()
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(experiment_id, tracking.EXPERIMENT_KIND_TAG, "finetuning")
    tracking.configure()
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_the_weights_tag_uses_the_reports_words():
    params = {"data": {"source": "local"}, "model": {"weights": None, "preset": "tiny", "conv_stem": [24, 48]}}
    assert tracking._source_tags(params) == {"data_source": "local", "weights": "scratch (tiny+conv_stem)"}


def test_a_killed_stage_kills_the_parent_and_the_rerun_continues_it(store, monkeypatch):
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: "4242-1")
    with tracking.stage_run("download", params={}, all_params=PIPELINE_PARAMS):
        pass
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("train", params={}, all_params=PIPELINE_PARAMS):
        raise KeyboardInterrupt
    (parent,) = _parents(store)
    assert parent.info.status == "KILLED"
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: "4343-2")  # the re-run: another dvc process
    with tracking.stage_run("train", params={}, all_params=PIPELINE_PARAMS):
        assert _parents(store)[0].info.status == "RUNNING"
    for stage in ("evaluate", "report"):
        with tracking.stage_run(stage, params={}, all_params=PIPELINE_PARAMS):
            pass
    (parent,) = _parents(store)  # one parent for the killed execution and its re-run
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.EXECUTION_TAG] == "4343-2"
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.info.run_name, r.info.status) for r in children) == [
        ("download", "FINISHED"),
        ("evaluate", "FINISHED"),
        ("report", "FINISHED"),
        ("train", "FINISHED"),
        ("train", "KILLED"),
    ]
    # a new execution of the finished pipeline (same commit and params) gets a new parent
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: "4444-3")
    with tracking.stage_run("download", params={}, all_params=PIPELINE_PARAMS):
        pass
    assert sorted(r.info.status for r in _parents(store)) == ["FINISHED", "RUNNING"]


def _stage_by_hand_then_sigkill(root: str) -> None:
    import os
    import signal

    os.environ["DVC_ROOT"] = root
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tracking.stage_run("train", params={}, all_params=PIPELINE_PARAMS):
        os.kill(os.getpid(), signal.SIGKILL)


def test_stages_run_by_hand_share_a_parent_that_is_never_left_running(store):
    for stage in ("download", "convert"):  # `python stages/<stage>.py`: no dvc process above
        with tracking.stage_run(stage, params={}, all_params=PIPELINE_PARAMS):
            assert _parents(store)[0].info.status == "RUNNING"
        (parent,) = _parents(store)
        assert parent.info.status == "FINISHED"  # nothing above the stage would ever end it
        assert parent.data.tags[tracking.EXECUTION_TAG] == "by-hand"
    children = [r.info.run_name for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(children) == ["convert", "download"]  # one parent for both hand-run stages

    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_stage_by_hand_then_sigkill, args=(str(store),))
    process.start()
    process.join(120)
    assert process.exitcode == -9
    assert _parents(store)[0].info.status == "RUNNING"  # what the killed stage left
    assert _parents(store)[0].data.tags[tracking.PID_TAG] != str(__import__("os").getpid())
    tracking.close_dead_runs(mlflow.MlflowClient(), _parents(store)[0].info.experiment_id)
    assert _parents(store)[0].info.status == "KILLED"  # its train child never finished


def test_a_parent_whose_dvc_process_died_is_closed_from_its_stages(store, monkeypatch):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: f"{dead.stdout.strip()}-1")
    with tracking.stage_run("train", params={}, all_params=PIPELINE_PARAMS):
        pass  # a partial `dvc repro train`: its dvc process then exits, the parent stays RUNNING
    assert _parents(store)[0].info.status == "RUNNING"
    monkeypatch.setattr(tracking, "dvc_execution_id", lambda: f"{__import__('os').getpid()}-2")
    with tracking.stage_run("download", params={}, all_params={**PIPELINE_PARAMS, "seed": 2}):
        pass  # any next stage start closes it: every stage of it finished, so FINISHED
    by_seed = {r.data.params["seed"]: r.info.status for r in _parents(store)}
    assert by_seed == {"1": "FINISHED", "2": "RUNNING"}


def test_a_stage_run_is_described_by_what_the_stage_reports(store, monkeypatch, capsys):
    from drywall_qa.stage import run_stage

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]

    def body(stage):
        with stage.tracked():
            pass
        return "split: cracks: train 7, val 2, test 1 images"

    assert run_stage("split", body, params_path=repo / "params.yaml", dvc_yaml=repo / "dvc.yaml") == 0
    (child,) = [r for r in _runs(store) if r.info.run_name == "split"]
    assert child.data.tags[tracking.DESCRIPTION_TAG] == "split: cracks: train 7, val 2, test 1 images"
    assert "split: cracks" in capsys.readouterr().out
