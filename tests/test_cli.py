"""`drywall-qa predict` with a tiny, randomly initialised CLIPSeg: mask files, thresholds, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from drywall_qa.cli import DEFAULT_PROMPTS, main
from drywall_qa.model import build_model

SIZES = {"wall_a": (40, 30), "wall_b": (23, 31)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "best"
    model, processor = build_model("tiny", None, 32, False, prompts=DEFAULT_PROMPTS + ["segment joint/tape"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    return folder


def _mask(path):
    with Image.open(path) as image:
        return image.mode, image.size, np.asarray(image)


def test_predict_writes_one_contract_mask_per_image_and_prompt(tiny_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_model), "--out", str(out), str(images)]) == 0
    expected = {f"{name}__{slug}.png" for name in SIZES for slug in ("segment_crack", "segment_taping_area")}
    assert {p.name for p in out.iterdir()} == expected
    for name, size in SIZES.items():
        mode, mask_size, values = _mask(out / f"{name}__segment_crack.png")
        assert (mode, mask_size) == ("L", size)
        assert set(np.unique(values)) <= {0, 255}
    assert "wrote 4 masks for 2 images" in capsys.readouterr().out


def test_prompts_and_threshold_options(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    image = images / "wall_a.jpg"
    args = ["predict", "--model", str(tiny_model), "--out", str(out), "--prompt", "segment joint/tape"]
    assert main([*args, "--threshold", "0", str(image)]) == 0
    _, _, values = _mask(out / "wall_a__segment_joint-tape.png")
    assert (values == 255).all()  # every probability reaches 0
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"threshold.segment_joint-tape": 1.0}))  # no random model's sigmoid reaches 1
    assert main([*args, "--thresholds-from", str(eval_json), str(image)]) == 0
    assert (_mask(out / "wall_a__segment_joint-tape.png")[2] == 0).all()
    eval_json.write_text(json.dumps({"threshold.segment_joint-tape": 1.5}))
    assert main([*args, "--thresholds-from", str(eval_json), str(image)]) == 2  # outside [0, 1]: refused


def test_unreadable_image_is_skipped_counted_and_fails_the_exit_code(tiny_model, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_model), "--out", str(out), str(images)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "1 of 3 images could not be read" in err
    assert len(list(out.glob("wall_*.png"))) == 4  # the readable images were still predicted
    assert not list(out.glob("broken*"))


@pytest.mark.parametrize(
    ("model", "message"),
    [("does/not/exist", "model folder does/not/exist does not exist"), ("{images}", "holds no saved CLIPSeg model")],
    ids=["missing-folder", "folder-without-model"],
)
def test_bad_model_path_fails_with_one_line(images, tmp_path, capsys, model, message):
    code = main(["predict", "--model", model.format(images=images), "--out", str(tmp_path / "o"), str(images)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_input_and_colliding_ids_fail(tiny_model, images, tmp_path, capsys):
    assert main(["predict", "--model", str(tiny_model), "--out", str(tmp_path / "o"), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "wall_a.png")  # same image id as photos/wall_a.jpg
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_model),
                "--out",
                str(tmp_path / "o"),
                str(images),
                str(tmp_path / "wall_a.png"),
            ]
        )
        == 2
    )
    assert "share the image id 'wall_a'" in capsys.readouterr().err


def test_mlflow_runs_uri(tiny_model, images, tmp_path, monkeypatch):
    """A model logged to MLflow is downloaded and loaded from its `runs:/` URI."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_model), artifact_path="model/artifacts/checkpoint")
    out = tmp_path / "out"
    assert main(["predict", "--model", f"runs:/{run.info.run_id}/model", "--out", str(out), str(images)]) == 0
    assert len(list(out.glob("*.png"))) == 4
