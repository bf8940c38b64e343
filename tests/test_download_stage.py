"""The download stage validates an export with convert's own reader before it replaces data/raw,
and its MLflow preview shows only what conversion accepts (issue: bad inputs)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from drywall_qa.stage import run_stage

REPO = Path(__file__).parents[1]


def load_stage():
    spec = importlib.util.spec_from_file_location("download_stage", REPO / "stages" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workspace(tmp_path, monkeypatch, synthetic_exports):
    """A working copy with params pointing the `local` source at an editable copy of the exports,
    and a previous good data/raw."""
    exports = tmp_path / "exports"
    shutil.copytree(synthetic_exports, exports)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "local"
    params["data"]["local"]["datasets"] = {name: str(exports / name) for name in ("cracks", "taping")}
    work = tmp_path / "work"
    (work / "data" / "raw").mkdir(parents=True)
    (work / "data" / "raw" / "previous.txt").write_text("last good import")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")  # the stage reads the params dvc.yaml declares for it
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    yield exports
    mlflow.set_tracking_uri(None)


def first_test_image(exports: Path) -> tuple[Path, dict]:
    document = json.loads((exports / "cracks" / "test" / "_annotations.coco.json").read_text())
    return exports / "cracks" / "test" / document["images"][0]["file_name"], document


def edit_annotations(exports: Path, change) -> Path:
    path = exports / "cracks" / "test" / "_annotations.coco.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def _first_annotation(document: dict) -> dict:
    return document["annotations"][0]


CONVERTIBLE = {  # input that conversion counts as a skip: the stage must import it and preview it
    "missing image": lambda exports: first_test_image(exports)[0].unlink(),
    "zero-byte image": lambda exports: first_test_image(exports)[0].write_bytes(b""),
    "truncated image": lambda exports: first_test_image(exports)[0].write_bytes(
        first_test_image(exports)[0].read_bytes()[:200]
    ),
    "RLE annotation": lambda exports: edit_annotations(
        exports,
        lambda d: _first_annotation(d).update(
            iscrowd=1, segmentation={"size": [d["images"][0]["height"], d["images"][0]["width"]], "counts": [0, 50]}
        ),
    ),
    "odd polygon": lambda exports: edit_annotations(
        exports, lambda d: _first_annotation(d).update(segmentation=[[1, 2, 3, 4, 5, 6, 7]])
    ),
    "null bbox": lambda exports: edit_annotations(
        exports, lambda d: _first_annotation(d).update(bbox=None, segmentation=[])
    ),
}


@pytest.mark.parametrize("case", sorted(CONVERTIBLE))
def test_input_that_conversion_counts_is_imported_and_previewed(workspace, case):
    CONVERTIBLE[case](workspace)
    assert run_stage("download", load_stage().download) == 0
    raw = Path("data/raw")
    assert (raw / "cracks" / "test" / "_annotations.coco.json").is_file() and not (raw / "previous.txt").exists()
    client = mlflow.MlflowClient()
    (run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("drywall-qa").experiment_id])
        if r.info.run_name == "download"
    ]
    previews = sorted(a.path for a in client.list_artifacts(run.info.run_id, "previews"))
    assert previews == ["previews/cracks.png", "previews/taping.png"] and run.info.status == "FINISHED"


def test_a_malformed_export_is_refused_naming_the_users_file_and_data_raw_is_kept(workspace, capsys):
    path = edit_annotations(workspace, lambda document: document.pop("annotations"))
    assert run_stage("download", load_stage().download) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]  # the stage's one line, after MLflow's log
    assert message.startswith("download: cracks: malformed annotation file") and "`annotations` is missing" in message
    assert str(path) in message and ".raw-" not in message  # the user's file, not the deleted temp folder
    assert [p.name for p in Path("data/raw").iterdir()] == ["previous.txt"]
    assert not [p for p in Path("data").iterdir() if p.name.startswith(".raw")]
