"""The ONNX export and its ONNX Runtime runner: PyTorch's probabilities within 1e-4 and the same masks
pixel for pixel, for the scratch model (conv stem, mirrored and resized views) and for a
pretrained-format folder; the runner's imports; the errors a user can meet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import PROMPTS, save_foreign_checkpoint

from drywall_qa.cli import main as cli_main
from drywall_qa.contracts.masks import binarize, read_mask
from drywall_qa.inference import InferenceConfig, predict_probs
from drywall_qa.model import build_model, load_model
from drywall_qa.onnx_export import OnnxExportError, export_onnx
from drywall_qa.onnx_runtime import (
    OnnxModelError,
    load_onnx_model,
    onnx_masks,
    onnx_predict_probs,
    resize_bilinear,
)

PROB_TOLERANCE = 1e-4


def photos(sizes=((40, 52), (97, 61), (64, 64), (130, 200))) -> list[Image.Image]:
    """Random photos of several shapes (one grey, converted like any other)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    if len(images) > 1:
        images[1] = images[1].convert("L")
    return images


def compare(torch_probs, onnx_probs, rules) -> tuple[float, int]:
    """(largest probability difference, differing mask pixels under `rules`), printed for the record."""
    difference, differing = 0.0, 0
    for expected, got in zip(torch_probs, onnx_probs, strict=True):
        assert got.shape == expected.shape and got.dtype == np.float32
        difference = max(difference, float(np.abs(got - expected).max()))
        for index, (threshold, snap) in enumerate(rules):
            differing += int(
                (binarize(expected[index], threshold, snap) != binarize(got[index], threshold, snap)).sum()
            )
    print(f"max |p_onnx - p_torch| = {difference:.3g}, differing mask pixels = {differing}")
    return difference, differing


@pytest.fixture(scope="module")
def scratch_export(tmp_path_factory):
    """The real recipe's shape in small: tiny preset, conv stem, mirrors and two sides; val rules
    with a prompt snapped per component and one per straight arm."""
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 32, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16])
    InferenceConfig(flips=("horizontal", "vertical"), sizes=(32, 48)).attach(model)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    thresholds = {PROMPTS[0]: 0.45, PROMPTS[2]: 0.55}
    spec = export_onnx(model, processor, path, PROMPTS, thresholds, {PROMPTS[0]: "boxes", PROMPTS[2]: "arms"})
    return model, processor, path, spec


def test_the_scratch_export_reproduces_pytorch_probabilities_and_masks(scratch_export):
    model, processor, path, spec = scratch_export
    onnx_model = load_onnx_model(path, threads=1)
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[2]]  # any subset, any order, tokens of unequal length
    images = photos()
    expected = predict_probs(model, processor, images, prompts, device="cpu", batch_size=3)
    got = onnx_predict_probs(onnx_model, images, prompts, batch_size=3)  # batches of 3 and 1 image
    difference, differing = compare(expected, got, [onnx_model.rule(prompt) for prompt in prompts])
    assert difference < PROB_TOLERANCE and differing == 0
    # the rules travel in the file: the chosen thresholds, 0.5 elsewhere, the snapped prompts and how
    assert onnx_model.rule(PROMPTS[0]) == (0.45, "boxes") and onnx_model.rule(PROMPTS[2]) == (0.55, "arms")
    assert onnx_model.rule(PROMPTS[1]) == (0.5, None)
    assert spec["flips"] == ["horizontal", "vertical"] and spec["sizes"] == [32, 48] and spec["input_size"] == 32
    masks = onnx_masks(onnx_model, images[0], [PROMPTS[2]])
    np.testing.assert_array_equal(masks[PROMPTS[2]], binarize(expected[0][2], 0.55, "arms"))


def test_a_skip_decoder_model_exports_with_its_stem_maps(tmp_path):
    """The skip decoder's stem maps are paired per prompt inside the graph, at every side."""
    torch.manual_seed(0)
    model, processor = build_model(
        "tiny", None, 32, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], skip_decoder=[16, 8, 8]
    )
    InferenceConfig(flips=("horizontal",), sizes=(32, 48)).attach(model)
    export_onnx(model, processor, tmp_path / "model.onnx", PROMPTS)
    onnx_model = load_onnx_model(tmp_path / "model.onnx", threads=1)
    images = photos()
    expected = predict_probs(model, processor, images, PROMPTS, device="cpu", batch_size=2)
    got = onnx_predict_probs(onnx_model, images, PROMPTS, batch_size=2)
    difference, differing = compare(expected, got, [onnx_model.rule(prompt) for prompt in PROMPTS])
    assert difference < PROB_TOLERANCE and differing == 0


def test_a_pretrained_format_folder_exports_and_predicts_the_same_masks_from_the_cli(tmp_path, capsys):
    folder = tmp_path / "pretrained"
    save_foreign_checkpoint(folder)  # HF's own CLIPSeg, 3 vision layers of which 2 are extracted
    images = tmp_path / "photos"
    images.mkdir()
    for index, image in enumerate(photos()):
        image.save(images / f"wall{index}.png")
    model_file = tmp_path / "model.onnx"
    prompts = [arg for prompt in PROMPTS[:3] for arg in ("--prompt", prompt)]
    assert cli_main(["export", "--model", str(folder), "--out", str(model_file), *prompts, "--threshold", "0.52"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    common = [*prompts, "--threshold", "0.52", str(images)]
    assert cli_main(["predict", "--model", str(folder), "--out", str(tmp_path / "torch"), *common]) == 0
    assert (
        cli_main(["predict", "--runtime", "onnx", "--model", str(model_file), "--out", str(tmp_path / "onnx")] + common)
        == 0
    )
    written = sorted(path.name for path in (tmp_path / "onnx").iterdir())
    assert written == sorted(path.name for path in (tmp_path / "torch").iterdir()) and len(written) == 12
    differing = sum(int((read_mask(tmp_path / "onnx" / n) != read_mask(tmp_path / "torch" / n)).sum()) for n in written)
    assert differing == 0

    model, processor = load_model(folder)
    images_in = [Image.open(path).convert("RGB") for path in sorted(images.iterdir())]
    expected = predict_probs(model, processor, images_in, PROMPTS[:3], device="cpu")
    got = onnx_predict_probs(load_onnx_model(model_file), images_in, PROMPTS[:3])
    difference, differing = compare(expected, got, [(0.52, None)] * 3)
    assert difference < PROB_TOLERANCE and differing == 0


def test_the_numpy_resize_is_torchs_bilinear_interpolate():
    from drywall_qa.model import resize_logits

    maps = np.random.default_rng(1).normal(0, 5, (3, 24, 24)).astype(np.float32)  # logits up to about +-15
    for size in [(24, 24), (40, 52), (97, 61), (7, 30), (200, 13)]:
        expected = resize_logits(torch.from_numpy(maps), size).numpy()
        # torch's float32 kernel itself is ~2.5e-5 off its float64 result at this scale: the two float32
        # versions agree to that rounding (a probability moves by at most a quarter of it)
        np.testing.assert_allclose(resize_bilinear(maps, size), expected, rtol=0, atol=5e-5)


def test_the_runner_imports_only_onnxruntime_numpy_and_pillow():
    """What a site laptop needs: the runner module pulls in no torch, transformers, OpenCV, MLflow or filelock."""
    code = "import sys, drywall_qa.onnx_runtime; print(sorted({name.split('.')[0] for name in sys.modules}))"
    source = Path(__file__).parents[1] / "src"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(source)}
    ).stdout
    heavy = {"torch", "transformers", "cv2", "mlflow", "filelock", "pandas", "scipy"}
    assert "onnxruntime" in loaded and not heavy & set(json.loads(loaded.replace("'", '"')))


def test_bad_models_and_prompts_get_one_clear_error(scratch_export, tmp_path, capsys):
    model, processor, path, _ = scratch_export
    with pytest.raises(OnnxModelError, match=r"prompts \['segment nothing'\] were not exported"):
        onnx_predict_probs(load_onnx_model(path), photos()[:1], ["segment nothing"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="cannot load ONNX model"):
        load_onnx_model(garbage)
    with pytest.raises(OnnxModelError, match="does not exist"):
        load_onnx_model(tmp_path / "missing.onnx")
    InferenceConfig(mode="whole").attach(model)
    try:
        with pytest.raises(OnnxExportError, match="covers inference mode 'resize'"):
            export_onnx(model, processor, tmp_path / "whole.onnx", PROMPTS)
    finally:
        InferenceConfig(flips=("horizontal", "vertical"), sizes=(32, 48)).attach(model)
    assert not (tmp_path / "whole.onnx").exists()
    image = tmp_path / "wall.png"
    photos()[0].save(image)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (
        cli_main(["predict", "--runtime", "onnx", "--model", str(folder), "--out", str(tmp_path / "m"), str(image)])
        == 2
    )
    assert "--runtime onnx takes an .onnx file" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(folder), "--out", str(tmp_path / "model.bin")]) == 2
    assert "--out must name an .onnx file" in capsys.readouterr().err


def test_the_registered_version_carries_the_onnx_export_for_the_pyfunc_and_predict(tmp_path, monkeypatch):
    import base64

    import mlflow
    import pandas as pd

    from drywall_qa.mlflow_model import ModelInputError
    from drywall_qa.registry import CHAMPION_ALIAS, register_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 32, False, prompts=PROMPTS[:2])
    folder = tmp_path / "best"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "photos" / "wall.png"
    image.parent.mkdir()
    photos([(40, 52)])[0].save(image)
    (probs,) = predict_probs(model, processor, [Image.open(image).convert("RGB")], PROMPTS[:2], device="cpu")
    chosen = [round(float(np.quantile(prob, q)), 4) for prob, q in zip(probs, (0.3, 0.8), strict=True)]
    metrics = {"test.miou": 0.4, "threshold.segment_crack": chosen[0], "threshold.segment_wall_crack": chosen[1]}
    metrics["boxes.segment_wall_crack"] = metrics["arms.segment_wall_crack"] = 1
    try:
        with mlflow.start_run(experiment_id=experiment):
            register_checkpoint(folder, metrics, PROMPTS[:2], "drywall-onnx", ["test.*miou"], 0.02, {}, {}, onnx=True)
        version = mlflow.MlflowClient().get_model_version_by_alias("drywall-onnx", CHAMPION_ALIAS)
        assert version.tags["onnx"].startswith("model.onnx (")
        champion = f"models:/drywall-onnx@{CHAMPION_ALIAS}"
        rows = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()] * 2, "prompt": PROMPTS[:2]})
        by_torch = mlflow.pyfunc.load_model(champion).predict(rows)
        onnx_pyfunc = mlflow.pyfunc.load_model(champion, model_config={"runtime": "onnx"})
        assert onnx_pyfunc.unwrap_python_model().runtime == "onnx"
        by_onnx = onnx_pyfunc.predict(rows)
        expected = [binarize(probs[0], chosen[0]), binarize(probs[1], chosen[1], "arms")]
        assert (expected[1] != binarize(probs[1], chosen[1], "boxes")).any()  # so the arms rule is the one applied
        for torch_mask, onnx_mask, mask in zip(by_torch, by_onnx, expected, strict=True):
            np.testing.assert_array_equal(onnx_mask, torch_mask)
            np.testing.assert_array_equal(onnx_mask == 255, mask)

        out = tmp_path / "masks"
        prompts = [arg for prompt in PROMPTS[:2] for arg in ("--prompt", prompt)]
        assert (
            cli_main(["predict", "--runtime", "onnx", "--model", champion, "--out", str(out), *prompts, str(image)])
            == 0
        )
        for prompt, mask in zip(PROMPTS[:2], expected, strict=True):
            np.testing.assert_array_equal(read_mask(out / f"wall__{prompt.replace(' ', '_')}.png"), mask)

        with mlflow.start_run(experiment_id=experiment):  # a version logged without the export
            register_checkpoint(folder, metrics, PROMPTS[:2], "drywall-torch-only", ["test.*miou"], 0.02, {}, {})
        with pytest.raises(ModelInputError, match="logged without an ONNX export"):
            mlflow.pyfunc.load_model("models:/drywall-torch-only/1", model_config={"runtime": "onnx"})
    finally:
        mlflow.set_tracking_uri(None)
