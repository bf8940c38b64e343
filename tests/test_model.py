"""CLIPSeg building, offline tokenizer, freeze policy, shared vision pass and batched inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer

from drywall_qa.inference import pixel_values_for, predict_probs, select_device
from drywall_qa.model import (
    ModelConfigError,
    SkipUpsampler,
    build_image_processor,
    build_model,
    build_tokenizer,
    count_parameters,
    decode,
    decoder_chunk_pairs,
    encode_images,
    encode_prompts,
    load_model,
    pair_activations,
    prompt_words,
    resize_logits,
    tokenize_prompts,
)

PROMPTS = ["segment crack", "segment wall crack", "segment taping area", "segment joint/tape", "segment drywall seam"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny(image_size: int = 64, freeze: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", None, image_size, freeze, prompts=PROMPTS)


def save_foreign_checkpoint(folder) -> CLIPSegForImageSegmentation:
    """A randomly initialised CLIPSeg built straight from transformers (a stand-in for a Hub
    checkpoint): 3 vision layers of which only the first two are extracted."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer(PROMPTS)
    config = CLIPSegConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "patch_size": 16,
            "image_size": 64,
        },
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(config)
    model.save_pretrained(folder)
    CLIPSegProcessor(image_processor=build_image_processor(64), tokenizer=tokenizer).save_pretrained(folder)
    return model


def test_base_preset_has_the_rd64_refined_parameter_count():
    model, processor = build_model("base", None, 352, freeze_backbone=True, prompts=PROMPTS)
    assert count_parameters(model) == 150_747_746
    assert count_parameters(model, trainable_only=True) == count_parameters(model.decoder)
    assert model.config.vision_config.patch_size == 16
    assert model.config.use_complex_transposed_convolution is True
    assert list(model.config.extract_layers) == [3, 6, 9]
    assert processor.image_processor.size == {"height": 352, "width": 352}


@pytest.mark.slow
def test_base_trains_one_step_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, processor = build_model("base", None, 224, freeze_backbone=False, prompts=PROMPTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values = torch.randn(1, 3, 224, 224)
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:1])
    logits = decode(model, encode_images(model, pixel_values), encode_prompts(model, input_ids, attention_mask))
    assert logits.shape == (1, 224, 224)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    optimizer.step()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, _ = load_model(tmp_path)
    assert count_parameters(reloaded) == 150_747_746
    for (name, saved), loaded in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(saved, loaded), name


def test_tokenizer_makes_prompt_words_single_tokens_and_survives_a_round_trip(tmp_path):
    model, processor = tiny()
    tokenizer = processor.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    for word in prompt_words(PROMPTS):
        assert len(tokenizer.tokenize(word)) == 1, word
    encoded = tokenizer("segment joint/tape")["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id
    assert len(encoded) == 6  # bos segment joint / tape eos
    # CLIP pools the text at the eos token: the model must use the tokenizer's ids.
    text_config = model.config.text_config
    assert (text_config.bos_token_id, text_config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert text_config.vocab_size == len(tokenizer)

    processor.save_pretrained(tmp_path)
    restored = CLIPSegProcessor.from_pretrained(tmp_path)
    texts = PROMPTS + ["Segment the HOLE, please!", "ünïcode wall"]  # unseen words fall back to byte pieces
    before = processor.tokenizer(texts, padding=True)["input_ids"]
    after = restored.tokenizer(texts, padding=True)["input_ids"]
    assert before == after
    assert restored.tokenizer.decode(after[3], skip_special_tokens=True) == "segment joint / tape"
    assert restored.image_processor.size == {"height": 64, "width": 64}
    assert list(restored.image_processor.image_mean) == list(processor.image_processor.image_mean)


def test_frozen_backbone_gets_no_gradients_and_scratch_backbone_does():
    for freeze in (True, False):
        model, processor = tiny(freeze=freeze)
        input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:2])
        activations = encode_images(model, torch.randn(2, 3, 64, 64))
        logits = decode(model, activations, encode_prompts(model, input_ids, attention_mask))
        logits.mean().backward()
        clip_grads = [p.grad for p in model.clip.parameters()]
        decoder_grads = [p.grad for p in model.decoder.parameters()]
        assert all(g is not None for g in decoder_grads)
        if freeze:
            assert all(not p.requires_grad for p in model.clip.parameters())
            assert all(g is None for g in clip_grads)
        else:
            vision = model.clip.vision_model
            assert vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
            assert vision.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
            assert model.clip.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_scratch_decoder_starts_with_moderate_logits():
    model, processor = tiny()
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:1])
    with torch.no_grad():
        logits = decode(
            model, encode_images(model, torch.randn(1, 3, 64, 64)), encode_prompts(model, input_ids, attention_mask)
        )
    # HF's own init of the decoder (std 1.0) starts at |logits| ~ 1000; training could not recover quickly.
    assert logits.abs().max() < 20


def test_shared_vision_pass_equals_the_hf_forward_per_pair(tmp_path):
    save_foreign_checkpoint(tmp_path)
    model, processor = build_model("tiny", tmp_path, 64, freeze_backbone=True)
    model.eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(2)]
    prompts = PROMPTS[:3]
    pixel_values = pixel_values_for(processor, images)
    input_ids, attention_mask = tokenize_prompts(processor, prompts)
    with torch.no_grad():
        # HF: one vision pass per (image, prompt) pair
        reference = model(
            input_ids=input_ids.repeat(2, 1),
            attention_mask=attention_mask.repeat(2, 1),
            pixel_values=pixel_values.repeat_interleave(3, dim=0),
        ).logits
        # ours: one vision pass per image, activations indexed per pair
        activations = encode_images(model, pixel_values)
        assert len(activations) == 2  # extract_layers [0, 1]: the third layer is never run
        conditional = encode_prompts(model, input_ids, attention_mask).repeat(2, 1)
        ours = decode(model, pair_activations(activations, torch.arange(2).repeat_interleave(3)), conditional)
    assert ours.shape == reference.shape == (6, 64, 64)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_chunked_decoding_gives_the_logits_of_one_decoder_call():
    model, processor = build_model("tiny", None, 64, freeze_backbone=True, prompts=PROMPTS)
    model.eval()
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS)
    with torch.no_grad():
        activations = encode_images(model, torch.randn(3, 3, 64, 64))
        image_index = torch.arange(3).repeat_interleave(len(PROMPTS))
        pairs = pair_activations(activations, image_index)
        conditional = encode_prompts(model, input_ids, attention_mask).repeat(3, 1)
        whole = decode(model, pairs, conditional, chunk_pairs=None)
        for chunk_pairs in (1, 4, 7, 100):
            torch.testing.assert_close(
                decode(model, pairs, conditional, chunk_pairs=chunk_pairs), whole, atol=1e-5, rtol=1e-5
            )
    assert whole.shape == (3 * len(PROMPTS), 64, 64)


def test_decoder_chunks_are_cache_sized_on_cpu_and_whole_elsewhere():
    model = CLIPSegForImageSegmentation.__new__(CLIPSegForImageSegmentation)  # only its config is read
    model.config = CLIPSegConfig()  # rd64's decoder: intermediate size 2048
    tokens = (352 // 16) ** 2 + 1
    chunk = decoder_chunk_pairs(model, tokens, torch.device("cpu"))
    assert chunk == 4  # 485 tokens x 2048 intermediate floats per pair: 4 pairs stay under 4M floats
    assert decoder_chunk_pairs(model, tokens, torch.device("cuda")) is None


def test_build_model_from_a_local_checkpoint_keeps_its_weights_and_resizes_the_processor(tmp_path):
    original = save_foreign_checkpoint(tmp_path)
    model, processor = build_model("base", tmp_path, 96, freeze_backbone=False)  # the folder wins over the preset
    assert count_parameters(model) == count_parameters(original)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert processor.image_processor.size == {"height": 96, "width": 96}
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ModelConfigError, match="multiple of the patch size"):
        build_model("tiny", tmp_path, 100, freeze_backbone=False)


def test_unknown_preset_and_bad_image_size_fail_clearly():
    with pytest.raises(ModelConfigError, match="unknown model preset 'huge'"):
        build_model("huge", None, 224, False)
    with pytest.raises(ModelConfigError, match="multiple of the patch size"):
        build_model("tiny", None, 200, False)


def test_predict_probs_returns_probabilities_at_each_original_size():
    model, processor = tiny()
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)),  # greyscale
        Image.fromarray(rng.integers(0, 255, (90, 30, 4), dtype=np.uint8), "RGBA"),
    ]
    probs = predict_probs(model, processor, images, PROMPTS[:2], device="cpu", batch_size=2)
    assert [p.shape for p in probs] == [(2, 40, 50), (2, 64, 64), (2, 90, 30)]
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in probs)
    assert model.training  # the caller's mode is restored

    # Same numbers as decoding the image alone and resizing its logits; batching does not matter.
    single = predict_probs(model, processor, images[:1], PROMPTS[:2], device="cpu", batch_size=1)[0]
    np.testing.assert_allclose(single, probs[0], atol=1e-5)
    with torch.no_grad():
        model.eval()
        input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:2])
        activations = encode_images(model, pixel_values_for(processor, images[:1]))
        logits = decode(
            model,
            pair_activations(activations, torch.zeros(2, dtype=torch.long)),
            encode_prompts(model, input_ids, attention_mask),
        )
        expected = torch.sigmoid(resize_logits(logits, (40, 50))).numpy()
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)


def test_predict_probs_rejects_empty_prompts_and_select_device_honours_a_choice():
    model, processor = tiny()
    with pytest.raises(ValueError, match="at least one prompt"):
        predict_probs(model, processor, [Image.new("RGB", (8, 8))], [], device="cpu")
    assert select_device("cpu").type == "cpu"
    assert select_device().type in {"cuda", "mps", "cpu"}


def test_conv_stem_replaces_patchify_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 16, 32, 32])
    embedding = model.clip.vision_model.embeddings.patch_embedding
    assert not isinstance(embedding, torch.nn.Conv2d)
    assert embedding(torch.zeros(1, 3, 64, 96)).shape == (1, model.config.vision_config.hidden_size, 4, 6)
    plain, _ = tiny()
    assert count_parameters(model) != count_parameters(plain)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    model.eval()
    pixels = torch.randn(2, 3, 64, 80)
    for ours, theirs in zip(encode_images(model, pixels), encode_images(loaded, pixels), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a saved folder is also a starting point for training: its stem comes with it
    resumed, _ = build_model("tiny", tmp_path, 64, False)
    assert type(resumed.clip.vision_model.embeddings.patch_embedding) is type(embedding)


def test_the_projects_decoder_path_gives_hfs_decoder_numbers():
    """`decode` runs `decoder_logits` (one path for training, inference and the ONNX export) instead of
    `CLIPSegDecoder.forward`: on a plain model it must give the same bits."""
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16])
    model.eval()
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:2])
    with torch.no_grad():
        activations = pair_activations(encode_images(model, torch.randn(3, 3, 64, 64)), torch.arange(3).repeat(2))
        conditional = encode_prompts(model, input_ids, attention_mask).repeat_interleave(3, 0)
        ours = decode(model, activations, conditional, chunk_pairs=None)
        hfs = model.decoder(list(activations), conditional).logits
    assert torch.equal(ours, hfs)


def test_skip_decoder_reads_the_stem_maps_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model, processor = build_model(
        "tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], skip_decoder=[16, 8, 8]
    )
    model.eval()
    pixels = torch.randn(2, 3, 64, 64)
    activations = encode_images(model, pixels)
    # the 3 extracted token layers, then the stem's maps at strides 8, 4 and 2, projected to the widths
    assert [tuple(a.shape[1:]) for a in activations[3:]] == [(16, 8, 8), (8, 16, 16), (8, 32, 32)]
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:2])
    with torch.no_grad():
        conditional = encode_prompts(model, input_ids, attention_mask).repeat(2, 1)
        logits = decode(model, pair_activations(activations, torch.arange(2).repeat_interleave(2)), conditional)
    assert logits.shape == (4, 64, 64)  # the input's resolution, from stride-2 features

    # the maps reach the mask: changing the finest one changes the logits, and nothing else does
    paired = pair_activations(activations, torch.arange(2).repeat_interleave(2))
    with torch.no_grad():
        nudged = decode(model, [*paired[:-1], paired[-1] + 1.0], conditional)
    assert (nudged - logits).abs().max() > 1e-4

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["skip_decoder_widths"] == [16, 8, 8]
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded.decoder.transposed_convolution, SkipUpsampler)
    with torch.no_grad():
        again = decode(
            loaded, pair_activations(encode_images(loaded, pixels), torch.arange(2).repeat_interleave(2)), conditional
        )
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_side_heads_give_one_logit_map_per_coarser_level_and_leave_the_mask_as_it_was(tmp_path):
    """Deep supervision's side heads: one logit map per level below the output (strides 16, 8, 4 for
    widths [16, 8, 8] on a 64 px input), the same from chunked and whole decodes; the main logits do
    not depend on them, they survive save and load, and a decoder without them refuses to give any."""
    torch.manual_seed(0)
    model, processor = build_model(
        "tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], skip_decoder=[16, 8, 8], side_heads=True
    )
    model.eval()
    pixels = torch.randn(2, 3, 64, 64)
    input_ids, attention_mask = tokenize_prompts(processor, PROMPTS[:2])
    with torch.no_grad():
        paired = pair_activations(encode_images(model, pixels), torch.arange(2).repeat_interleave(2))
        conditional = encode_prompts(model, input_ids, attention_mask).repeat(2, 1)
        logits, sides = decode(model, paired, conditional, chunk_pairs=None, side_outputs=True)
        chunked_logits, chunked_sides = decode(model, paired, conditional, chunk_pairs=3, side_outputs=True)
        plain = decode(model, paired, conditional, chunk_pairs=None)
    assert [tuple(side.shape) for side in sides] == [(4, 4, 4), (4, 8, 8), (4, 16, 16)]
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    torch.testing.assert_close(chunked_logits, logits)
    for chunked, whole in zip(chunked_sides, sides, strict=True):
        torch.testing.assert_close(chunked, whole)
    with torch.no_grad():
        for head in model.decoder.transposed_convolution.side_heads:
            head.weight.add_(1.0)
        assert torch.equal(decode(model, paired, conditional, chunk_pairs=None), plain)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["skip_decoder_side_heads"] is True
    loaded, _ = load_model(tmp_path)
    with torch.no_grad():
        _, loaded_sides = decode(loaded, paired, conditional, chunk_pairs=None, side_outputs=True)
    assert not torch.equal(loaded_sides[0], sides[0])  # the nudged heads were saved and loaded back

    without, _ = build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], skip_decoder=[16])
    with pytest.raises(ModelConfigError, match="no side heads"), torch.no_grad():
        decode(
            without,
            pair_activations(encode_images(without, pixels), torch.arange(2)),
            conditional[:2],
            side_outputs=True,
        )
    with pytest.raises(ModelConfigError, match="set model.skip_decoder"):
        build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], side_heads=True)


def test_skip_decoder_needs_a_stem_with_enough_maps():
    with pytest.raises(ModelConfigError, match="set model.conv_stem"):
        build_model("tiny", None, 64, False, prompts=PROMPTS, skip_decoder=[16])
    with pytest.raises(ModelConfigError, match="has 3 feature maps finer than its patch grid"):
        build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 8, 16, 16], skip_decoder=[8, 8, 8, 8])
    with pytest.raises(ModelConfigError, match="only a scratch model has"):
        build_model("tiny", "CIDAS/clipseg-rd64-refined", 64, False, skip_decoder=[16])


def test_conv_stem_must_downsample_by_the_patch_size():
    with pytest.raises(ModelConfigError, match="downsample by 4, not by the patch size 16"):
        build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 16])
    with pytest.raises(ModelConfigError, match="positive channel widths"):
        build_model("tiny", None, 64, False, prompts=PROMPTS, conv_stem=[8, 0, 16, 16])
