"""Bad input, as a new user brings it: one table, one row per input, each run against the stage or the
served model that meets it. Every row ends in a clean one-line refusal that names what is wrong (and,
for the download stage, keeps the last good data/raw), or in an import whose problems conversion
counts. A new bad input is one more row.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image
from test_sources import png_header_only, tree_bytes, zip_bytes

from drywall_qa.mlflow_model import LOCAL_PATHS_ENV, MAX_PIXELS_ENV, ClipSegPyfunc
from drywall_qa.stage import run_stage

REPO = Path(__file__).parents[1]
BOMB = "train/bomb_png.rf." + "d" * 32 + ".png"


@dataclass(frozen=True)
class Case:
    stage: str  # "download" (the DVC stage, local source) or "serving" (the pyfunc behind `mlflow models serve`)
    make: Callable  # download: (exports, work) -> None; serving: (tmp_path, env) -> (DataFrame, params)
    outcome: str  # "refused": one line naming the problem; "imported": conversion counts the problem
    message: str = ""  # in the refusal; `{exports}`/`{zip}` stand for the user's own paths


# ---------------------------------------------------------------- the download stage's inputs


def annotations_file(exports: Path) -> Path:
    return exports / "cracks" / "test" / "_annotations.coco.json"


def edit_annotations(exports: Path, change) -> None:
    path = annotations_file(exports)
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def first_test_image(exports: Path) -> Path:
    document = json.loads(annotations_file(exports).read_text())
    return exports / "cracks" / "test" / document["images"][0]["file_name"]


def set_local(work: Path, **changes) -> None:
    """Change `data.local` keys (`cracks=<path>` for a dataset's source) in the workspace's params."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in changes.items():
        if key in params["data"]["local"]["datasets"]:
            params["data"]["local"]["datasets"][key] = str(value)
        else:
            params["data"]["local"][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def cracks_as_zip(exports: Path, work: Path, extra: dict[str, bytes] | None = None) -> Path:
    zip_path = exports / "cracks.zip"
    zip_path.write_bytes(zip_bytes({**tree_bytes(exports / "cracks"), **(extra or {})}))
    set_local(work, cracks=zip_path)
    return zip_path


def not_json(exports: Path, work: Path) -> None:
    annotations_file(exports).write_text("{ not json")


def no_images_list(exports: Path, work: Path) -> None:
    edit_annotations(exports, lambda document: document.pop("images"))


def zip_slip(exports: Path, work: Path) -> None:
    cracks_as_zip(exports, work, {"../evil.txt": b"outside"})


def symlink_inside(exports: Path, work: Path) -> None:
    (exports / "cracks" / "train" / "notes.txt").symlink_to("/etc/hostname")


# ---------------------------------------------------------------- the served model's inputs


def png_base64(width: int = 16, height: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def served_row(image: str, prompt: str = "segment crack", **params):
    return lambda tmp_path, env: (pd.DataFrame({"image": [image], "prompt": [prompt]}), params)


def over_configured_limit(tmp_path: Path, env: dict) -> tuple:
    env[MAX_PIXELS_ENV] = "100"
    return served_row(png_base64(16, 16))(tmp_path, env)


def non_image_file_with_paths_opt_in(tmp_path: Path, env: dict) -> tuple:
    env[LOCAL_PATHS_ENV] = "1"
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    return served_row(str(notes))(tmp_path, env)


def bad_limit_setting(tmp_path: Path, env: dict) -> tuple:
    env[MAX_PIXELS_ENV] = "lots"
    return served_row(png_base64())(tmp_path, env)


CORPUS: dict[str, Case] = {
    # the download stage: refusals name the user's own file, never the deleted staging copy
    "COCO file that is not JSON": Case(
        "download", not_json, "refused", "{exports}/cracks/test/_annotations.coco.json is not valid JSON"
    ),
    "COCO file without an images list": Case(
        "download", no_images_list, "refused", "{exports}/cracks/test/_annotations.coco.json has no `images` list"
    ),
    "COCO file that is not JSON, sliced": Case(
        "download",
        lambda exports, work: (not_json(exports, work), set_local(work, limit_per_dataset=5)),
        "refused",
        "{exports}/cracks/test/_annotations.coco.json is not valid JSON",
    ),
    "zipped COCO file that is not JSON": Case(
        "download",
        lambda exports, work: (not_json(exports, work), cracks_as_zip(exports, work)),
        "refused",
        "{zip}:test/_annotations.coco.json is not valid JSON",
    ),
    "zipped COCO file that is not JSON, sliced": Case(
        "download",
        lambda exports, work: (
            not_json(exports, work),
            cracks_as_zip(exports, work),
            set_local(work, limit_per_dataset=5),
        ),
        "refused",
        "{zip}:test/_annotations.coco.json is not valid JSON",
    ),
    "COCO file without annotations": Case(
        "download",
        lambda exports, work: edit_annotations(exports, lambda document: document.pop("annotations")),
        "refused",
        "malformed annotation file {exports}/cracks/test/_annotations.coco.json: `annotations` is missing",
    ),
    "export folder that does not exist": Case(
        "download", lambda exports, work: set_local(work, cracks=exports / "nowhere"), "refused", "does not exist"
    ),
    "folder that is no export": Case(
        "download",
        lambda exports, work: (exports / "empty").mkdir() or set_local(work, cracks=exports / "empty"),
        "refused",
        "is not a Roboflow export",
    ),
    "text file given as the export": Case(
        "download",
        lambda exports, work: (exports / "a.txt").write_text("hi") and set_local(work, cracks=exports / "a.txt"),
        "refused",
        "is neither a folder nor a zip file",
    ),
    "zip member outside the target (zip slip)": Case(
        "download", zip_slip, "refused", "'../evil.txt', which would be written outside the target folder"
    ),
    "symbolic link inside the export": Case("download", symlink_inside, "refused", "is a symbolic link"),
    "image over max_image_pixels": Case(
        "download",
        lambda exports, work: set_local(work, max_image_pixels=9000),
        "refused",
        "96x96 = 9216 pixels, over max_image_pixels=9000",
    ),
    "decompression-bomb PNG in a zip": Case(
        "download",
        lambda exports, work: cracks_as_zip(exports, work, {BOMB: png_header_only(40000, 40000)}),
        "refused",
        "decompression bomb",
    ),
    # the download stage: what conversion counts is imported, and conversion reports it
    "missing image": Case("download", lambda exports, work: first_test_image(exports).unlink(), "imported"),
    "zero-byte image": Case("download", lambda exports, work: first_test_image(exports).write_bytes(b""), "imported"),
    "truncated image": Case(
        "download",
        lambda exports, work: first_test_image(exports).write_bytes(first_test_image(exports).read_bytes()[:200]),
        "imported",
    ),
    "RLE annotation": Case(
        "download",
        lambda exports, work: edit_annotations(
            exports,
            lambda d: d["annotations"][0].update(
                iscrowd=1, segmentation={"size": [d["images"][0]["height"], d["images"][0]["width"]], "counts": [0, 50]}
            ),
        ),
        "imported",
    ),
    "polygon with an odd number of coordinates": Case(
        "download",
        lambda exports, work: edit_annotations(
            exports, lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]])
        ),
        "imported",
    ),
    "null bbox and no polygon": Case(
        "download",
        lambda exports, work: edit_annotations(
            exports, lambda d: d["annotations"][0].update(bbox=None, segmentation=[])
        ),
        "imported",
    ),
    # the served model: each a 400 with the project's message
    "image that is not base64": Case(
        "serving", served_row("not an image!"), "refused", "is not base64-encoded image bytes"
    ),
    "base64 of text, not of an image": Case(
        "serving", served_row(base64.b64encode(b"hello").decode()), "refused", "is not base64-encoded image bytes"
    ),
    "decompression-bomb PNG": Case(
        "serving",
        served_row(base64.b64encode(png_header_only(40000, 40000)).decode()),
        "refused",
        f"over the limit of 50000000 ({MAX_PIXELS_ENV})",
    ),
    "image over the configured pixel limit": Case(
        "serving", over_configured_limit, "refused", f"16x16 = 256 pixels, over the limit of 100 ({MAX_PIXELS_ENV})"
    ),
    "non-image file, local paths allowed": Case(
        "serving", non_image_file_with_paths_opt_in, "refused", "notes.txt is not an image PIL can read"
    ),
    "file path, local paths not allowed": Case(
        "serving", served_row("/etc/hostname"), "refused", f"file paths are read only with {LOCAL_PATHS_ENV}=1"
    ),
    "empty image": Case("serving", served_row(""), "refused", "image must be a non-empty string"),
    "no prompt column": Case(
        "serving",
        lambda tmp_path, env: (pd.DataFrame({"image": [png_base64()]}), {}),
        "refused",
        "input DataFrame lacks columns ['prompt']",
    ),
    "threshold outside [0, 1]": Case(
        "serving", served_row(png_base64(), threshold=1.5), "refused", "param threshold must be in [0, 1], got 1.5"
    ),
    "pixel limit setting that is not a number": Case(
        "serving", bad_limit_setting, "refused", f"{MAX_PIXELS_ENV} must be a positive whole number of pixels"
    ),
}


@pytest.fixture
def workspace(tmp_path, monkeypatch, synthetic_exports):
    """A working copy whose `local` source points at an editable copy of the exports, with a previous
    good data/raw."""
    exports = tmp_path / "exports"
    shutil.copytree(synthetic_exports, exports)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "local"
    params["data"]["local"].update(
        datasets={name: str(exports / name) for name in ("cracks", "taping")}, limit_per_dataset=0
    )
    work = tmp_path / "work"
    (work / "data" / "raw").mkdir(parents=True)
    (work / "data" / "raw" / "previous.txt").write_text("last good import")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")  # the stage reads the params dvc.yaml declares for it
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    yield exports, work
    mlflow.set_tracking_uri(None)
    # the stage set this process's active experiment (MLflow keeps it in a global and in the environment);
    # the next test's new store has no experiment of that id
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # not monkeypatch: its undo would put the value back


def load_download_stage():
    import importlib.util

    spec = importlib.util.spec_from_file_location("download_stage", REPO / "stages" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.download


def outcome_of_download(case: Case, exports: Path, work: Path, capsys) -> tuple[str, str]:
    case.make(exports, work)
    code = run_stage("download", load_download_stage())
    message = capsys.readouterr().err.strip().splitlines()[-1]  # the stage's one line, after MLflow's log
    leftovers = [p.name for p in (work / "data").iterdir() if p.name.startswith(".raw") and p.is_dir()]
    assert not leftovers, leftovers  # no staging or retired copy is left behind either way
    raw = sorted(p.name for p in (work / "data" / "raw").iterdir())
    if code == 1:
        assert raw == ["previous.txt"]  # a refusal keeps the last good import
        return "refused", message
    assert code == 0 and raw == ["cracks", "source.json", "taping"]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("drywall-qa").experiment_id])[:1]
    previews = sorted(a.path for a in client.list_artifacts(run.info.run_id, "previews"))
    assert previews == ["previews/cracks.png", "previews/taping.png"]  # shows what conversion accepts
    return "imported", message


def outcome_of_serving(case: Case, tmp_path: Path, monkeypatch) -> tuple[str, str]:
    env: dict[str, str] = {}
    frame, params = case.make(tmp_path, env)
    for name in (LOCAL_PATHS_ENV, MAX_PIXELS_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # the model is never reached: every row is refused while its input is read
    with pytest.raises(MlflowException) as error:
        ClipSegPyfunc().predict(None, frame, params)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"  # what `mlflow models serve` answers with 400
    return "refused", error.value.message


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_gets_a_clean_refusal_or_a_counted_import(name, tmp_path, monkeypatch, capsys, request):
    case = CORPUS[name]
    if case.stage == "download":
        exports, work = request.getfixturevalue("workspace")
        outcome, message = outcome_of_download(case, exports, work, capsys)
        expected = case.message.format(exports=exports, zip=exports / "cracks.zip")
        assert ".raw-" not in message and "Traceback" not in message
    else:
        outcome, message = outcome_of_serving(case, tmp_path, monkeypatch)
        expected = case.message
    assert outcome == case.outcome, message
    assert expected in message, message
    print(f"corpus | {name} | {outcome} | {message}")
