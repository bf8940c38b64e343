"""CLIPSeg from HuggingFace `transformers`: building, loading, and the forward pieces training needs.

`CLIPSegForImageSegmentation.forward` runs both CLIP encoders under `torch.no_grad()` and needs one
image per prompt. That is right for a pretrained backbone (the paper trains only the decoder) but
useless from scratch, and it repeats the vision pass for every prompt of an image. So training and
inference call the model's own submodules through three helpers instead:

- `encode_images(model, pixel_values)`: the vision encoder's hidden states at `extract_layers`
  (with gradients when the backbone trains), one pass per image;
- `encode_prompts(model, input_ids, attention_mask)`: the projected text features (the FiLM
  conditioning), with gradients when the backbone trains;
- `decode(model, activations, conditional)`: the decoder, once per (image, prompt) pair; the
  activations of an image are indexed per pair with `pair_activations`, the decoder is cheap.

A model built from scratch can swap the ViT's patchify convolution (one 16x16 stride-16 kernel) for a
convolutional stem (`ConvStem`, after Xiao et al. 2021, "Early convolutions help transformers see
better"): on ~1,500 real photos it learns about 3x faster per epoch. The stem's widths are saved in
the checkpoint's config.json (`conv_stem_channels`) and `load_model` rebuilds it. On a stem, a
`SkipUpsampler` can replace the decoder's transposed convolutions (`skip_decoder_widths`): it adds the
stem's stride-8/4/2 maps back while upsampling, which CLIPSeg's one-step 16x upsampler cannot see.
`decode` runs the decoder through `decoder_logits`, HF's decoder steps with the stem maps passed on.

A model built from scratch gets a genuine offline CLIP tokenizer (byte-level BPE) whose merges make
each word of the configured prompts one token; it is saved with the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessorPil,
)

from drywall_qa.errors import DrywallQAError

# CLIPSeg's published checkpoints normalise with the ImageNet statistics.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_PROMPT_TOKENS = 77  # CLIP's context length; every preset keeps it so any prompt fits

# Architectures for training from scratch. `base` is CIDAS/clipseg-rd64-refined's (ViT-B/16,
# 150,747,746 parameters). `tiny` and `small` are sized for CPU training; `tiny` is the offline
# default and was measured to learn the synthetic masks in a few minutes on 2 cores.
# Keys: vision/text go to the sub-configs, the rest to CLIPSegConfig.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "patch_size": 16,
        },
        "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        "projection_dim": 64,
        "extract_layers": [1, 2, 3],
        "reduce_dim": 64,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 256,
        "use_complex_transposed_convolution": True,
    },
    "small": {
        "vision": {
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "patch_size": 16,
        },
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4},
        "projection_dim": 128,
        "extract_layers": [1, 3, 5],
        "reduce_dim": 64,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 512,
        "use_complex_transposed_convolution": True,
    },
    "base": {  # CLIPSegConfig's defaults are rd64's; rd64-refined adds ViT-B/16 and the complex upsampler
        # Its position table is for 224 px, interpolated for other sizes (rd64-refined runs at 352).
        "vision": {"patch_size": 16, "image_size": 224},
        "text": {},
        "use_complex_transposed_convolution": True,
    },
}


class ModelConfigError(DrywallQAError, ValueError):
    """A preset, image size or weights argument that cannot build a model."""


# ----------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """The words CLIP's pre-tokenizer sees in `prompts` (lower case, letters-only runs), sorted."""
    words = set()
    for prompt in prompts:
        words.update(re.findall(r"[^\W\d_]+", prompt.lower()))
    return sorted(words)


def _tokenizer_from(vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_PROMPT_TOKENS)


def build_tokenizer(prompts: Iterable[str]) -> CLIPTokenizer:
    """A genuine CLIP byte-level BPE tokenizer whose merges make every prompt word a single token.

    Vocabulary layout follows CLIP: the 256 byte symbols, the same with `</w>`, one entry per merge,
    then `<|startoftext|>` and `<|endoftext|>`. Any text still tokenizes (to byte pieces at worst).
    Merges are added word by word at the lowest priority: each new word is first tokenized with the
    merges so far, then its pieces are joined left to right. Lower-priority merges never change how
    an earlier word is tokenized (BPE always applies the highest-priority merge available, and an
    earlier word became one token using earlier merges only), so every word ends as one token.
    """
    symbols = list(bytes_to_unicode().values())
    base_vocab = symbols + [symbol + "</w>" for symbol in symbols]
    merges: list[tuple[str, str]] = []
    merged_tokens: list[str] = []
    for word in prompt_words(prompts):
        vocab = _vocab(base_vocab, merged_tokens)
        pieces = _tokenizer_from(vocab, merges).tokenize(word)
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            merges.append(merge)
            merged_tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    tokenizer = _tokenizer_from(_vocab(base_vocab, merged_tokens), merges)
    for word in prompt_words(prompts):
        if len(tokenizer.tokenize(word)) != 1:  # guards the construction argument above
            raise AssertionError(f"tokenizer construction failed to make {word!r} a single token")
    return tokenizer


def _vocab(base_vocab: list[str], merged_tokens: list[str]) -> dict[str, int]:
    tokens = base_vocab + merged_tokens + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def build_image_processor(
    image_size: int, image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD
) -> ViTImageProcessorPil:
    """CLIPSeg's image processor (ViT's; the PIL backend, no torchvision needed) at `image_size`."""
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear, as CLIPSeg's checkpoints
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


# ----------------------------------------------------------------------------------------------
# Building and loading


class ConvStem(torch.nn.Module):
    """3x3 stride-2 convolutions (BatchNorm, ReLU), one per halving of the patch size, then a 1x1
    projection to the ViT width: `[B, 3, H, W]` -> `[B, hidden, H / patch, W / patch]`, the shape of
    the patch embedding it replaces."""

    def __init__(self, channels: Sequence[int], hidden_size: int):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width_in = 3
        for width in channels:
            layers += [
                torch.nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                torch.nn.BatchNorm2d(width),
                torch.nn.ReLU(inplace=True),
            ]
            width_in = width
        self.layers = torch.nn.Sequential(*layers)
        self.projection = torch.nn.Conv2d(width_in, hidden_size, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:
        # CLIPSegVisionEmbeddings casts its input to `patch_embedding.weight.dtype`
        return self.projection.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layers(pixel_values))

    def pyramid(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each stride-2 layer's output, finest first (strides 2, 4, ..., patch), and the patch
        embedding last: the same numbers `forward` computes, with the intermediate maps kept."""
        maps, x = [], pixel_values
        for start in range(0, len(self.layers), 3):  # conv, BatchNorm, ReLU per halving
            x = self.layers[start : start + 3](x)
            maps.append(x)
        return [*maps, self.projection(x)]


class SkipUpsampler(torch.nn.Module):
    """The decoder's upsampler with skip connections from the conv stem (U-Net style), in place of
    CLIPSeg's transposed convolutions, which upsample the 1/16 token grid in one step and let no
    high-resolution feature reach the mask.

    The token grid goes through a 3x3 convolution to `widths[0]` channels; then, per level, it is
    upsampled x2 (bilinear), the stem's feature map at that stride is added through a 1x1 projection,
    and a 3x3 convolution (ReLU) maps it to the next level's width. Level k works at stride
    patch / 2^(k+1): `widths` [32, 16, 8] on a 4-layer stem reach stride 2, and the 1-channel logits are
    resized bilinearly from there to the input size.

    `project` runs once per image (`encode_images` calls it): the projection does not depend on the
    prompt, and projecting before the maps are repeated per (image, prompt) pair moves 3x fewer
    full-resolution floats than projecting each pair's copy. `forward`: `[pairs, reduce_dim, g, g]`
    tokens and the pairs' projected maps (coarsest first) -> `[pairs, 1, S, S]` logits.

    `side_heads` (deep supervision, Lee et al. 2015, "Deeply-supervised nets"): a 1x1 head per coarser
    level (the token grid's and each level's but the last) whose logits training scores too
    (`train.deep_supervision`), so the stem's skips and the coarse maps get a direct gradient;
    `forward(..., side_outputs=True)` also returns them, each at its own level's resolution.
    Inference does not run them.
    """

    def __init__(self, reduce_dim: int, stem_channels: Sequence[int], widths: Sequence[int], side_heads: bool = False):
        super().__init__()
        widths = [int(width) for width in widths]
        skip_channels = list(stem_channels[:-1])[::-1][: len(widths)]
        self.entry = torch.nn.Conv2d(reduce_dim, widths[0], kernel_size=3, padding=1)
        self.skips = torch.nn.ModuleList(
            torch.nn.Conv2d(channels, width, kernel_size=1)
            for channels, width in zip(skip_channels, widths, strict=True)
        )
        self.blocks = torch.nn.ModuleList(
            torch.nn.Conv2d(width, after, kernel_size=3, padding=1)
            for width, after in zip(widths, [*widths[1:], widths[-1]], strict=True)
        )
        self.head = torch.nn.Conv2d(widths[-1], 1, kernel_size=1)
        # level k's input has widths[k] channels: the entry's output, then each block's but the last
        self.side_heads = (
            torch.nn.ModuleList(torch.nn.Conv2d(width, 1, kernel_size=1) for width in widths) if side_heads else None
        )

    def project(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [project(stem_map) for stem_map, project in zip(maps, self.skips, strict=True)]

    def forward(
        self, tokens: torch.Tensor, skips: Sequence[torch.Tensor], size: tuple[int, int], side_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if side_outputs and self.side_heads is None:
            raise ModelConfigError("this skip decoder has no side heads (built without deep supervision)")
        x = torch.relu(self.entry(tokens))
        sides = []
        for level, (skip, block) in enumerate(zip(skips, self.blocks, strict=True)):
            if side_outputs:
                sides.append(self.side_heads[level](x))
            x = torch.nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.relu(block(x + skip))
        logits = torch.nn.functional.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)
        return (logits, sides) if side_outputs else logits


def check_conv_stem(channels: Sequence[int], patch_size: int) -> list[int]:
    channels = [int(width) for width in channels]
    if not channels or any(width < 1 for width in channels):
        raise ModelConfigError(f"model.conv_stem must list positive channel widths, got {channels!r}")
    if 2 ** len(channels) != patch_size:
        raise ModelConfigError(
            f"model.conv_stem has {len(channels)} stride-2 layers, which downsample by {2 ** len(channels)}, "
            f"not by the patch size {patch_size}"
        )
    return channels


def install_conv_stem(model: CLIPSegForImageSegmentation) -> None:
    """Replace the patch embedding with the `ConvStem` that `config.conv_stem_channels` describes, and
    the decoder's upsampler with a `SkipUpsampler` where `config.skip_decoder_widths` asks for one."""
    channels = check_conv_stem(model.config.conv_stem_channels, model.config.vision_config.patch_size)
    embeddings = model.clip.vision_model.embeddings
    embeddings.patch_embedding = ConvStem(channels, embeddings.embed_dim)
    widths = skip_widths(model.config)
    if widths:
        check_skip_decoder(widths, channels)
        side_heads = bool(getattr(model.config, "skip_decoder_side_heads", False))
        model.decoder.transposed_convolution = SkipUpsampler(model.config.reduce_dim, channels, widths, side_heads)


def skip_widths(config: CLIPSegConfig) -> list[int]:
    """The skip decoder's widths per level (`config.skip_decoder_widths`), [] for CLIPSeg's own upsampler."""
    return list(getattr(config, "skip_decoder_widths", None) or [])


def check_skip_decoder(widths: Sequence[int], conv_stem: Sequence[int] | None) -> list[int]:
    widths = [int(width) for width in widths]
    if any(width < 1 for width in widths):
        raise ModelConfigError(f"model.skip_decoder must list positive channel widths, got {widths!r}")
    if not conv_stem:
        raise ModelConfigError(
            "model.skip_decoder reads the conv stem's stride-2/4/8 features: set model.conv_stem (scratch models only)"
        )
    if len(widths) >= len(conv_stem):
        raise ModelConfigError(
            f"model.skip_decoder has {len(widths)} levels; a {len(conv_stem)}-layer conv stem has "
            f"{len(conv_stem) - 1} feature maps finer than its patch grid"
        )
    return widths


def scratch_config(
    preset: str,
    image_size: int,
    tokenizer: CLIPTokenizer,
    conv_stem: Sequence[int] | None = None,
    skip_decoder: Sequence[int] | None = None,
    side_heads: bool = False,
) -> CLIPSegConfig:
    if preset not in PRESETS:
        raise ModelConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = json.loads(json.dumps(PRESETS[preset]))  # deep copy
    vision = spec.pop("vision")
    text = spec.pop("text")
    patch = vision.get("patch_size", 32)
    if image_size % patch:
        raise ModelConfigError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    vision.setdefault("image_size", image_size)  # the position table; other sizes are interpolated
    # `base` keeps CLIP's 49,408-token embedding table (its parameter count is the architecture's);
    # the small presets size it to the generated vocabulary.
    text.setdefault("vocab_size", 49408 if preset == "base" else len(tokenizer))
    if len(tokenizer) > text["vocab_size"]:
        raise ModelConfigError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {text['vocab_size']}")
    # CLIP pools the text at the first eos token: the ids must be the tokenizer's.
    text.update(
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if conv_stem:
        spec["conv_stem_channels"] = check_conv_stem(conv_stem, patch)
    if skip_decoder:
        spec["skip_decoder_widths"] = check_skip_decoder(skip_decoder, conv_stem)
    if side_heads:
        if not skip_decoder:
            raise ModelConfigError("deep supervision's side heads sit on the skip decoder: set model.skip_decoder")
        spec["skip_decoder_side_heads"] = True
    return CLIPSegConfig(text_config=text, vision_config=vision, **spec)


def build_model(
    preset: str,
    weights: str | Path | None,
    image_size: int,
    freeze_backbone: bool,
    *,
    prompts: Sequence[str] = (),
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
    conv_stem: Sequence[int] | None = None,
    skip_decoder: Sequence[int] | None = None,
    side_heads: bool = False,
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """A CLIPSeg model and its processor.

    `weights`: a Hub id (e.g. `CIDAS/clipseg-rd64-refined`) or a local `save_pretrained` folder, whose
    architecture and processor win over `preset`; or None to build `preset` from scratch with an
    offline tokenizer that makes each word of `prompts` one token and a processor normalising with
    `image_mean`/`image_std` (training passes its images' statistics). The processor resizes images
    to `image_size`. `freeze_backbone`: True trains only the decoder (CLIP encoders get
    `requires_grad=False`). `conv_stem`: channel widths of a `ConvStem` for a scratch model (a saved
    folder keeps the stem it was trained with); `skip_decoder`: the widths of a `SkipUpsampler` on it,
    with deep supervision's `side_heads` when asked.
    """
    if weights and skip_decoder:
        raise ModelConfigError(
            "model.skip_decoder needs a conv stem, which only a scratch model has; a pretrained patch "
            "embedding computes no stride-2/4/8 features"
        )
    if weights:
        model, processor = load_model(weights)
        processor.image_processor.size = {"height": image_size, "width": image_size}
        patch = model.config.vision_config.patch_size
        if image_size % patch:
            raise ModelConfigError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    else:
        tokenizer = build_tokenizer(prompts)
        model = CLIPSegForImageSegmentation(
            scratch_config(preset, image_size, tokenizer, conv_stem, skip_decoder, side_heads)
        )
        if getattr(model.config, "conv_stem_channels", None):
            install_conv_stem(model)
        reset_decoder_projections(model)
        processor = CLIPSegProcessor(
            image_processor=build_image_processor(image_size, image_mean, image_std), tokenizer=tokenizer
        )
    set_backbone_trainable(model, trainable=not freeze_backbone)
    return model, processor


def reset_decoder_projections(model: CLIPSegForImageSegmentation) -> None:
    """Give the decoder's FiLM, reduce and upsampling layers PyTorch's default init.

    HF initialises them with std `initializer_factor` (1.0): harmless for published checkpoints,
    which overwrite them, but from scratch it gives mask logits of about +-1000 and a BCE in the
    hundreds at step 0. The decoder's transformer layers keep HF's (scaled) init.
    """
    decoder = model.decoder
    for module in [decoder.film_mul, decoder.film_add, *decoder.reduces, *decoder.transposed_convolution.modules()]:
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            module.reset_parameters()


def load_model(path_or_id: str | Path) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """A saved model (local `save_pretrained` folder or Hub id) and its processor, in eval mode. A
    folder saved with a conv stem gets it back: the model is built from its config, the stem
    installed, then every saved tensor loaded (strictly: a missing or extra key is an error)."""
    config = CLIPSegConfig.from_pretrained(str(path_or_id))
    if getattr(config, "conv_stem_channels", None):
        model = CLIPSegForImageSegmentation(config)
        install_conv_stem(model)
        model.load_state_dict(_saved_state(Path(path_or_id)), strict=True)
    else:
        model = CLIPSegForImageSegmentation.from_pretrained(str(path_or_id))
    processor = CLIPSegProcessor.from_pretrained(str(path_or_id))
    model.eval()
    return model, processor


def reloaded(
    model: CLIPSegForImageSegmentation, processor: CLIPSegProcessor
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """The model and processor saved and loaded back (same weights, RNG untouched).

    transformers adds defaults to what it loads (`dtype` in config.json, `is_local` and padding
    keys in tokenizer_config.json), so a new model saves other bytes than the same model loaded from
    a checkpoint. Training starts from the reloaded model: a run resumed from `last/` and one that
    never stopped then save identical files.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="drywall-qa-reload-") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        loaded, loaded_processor = load_model(folder)
    loaded.train(model.training)
    return loaded, loaded_processor


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelConfigError(f"{folder} has a conv-stem config but no model.safetensors")
    return load_file(weights)


def set_backbone_trainable(model: CLIPSegForImageSegmentation, trainable: bool) -> None:
    """Freeze or unfreeze both CLIP encoders; the decoder always trains."""
    model.clip.requires_grad_(trainable)
    model.decoder.requires_grad_(True)


def backbone_is_frozen(model: CLIPSegForImageSegmentation) -> bool:
    return not any(parameter.requires_grad for parameter in model.clip.parameters())


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Forward pieces


def encode_images(model: CLIPSegForImageSegmentation, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Vision hidden states after each layer in `config.extract_layers`, in that order ([B, T, D] each),
    then, for a skip decoder, its projections of the conv stem's maps (`SkipUpsampler.project`).

    Runs the vision encoder's own modules, stopping after the last extracted layer (the rest only
    feeds CLIP's pooled image embedding, which segmentation does not use). Gradients flow when the
    vision encoder is trainable and grad mode is on.
    """
    vision = model.clip.vision_model
    extract_layers = list(model.config.extract_layers)
    trainable = any(p.requires_grad for p in vision.parameters())
    levels = len(skip_widths(model.config))
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        stem_maps = []
        if levels:
            hidden, stem_maps = stem_embeddings(vision.embeddings, pixel_values, levels)
        else:
            hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        outputs = {}
        for index, layer in enumerate(vision.encoder.layers[: max(extract_layers) + 1]):
            hidden = layer(hidden, None)
            outputs[index] = hidden
    skips = model.decoder.transposed_convolution.project(stem_maps) if levels else []  # the decoder's: it trains
    return [outputs[index] for index in extract_layers] + skips


def stem_embeddings(embeddings, pixel_values: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF's `CLIPSegVisionEmbeddings.forward` (positions interpolated) on a `ConvStem`, with the stem's
    `levels` finest-but-one maps kept for the skip decoder, coarsest first (strides 8, 4, 2)."""
    *maps, patches = embeddings.patch_embedding.pyramid(pixel_values.to(embeddings.patch_embedding.weight.dtype))
    batch, _, height, width = pixel_values.shape
    tokens = torch.cat([embeddings.class_embedding.expand(batch, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + embeddings.interpolate_pos_encoding(tokens, height, width)
    return tokens, maps[:-1][::-1][:levels]


def encode_prompts(
    model: CLIPSegForImageSegmentation, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected text features `[P, projection_dim]`: the decoder's FiLM conditioning."""
    trainable = any(p.requires_grad for p in model.clip.text_model.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
        return model.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def tokenize_prompts(processor: CLIPSegProcessor, prompts: Sequence[str], device: torch.device | str = "cpu"):
    """`(input_ids, attention_mask)` for `prompts`, padded to the longest."""
    backend = processor.tokenizer.backend_tokenizer
    padding_before = backend.padding
    encoded = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
    if padding_before is None:
        # transformers leaves padding switched on in the backend tokenizer, and a checkpoint saved
        # afterwards would record it: a resumed run would then save other bytes than a fresh one
        backend.no_padding()
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def pair_activations(activations: Sequence[torch.Tensor], image_index: torch.Tensor) -> list[torch.Tensor]:
    """Each image's activations repeated for its (image, prompt) pairs: row k is image `image_index[k]`."""
    return [layer.index_select(0, image_index) for layer in activations]


# The decoder's per-token MLP (reduce_dim -> decoder_intermediate_size -> reduce_dim) and its ReLU are
# memory-bound on a CPU: decoding many pairs at once streams a [pairs x tokens x intermediate] tensor
# through memory several times. Chunks whose intermediate stays cache-sized (4M floats) decode the
# `base` preset 1.3-1.6x faster per pair on this 2-core machine (bench/bench_train.py) with the same
# results up to float rounding. GPUs want the whole batch in one call.
DECODER_CHUNK_ELEMENTS = 1 << 22


def decoder_chunk_pairs(model: CLIPSegForImageSegmentation, tokens: int, device: torch.device) -> int | None:
    """Pairs per decoder call on `device`: None (all at once) off the CPU."""
    if device.type != "cpu":
        return None
    return max(1, DECODER_CHUNK_ELEMENTS // (tokens * model.config.decoder_intermediate_size))


def decode(
    model: CLIPSegForImageSegmentation,
    activations: Sequence[torch.Tensor],
    conditional: torch.Tensor,
    chunk_pairs: int | str | None = "auto",
    side_outputs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Mask logits `[N, H, W]` for N pairs: activations and conditional embeddings row-aligned.

    `chunk_pairs`: pairs per decoder call; "auto" picks `decoder_chunk_pairs` for the device, None decodes
    all pairs in one call. Every pair is decoded independently, so chunking changes no result.
    `side_outputs`: also the skip decoder's side logits (`SkipUpsampler`, deep supervision), one
    `[N, h, w]` tensor per coarser level: `(logits, sides)`.
    """
    pairs = conditional.shape[0]
    if activations[0].shape[0] != pairs:
        raise ValueError(f"{activations[0].shape[0]} activation rows but {pairs} conditional embeddings")
    if chunk_pairs == "auto":
        chunk_pairs = decoder_chunk_pairs(model, activations[0].shape[1], activations[0].device)
    side = math.isqrt(activations[0].shape[1] - 1)  # the token grid's (square) side, class token aside
    if chunk_pairs is None or chunk_pairs >= pairs:
        return decoder_logits(model, activations, conditional, side, side_outputs)
    chunks = [
        decoder_logits(
            model,
            [layer[start : start + chunk_pairs] for layer in activations],
            conditional[start : start + chunk_pairs],
            side,
            side_outputs,
        )
        for start in range(0, pairs, chunk_pairs)
    ]
    if not side_outputs:
        return torch.cat(chunks)
    levels = zip(*(sides for _, sides in chunks), strict=True)  # every chunk has one side logit per level
    return torch.cat([logits for logits, _ in chunks]), [torch.cat(level) for level in levels]


def decoder_logits(
    model: CLIPSegForImageSegmentation,
    activations: Sequence[torch.Tensor],
    conditional: torch.Tensor,
    side: int,
    side_outputs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """`CLIPSegDecoder.forward` (transformers 5) with the token grid's `side` given, and the skip
    decoder's stem maps (the activations after the extracted layers') passed to its upsampler
    (with `side_outputs`, its side logits too: see `decode`).

    HF computes the side as `int(math.sqrt(tokens))`, a Python int that the ONNX exporter would freeze
    to its example's side; with it given, this is the one decoder path for training, inference and
    the export (the same operations in the same order as HF's: the same numbers, tests/test_model.py).
    """
    decoder = model.decoder
    layers = len(decoder.layers)
    tokens, skips = activations[:layers], activations[layers:]
    output = None
    for index, (activation, layer, reduce) in enumerate(
        zip(tokens[::-1], decoder.layers, decoder.reduces, strict=True)
    ):
        output = reduce(activation) if output is None else reduce(activation) + output
        if index == decoder.conditional_layer:  # FiLM: the prompt scales and shifts every token
            output = decoder.film_mul(conditional) * output.permute(1, 0, 2) + decoder.film_add(conditional)
            output = output.permute(1, 0, 2)
        output = layer(output, attention_mask=None)
    output = output[:, 1:, :].transpose(1, 2)  # drop the class token: [pairs, reduce_dim, tokens]
    output = output.reshape(conditional.shape[0], output.shape[1], side, side)
    if side_outputs:
        if not skips:
            raise ModelConfigError("side outputs come from the skip decoder's side heads; this model has none")
        pixels = side * model.config.vision_config.patch_size
        logits, sides = decoder.transposed_convolution(output, skips, (pixels, pixels), side_outputs=True)
        return logits.squeeze(1), [level.squeeze(1) for level in sides]
    if skips:
        pixels = side * model.config.vision_config.patch_size
        return decoder.transposed_convolution(output, skips, (pixels, pixels)).squeeze(1)
    return decoder.transposed_convolution(output).squeeze(1)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `[N, h, w]` logits to `size` (no-op when equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return torch.nn.functional.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
