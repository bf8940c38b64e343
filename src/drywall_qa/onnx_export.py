"""Export a trained CLIPSeg checkpoint to one ONNX file that ONNX Runtime runs without PyTorch
(`drywall_qa.onnx_runtime` reads it; `drywall-qa export` writes it).

The graph is the project's inference path, not HF's `forward` (which runs the vision encoder once per
prompt): `pixel_values [B, 3, S, S]` through the vision encoder once (the conv stem included, the
position embeddings interpolated to S), `input_ids`, `attention_mask [P, L]` through the text
encoder, then the decoder once per (image, prompt) pair -> logits `[B, P, S, S]`. Batch, side,
prompt count and token length are dynamic. The metadata entry `drywall_qa` (JSON) carries the
tokenised prompts, the preprocessing, the test-time views and each prompt's mask rule.

It uses `torch.onnx.export(..., dynamo=True)`, PyTorch's documented exporter (it needs `onnxscript`).
Two spots of HF's code would freeze the example's shapes into the graph, so they are written here
with shapes the exporter can keep symbolic (see `model.decoder_logits` and `SegmentationGraph.forward`), and
every export is checked against PyTorch at another batch and side before it is written.

The unmasked attention of the vision encoder and the decoder is written as ONNX Runtime's fused
`com.microsoft.MultiHeadAttention` (see `fused_attention`): exported as plain ops, each decoder layer
would write its `[pairs, heads, tokens, tokens]` scores to memory and read them back through Softmax,
and ONNX Runtime's graph optimiser does not fuse that pattern itself. The file therefore needs ONNX
Runtime (its standard CPU package has the op), not just any ONNX runner.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxscript
import torch
from onnx.defs import OpSchema
from transformers import AttentionInterface, CLIPSegForImageSegmentation, CLIPSegProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from drywall_qa.contracts.atomic import write_bytes_atomic
from drywall_qa.contracts.thresholds import DEFAULT_THRESHOLD
from drywall_qa.errors import DrywallQAError
from drywall_qa.inference import InferenceConfig, model_input_size
from drywall_qa.model import decoder_logits, encode_images, encode_prompts, tokenize_prompts
from drywall_qa.onnx_runtime import METADATA_KEY, SPEC_FORMAT, load_onnx_model

INPUT_NAMES = ["pixel_values", "input_ids", "attention_mask"]
CHECK_TOLERANCE = 1e-3  # largest logit difference the post-export check accepts (float32 kernels differ ~1e-6)


class OnnxExportError(DrywallQAError, ValueError):
    """A model or setting the ONNX export does not cover, or an export that does not match PyTorch."""


@torch.library.custom_op("drywall_qa::multi_head_attention", mutates_args=())
def multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Unmasked attention on `[B, T, heads * D]` projections -> `[B, T, heads * D]`: a single node for the
    exporter to translate (`MULTI_HEAD_ATTENTION`); PyTorch's SDPA where it runs eagerly."""
    batch, tokens, _ = query.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, tokens, heads, -1).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(query), split(key), split(value), scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, -1)


@multi_head_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return torch.empty_like(query)


# onnxscript builds a node from its schema; ONNX's registry knows none of ONNX Runtime's own ops.
MULTI_HEAD_ATTENTION = onnxscript.values.Op(
    onnxscript.values.Opset("com.microsoft", 1),
    "MultiHeadAttention",
    OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "attention heads"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
        ],
    ),
)


def onnx_multi_head_attention(query, key, value, heads: int, scale: float):
    """`multi_head_attention` as ONNX Runtime's op (the exporter's `custom_translation_table`)."""
    return MULTI_HEAD_ATTENTION(query, key, value, num_heads=heads, scale=scale)


FUSED_ATTENTION = "drywall_qa_fused"  # the attention implementation's name in transformers' registry


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (`[B, heads, T, D]` in, `[B, T, heads, D]` out): unmasked
    attention through `multi_head_attention`, anything else through SDPA as before."""
    if attention_mask is not None or getattr(module, "is_causal", False) or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, tokens, width = query.shape

    def merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch, tokens, heads * width)

    scale = float(scaling if scaling is not None else width**-0.5)
    out = torch.ops.drywall_qa.multi_head_attention(merge(query), merge(key), merge(value), heads, scale)
    return out.view(batch, tokens, heads, width), None


AttentionInterface.register(FUSED_ATTENTION, fused_attention)


@contextlib.contextmanager
def fused_attention_layers(model: CLIPSegForImageSegmentation) -> Iterator[None]:
    """The vision encoder's and the decoder's attention as `fused_attention` inside the block (the
    text encoder's, causal and padded, stays as it is)."""
    layers = [*model.clip.vision_model.encoder.layers, *model.decoder.layers]
    configs = list({id(layer.self_attn.config): layer.self_attn.config for layer in layers}.values())
    before = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = FUSED_ATTENTION
        yield
    finally:
        for config, implementation in zip(configs, before, strict=True):
            config._attn_implementation = implementation


class SegmentationGraph(torch.nn.Module):
    """What the ONNX file computes: images and prompts in, logits of every (image, prompt) pair out."""

    def __init__(self, model: CLIPSegForImageSegmentation):
        super().__init__()
        self.model = model
        self.patch = model.config.vision_config.patch_size

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        activations = encode_images(self.model, pixel_values)
        conditional = encode_prompts(self.model, input_ids, attention_mask)
        images, prompts = pixel_values.shape[0], conditional.shape[0]
        # pairs image-major, as predict_probs orders them; expand + flatten rather than
        # repeat_interleave, whose exported form only works at the example's batch size
        paired = [
            layer.unsqueeze(1).expand(-1, prompts, *layer.shape[1:]).flatten(0, 1) for layer in activations
        ]  # token activations [B, T, D], and the skip decoder's stem maps [B, C, h, w]
        paired_conditional = conditional.unsqueeze(0).expand(images, -1, -1).flatten(0, 1)
        logits = decoder_logits(self.model, paired, paired_conditional, pixel_values.shape[-1] // self.patch)
        return logits.reshape(images, prompts, logits.shape[-2], logits.shape[-1])


def export_spec(
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    prompts: Sequence[str],
    thresholds: Mapping[str, float],
    boxed: Mapping[str, str] | None = None,
) -> dict:
    """The metadata the runner needs around the graph; OnnxExportError for what it cannot reproduce."""
    config = InferenceConfig.of(model)
    if config.native:
        raise OnnxExportError(
            f"the ONNX export covers inference mode 'resize'; this checkpoint uses {config.mode!r}, whose "
            "OpenCV resizing and windows the numpy runner does not reproduce"
        )
    images = processor.image_processor
    plain = images.do_resize and images.do_rescale and images.do_normalize and int(images.resample) == 2
    if not plain or getattr(images, "do_center_crop", False) or images.size["height"] != images.size["width"]:
        raise OnnxExportError(
            "the ONNX runner reproduces a square bilinear resize, rescale and normalise; this checkpoint's "
            f"image processor differs ({images.to_dict()})"
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        raise OnnxExportError("the checkpoint's tokenizer has no pad token; prompts of different lengths cannot batch")
    return {
        "format": SPEC_FORMAT,
        "prompts": {prompt: list(tokenizer(prompt)["input_ids"]) for prompt in prompts},
        "pad_token_id": int(tokenizer.pad_token_id),
        "input_size": model_input_size(processor),
        "patch_size": int(model.config.vision_config.patch_size),
        "image_mean": [float(value) for value in images.image_mean],
        "image_std": [float(value) for value in images.image_std],
        "rescale_factor": float(images.rescale_factor),
        "flips": list(config.flips),
        "sizes": list(config.sizes),
        "thresholds": {prompt: float(thresholds.get(prompt, DEFAULT_THRESHOLD)) for prompt in prompts},
        "boxed": sorted(set(boxed or {}) & set(prompts)),  # snapped to boxes, either way
        "arms": sorted(prompt for prompt, snap in (boxed or {}).items() if snap == "arms" and prompt in prompts),
    }


def export_onnx(
    model: CLIPSegForImageSegmentation,
    processor: CLIPSegProcessor,
    out: str | Path,
    prompts: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    boxed: Mapping[str, str] | None = None,
) -> dict:
    """Write the ONNX file to `out` (atomically) and return its spec (see the module docstring)."""
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise OnnxExportError("the export needs at least one prompt")
    spec = export_spec(model, processor, prompts, thresholds or {}, boxed)
    was_training = model.training
    graph = SegmentationGraph(model).eval()
    patch = graph.patch
    # The example's side differs from the position table's: HF looks the table up unchanged at its
    # own side and interpolates it elsewhere, and the exporter keeps only the branch it saw.
    example_side = (model.config.vision_config.image_size // patch + 1) * patch
    # The exporter specialises dimensions of size 1, so the example has 2 images and >= 2 prompts.
    input_ids, attention_mask = tokenize_prompts(processor, (prompts * 2)[: max(2, len(prompts))])
    example = (torch.randn(2, 3, example_side, example_side), input_ids, attention_mask)
    side = patch * torch.export.Dim("patches", min=1, max=4096 // patch)
    prompt_count, tokens = torch.export.Dim("prompts", min=1, max=1024), torch.export.Dim("tokens", min=2, max=77)
    dynamic_shapes = {
        "pixel_values": {0: torch.export.Dim("images", min=1, max=1024), 2: side, 3: side},
        "input_ids": {0: prompt_count, 1: tokens},
        "attention_mask": {0: prompt_count, 1: tokens},
    }
    translations = {torch.ops.drywall_qa.multi_head_attention.default: onnx_multi_head_attention}
    with torch.no_grad(), fused_attention_layers(model):
        program = torch.onnx.export(
            graph, example, dynamo=True, input_names=INPUT_NAMES, output_names=["logits"],
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False, custom_translation_table=translations,
        )  # fmt: skip
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(spec)
    data = proto.SerializeToString()
    check_export(graph, processor, data, prompts, side=example_side + patch)
    model.train(was_training)
    write_bytes_atomic(out, data)
    return spec


def check_export(graph: SegmentationGraph, processor, data: bytes, prompts: Sequence[str], side: int) -> None:
    """ONNX Runtime's logits against PyTorch's for 1 image at a side the export did not see."""
    input_ids, attention_mask = tokenize_prompts(processor, prompts)
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = graph(pixels, input_ids, attention_mask).numpy()
    with tempfile.TemporaryDirectory(prefix="drywall-qa-onnx-check-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        session = load_onnx_model(path).session
        feed = {
            "pixel_values": pixels.numpy(),
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
        }
        (logits,) = session.run(["logits"], feed)
    difference = float(np.abs(logits - expected).max()) if logits.shape == expected.shape else float("inf")
    if not difference <= CHECK_TOLERANCE:
        raise OnnxExportError(
            f"the exported graph's logits differ from PyTorch's by {difference:g} (shape {logits.shape} vs "
            f"{expected.shape}) at {side} px; the export does not reproduce this model"
        )
