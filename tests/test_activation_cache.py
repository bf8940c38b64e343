"""Activation cache: cached views decode like uncached ones; the key follows weights and preprocessing."""

from __future__ import annotations

import pytest
import torch
from test_train import make_manifest, run_training, tiny_config

from drywall_qa.activation_cache import ActivationCache, vision_weights_hash
from drywall_qa.contracts.manifest import image_records, prompts_by_dataset, read_manifest
from drywall_qa.data import SegmentationDataset, collate_pairs
from drywall_qa.model import build_model, decode, encode_images, encode_prompts, pair_activations, tokenize_prompts


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def frozen_setup(tmp_path, image_size=32, mean=(0.5, 0.5, 0.5), augment=True):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    torch.manual_seed(0)
    model, processor = build_model(
        "tiny", None, image_size, freeze_backbone=True, prompts=["segment crack", "segment taping area"]
    )
    model.eval()
    dataset = SegmentationDataset(
        image_records(rows, "train", tmp_path),
        prompts_by_dataset(rows),
        image_size,
        mean,
        [0.2] * 3,
        augment=augment,
        negative_prompts=True,
        seed=0,
        views=3,
    )
    return model, processor, dataset


def logits_for(model, processor, dataset, batch, activations):
    input_ids, attention_mask = tokenize_prompts(processor, dataset.prompt_list)
    conditional = encode_prompts(model, input_ids, attention_mask)[batch["prompt_index"]]
    return decode(model, pair_activations(activations, batch["image_index"]), conditional)


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_and_uncached_views_give_the_same_logits(tmp_path, on_disk):
    model, processor, dataset = frozen_setup(tmp_path)
    cache = ActivationCache(model, tmp_path / "cache" if on_disk else None)
    batch = collate_pairs([dataset.load(index, view=2) for index in (0, 6, 3)])
    with torch.no_grad():
        uncached = logits_for(model, processor, dataset, batch, encode_images(model, batch["pixel_values"]))
        first = cache.activations_for(model, batch, dataset, torch.device("cpu"))
        assert (cache.hits, cache.misses) == (0, 3)
        again = cache.activations_for(model, batch, dataset, torch.device("cpu"))
        assert (cache.hits, cache.misses) == (3, 3)
        cached = logits_for(model, processor, dataset, batch, again)
    for computed, read in zip(first, again, strict=True):
        assert torch.equal(computed, read)  # a miss returns the fp16-rounded values a hit will return
    torch.testing.assert_close(cached, uncached, atol=2e-2, rtol=1e-2)  # fp16 storage
    if on_disk:
        assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
        fresh = ActivationCache(model, tmp_path / "cache")  # another process reads the same files
        fresh.activations_for(model, batch, dataset, torch.device("cpu"))
        assert (fresh.hits, fresh.misses) == (3, 0)


def test_cache_key_changes_with_weights_preprocessing_view_and_image(tmp_path):
    model, _, dataset = frozen_setup(tmp_path)
    cache = ActivationCache(model)
    preprocessing = dataset.preprocessing_fingerprint()
    key = cache.key(dataset.image_hash(0), preprocessing, 1)
    assert key == ActivationCache(model).key(dataset.image_hash(0), preprocessing, 1)
    assert key != cache.key(dataset.image_hash(0), preprocessing, 2)
    assert key != cache.key(dataset.image_hash(1), preprocessing, 1)

    _, _, resized = frozen_setup(tmp_path / "b", image_size=48)
    _, _, renormalised = frozen_setup(tmp_path / "c", mean=(0.4, 0.5, 0.5))
    _, _, unaugmented = frozen_setup(tmp_path / "d", augment=False)
    for other in (resized, renormalised, unaugmented):
        assert cache.key(dataset.image_hash(0), other.preprocessing_fingerprint(), 1) != key

    decoder_trained = model.decoder.film_add.bias.data.add_(1.0)  # the decoder does not affect the cache
    assert decoder_trained is not None and vision_weights_hash(model) == cache.weights_hash
    with torch.no_grad():
        model.clip.vision_model.encoder.layers[0].mlp.fc1.bias[0] += 1e-3
    assert ActivationCache(model).key(dataset.image_hash(0), preprocessing, 1) != key


def test_cache_refuses_a_trainable_backbone():
    model, _ = build_model("tiny", None, 32, freeze_backbone=False, prompts=["segment crack"])
    with pytest.raises(ValueError, match="frozen backbone"):
        ActivationCache(model)


def test_frozen_training_uses_the_cache_and_cycles_views(tmp_path):
    make_manifest(tmp_path)
    config = tiny_config(freeze_backbone=True, epochs=4, cached_views=2)
    summary = run_training(tmp_path, config, cache_dir=tmp_path / "cache")
    # 10 train images x 2 views + 4 val images are computed once; every later epoch reads them.
    assert summary["activation_cache_misses"] == 10 * 2 + 4
    assert summary["activation_cache_hits"] == 4 * (10 + 4) - (10 * 2 + 4)
    assert summary["trainable_params"] < summary["params"]
    again = run_training(tmp_path, config, out="again", cache_dir=tmp_path / "cache")
    assert again["activation_cache_misses"] == 0  # same weights (seeded init), same views: all on disk
    assert again["best_val_miou"] == pytest.approx(summary["best_val_miou"], abs=1e-6)
