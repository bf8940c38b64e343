"""The registered model served over REST by `mlflow models serve`, as a client calls it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from small_repo import free_port, wait_until_serving

from drywall_qa.cli import main as cli_main
from drywall_qa.contracts.masks import binarize
from drywall_qa.inference import predict_probs
from drywall_qa.model import build_model, load_model
from drywall_qa.registry import CHAMPION_ALIAS, register_checkpoint

PROMPTS = ["segment crack", "segment taping area"]
NAME = "drywall-served"


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A tiny checkpoint registered with val-chosen thresholds, served on 127.0.0.1 (local env)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, processor = build_model("tiny", None, 32, False, prompts=PROMPTS)
    folder = tmp_path / "best"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "wall.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    (probs,) = predict_probs(*load_model(folder), [Image.open(image).convert("RGB")], PROMPTS, device="cpu")
    chosen = {p: round(float(np.quantile(prob, q)), 4) for p, prob, q in zip(PROMPTS, probs, (0.3, 0.8), strict=True)}
    metrics = {"test.miou": 0.4} | {f"threshold.{p.replace(' ', '_')}": t for p, t in chosen.items()}
    with mlflow.start_run(experiment_id=experiment, run_name="repro abc1234 synthetic/scratch"):
        register_checkpoint(folder, metrics, PROMPTS, NAME, ["test.*miou"], 0.02, {}, {})
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{CHAMPION_ALIAS}"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_serving(server, f"{base}/ping", timeout=180)
    yield base, image, {p: binarize(prob, chosen[p]) for p, prob in zip(PROMPTS, probs, strict=True)}, probs
    server.terminate()
    server.wait(timeout=30)
    mlflow.set_tracking_uri(None)


def test_rest_masks_match_predict_at_the_val_chosen_thresholds(served, tmp_path):
    base, image, expected, probs = served
    encoded = base64.b64encode(image.read_bytes()).decode()
    status, body = post(
        f"{base}/invocations",
        {"dataframe_split": {"columns": ["image", "prompt"], "data": [[encoded, p] for p in PROMPTS]}},
    )
    assert status == 200, body
    masks = [np.asarray(mask, dtype=np.uint8) for mask in body["predictions"]]
    assert [mask.shape for mask in masks] == [(40, 52)] * 2  # the image's own size
    for index, (prompt, mask) in enumerate(zip(PROMPTS, masks, strict=True)):
        assert set(np.unique(mask).tolist()) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, expected[prompt])
        assert (expected[prompt] != binarize(probs[index], 0.5)).any()  # so the threshold used is the chosen one

    out = tmp_path / "cli"
    args = ["predict", "--model", f"models:/{NAME}@{CHAMPION_ALIAS}", "--out", str(out), str(image)]
    assert cli_main(args + [arg for p in PROMPTS for arg in ("--prompt", p)]) == 0
    for prompt, mask in zip(PROMPTS, masks, strict=True):
        written = np.asarray(Image.open(out / f"wall__{prompt.replace(' ', '_')}.png"))
        np.testing.assert_array_equal(written, mask)  # pixel for pixel


def test_a_bad_image_gets_400_with_the_projects_message(served):
    base, *_ = served
    status, body = post(
        f"{base}/invocations",
        {"dataframe_split": {"columns": ["image", "prompt"], "data": [["bm90IGFuIGltYWdl", "segment crack"]]}},
    )
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "is not base64-encoded image bytes" in body["message"]
    status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    # MLflow's schema enforcement (the signature) answers first, with a message that names the columns
    assert status == 400 and "Model is missing inputs ['image', 'prompt']" in body["message"], body


def test_the_logged_model_is_named_after_its_run(served):
    experiment = mlflow.get_experiment_by_name("t").experiment_id
    logged = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert [model.name for model in logged] == ["clipseg-repro-abc1234-synthetic-scratch"]
