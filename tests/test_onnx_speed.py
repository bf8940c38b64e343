"""What makes the ONNX runner fast (issue 29), checked without timing anything: the export's unmasked
attention is ONNX Runtime's fused op, the runner sends every mirrored view of a side through the graph
in one run, and its pixels (one resize per photo, mirrored after it, a lookup-table normalisation) are
the image processor's pixels of each mirrored photo."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from drywall_qa.inference import InferenceConfig, pixel_values_for, predict_probs
from drywall_qa.model import build_model
from drywall_qa.onnx_export import export_onnx
from drywall_qa.onnx_runtime import OnnxModel, load_onnx_model, mirrored, onnx_predict_probs, pixel_values

PROMPTS = ["segment crack", "segment taping area"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 32, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16])
    InferenceConfig(flips=("horizontal", "vertical"), sizes=(32, 48)).attach(model)
    path = tmp_path_factory.mktemp("onnx-speed") / "model.onnx"
    export_onnx(model, processor, path, PROMPTS)
    return model, processor, path


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((45, 60), (70, 33))]


def test_unmasked_attention_is_exported_as_onnx_runtimes_fused_op(export):
    model, _, path = export
    graph = onnx.load(str(path)).graph
    fused = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    vision_layers = max(model.config.extract_layers) + 1  # encode_images stops after the last extracted layer
    assert len(fused) == vision_layers + len(model.decoder.layers)
    assert {node.domain for node in fused} == {"com.microsoft"}
    # the text encoder's masked attention stays as plain ops: its Softmax is the only one left
    assert sum(node.op_type == "Softmax" for node in graph.node) == model.config.text_config.num_hidden_layers
    # the export leaves the model's own attention as it was
    assert {layer.self_attn.config._attn_implementation for layer in model.decoder.layers} == {"sdpa"}


class CountingSession:
    """An ONNX Runtime session that counts its runs and the images each run gets."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, outputs, feed):
        self.batches.append(len(feed["pixel_values"]))
        return self.session.run(outputs, feed)

    def get_session_options(self):
        return self.session.get_session_options()


def test_the_runner_runs_the_graph_once_per_side_with_all_mirrors(export):
    model, processor, path = export
    loaded = load_onnx_model(path, threads=2)
    counting = CountingSession(loaded.session)
    images = photos()
    got = onnx_predict_probs(OnnxModel(counting, loaded.spec), images, PROMPTS, batch_size=2)
    assert counting.batches == [3 * len(images)] * 2  # sides 32 and 48, each with 3 mirrors of 2 images
    expected = predict_probs(model, processor, images, PROMPTS, device="cpu")
    for want, have in zip(expected, got, strict=True):
        assert np.abs(want - have).max() < 1e-4 and np.array_equal(want >= 0.5, have >= 0.5)


def test_the_lookup_table_normalisation_is_the_image_processors(export):
    _, processor, path = export
    spec = load_onnx_model(path).spec
    images = photos()
    got = pixel_values(spec, images, 48)
    expected = pixel_values_for(processor, images, 48).numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("side", [48, 224, 256])
def test_mirroring_after_the_resize_gives_the_pixels_of_the_mirrored_photo(export, side):
    _, processor, path = export
    spec = load_onnx_model(path).spec
    rng = np.random.default_rng(side)
    sizes = [(640, 640), (480, 640), (1500, 2000), (333, 517), (61, 97)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    flips = [None, "horizontal", "vertical"]
    got = pixel_values(spec, images, side, flips=flips)
    expected = np.concatenate(
        [pixel_values_for(processor, [mirrored(image, flip) for image in images], side).numpy() for flip in flips]
    )
    np.testing.assert_array_equal(got, expected)
