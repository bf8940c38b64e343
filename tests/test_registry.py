"""The registered model carries the val-chosen thresholds; only a passing gate moves `champion`."""

from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from drywall_qa.cli import main as cli_main
from drywall_qa.contracts.masks import binarize
from drywall_qa.inference import predict_probs
from drywall_qa.model import build_model, load_model
from drywall_qa.registry import CHAMPION_ALIAS, register_checkpoint

PROMPTS = ["segment crack", "segment taping area"]
NAME = "drywall-test"


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment
    mlflow.set_tracking_uri(None)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, processor = build_model("tiny", None, 32, False, prompts=PROMPTS)
    folder = tmp_path / "best"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "photos" / "wall.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    return folder, image


def register(folder, metrics, baseline, experiment):
    with mlflow.start_run(experiment_id=experiment):
        return register_checkpoint(
            folder, metrics, PROMPTS, NAME, ["test.*miou"], 0.02, baseline, {"dvc_experiment": "e1"}
        )


def test_the_champion_carries_the_val_chosen_thresholds_into_the_pyfunc_and_predict(checkpoint, store, tmp_path):
    folder, image = checkpoint
    model, processor = load_model(folder)
    (probs,) = predict_probs(model, processor, [Image.open(image).convert("RGB")], PROMPTS, device="cpu")
    # thresholds that cut each probability map at different places than 0.5 does
    chosen = {
        prompt: round(float(np.quantile(p, q)), 4) for prompt, p, q in zip(PROMPTS, probs, (0.3, 0.8), strict=True)
    }
    # val chose to snap the taping prompt's components to boxes
    expected = {
        prompt: binarize(p, chosen[prompt], "boxes" if prompt == PROMPTS[1] else None)
        for prompt, p in zip(PROMPTS, probs, strict=True)
    }
    assert any((expected[p] != binarize(probs[i], 0.5)).any() for i, p in enumerate(PROMPTS))
    assert (expected[PROMPTS[1]] != binarize(probs[1], chosen[PROMPTS[1]])).any()
    metrics = {
        "test.miou": 0.4,
        "test.segment_crack.miou": 0.3,
        "threshold.segment_crack": chosen[PROMPTS[0]],
        "threshold.segment_taping_area": chosen[PROMPTS[1]],
        "boxes.segment_crack": 0,
        "boxes.segment_taping_area": 1,
    }

    registration = register(folder, metrics, {}, store)  # no baseline yet: a first run passes
    assert registration.champion and registration.thresholds == chosen
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, CHAMPION_ALIAS)
    assert str(version.version) == registration.version
    assert version.tags["threshold.segment_crack"] == f"{chosen[PROMPTS[0]]:g}" and version.tags["gate"] == "passed"
    assert version.tags["boxes.segment_taping_area"] == "true" and "boxes.segment_crack" not in version.tags
    assert "'segment taping area'" in version.description and "snapped to boxes" in version.description
    assert "test.miou 0.4000" in version.description and "e1" in version.description
    assert "@champion" in client.get_registered_model(NAME).description  # the model page says what it is

    served = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION_ALIAS}")
    encoded = base64.b64encode(image.read_bytes()).decode()
    masks = served.predict(pd.DataFrame({"image": [encoded, encoded], "prompt": PROMPTS}))
    for prompt, mask in zip(PROMPTS, masks, strict=True):
        np.testing.assert_array_equal(mask == 255, expected[prompt])

    out = tmp_path / "masks"
    assert (
        cli_main(
            [
                "predict",
                "--model",
                f"models:/{NAME}@{CHAMPION_ALIAS}",
                "--out",
                str(out),
                *[arg for p in PROMPTS for arg in ("--prompt", p)],
                str(image),
            ]
        )
        == 0
    )
    for prompt in PROMPTS:
        written = np.asarray(Image.open(out / f"wall__{prompt.replace(' ', '_')}.png")) == 255
        np.testing.assert_array_equal(written, expected[prompt])


def test_a_regressed_or_ungated_version_is_registered_but_does_not_move_the_champion(checkpoint, store):
    folder, _ = checkpoint
    first = register(folder, {"test.miou": 0.40, "threshold.segment_crack": 0.5}, {}, store)
    regressed = register(folder, {"test.miou": 0.30}, {"test.miou": 0.40}, store)
    ungated = register(folder, {"val.miou": 0.9}, {}, store)
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, CHAMPION_ALIAS).version) == first.version
    assert not regressed.champion and "FAILED" in regressed.gate_message
    assert not ungated.champion and "no metric matches" in ungated.gate_message
    assert client.get_model_version(NAME, regressed.version).tags["gate"] == "failed"
