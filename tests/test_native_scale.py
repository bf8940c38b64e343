"""Native-scale training and full-resolution inference: crops at the photo's scale, whole-photo and
sliding-window masks, and one inference setting shared by validation, evaluation, predict and the
pyfunc because it travels in the checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import PROMPTS, make_manifest, run_training, tiny_config, tiny_params

from drywall_qa.contracts.manifest import image_records, prompts_by_dataset, read_manifest
from drywall_qa.data import (
    CropConfig,
    ResizeAugment,
    SegmentationDataset,
    build_augmentation,
    build_crop_augmentation,
    size_grouped_batches,
)
from drywall_qa.inference import (
    CONFIG_KEY,
    InferenceConfig,
    InferenceConfigError,
    native_logits,
    predict_probs,
    window_starts,
    working_size,
)
from drywall_qa.model import build_model, encode_prompts, load_model, tokenize_prompts
from drywall_qa.params import ParamsError
from drywall_qa.training.config import TrainConfig
from drywall_qa.training.forward import inference_of

ALL_PROMPTS = [prompt for dataset in sorted(PROMPTS) for prompt in PROMPTS[dataset]]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_inference_config_validates_and_defaults_to_resize():
    assert InferenceConfig.from_params(None) == InferenceConfig(mode="resize", scale=1.0, overlap=0.5)
    assert InferenceConfig.from_params({"mode": "whole", "scale": "0.75"}).scale == 0.75
    with pytest.raises(InferenceConfigError, match="mode must be one of"):
        InferenceConfig.from_params({"mode": "tiles"})
    with pytest.raises(InferenceConfigError, match="overlap"):
        InferenceConfig.from_params({"mode": "sliding", "overlap": 1.0})
    with pytest.raises(InferenceConfigError, match="unknown inference params"):
        InferenceConfig.from_params({"mode": "whole", "window": 224})
    with pytest.raises(InferenceConfigError, match="numbers"):
        InferenceConfig.from_params({"mode": "whole", "scale": "big"})


def test_working_size_rounds_to_patches_and_windows_cover_the_image():
    assert working_size(640, 640, 0.75, 16) == (480, 480)
    assert working_size(100, 37, 1.0, 16) == (96, 32)
    assert working_size(5, 5, 1.0, 16) == (16, 16)
    for length, window, overlap in [(480, 224, 0.5), (640, 224, 0.25), (224, 224, 0.5), (100, 224, 0.5)]:
        starts = window_starts(length, window, overlap)
        covered = np.zeros(length, bool)
        for start in starts:
            covered[start : start + window] = True
        assert covered.all() and starts[0] == 0 and starts[-1] + min(window, length) == length
    assert window_starts(480, 224, 0.5) == [0, 112, 224, 256]


def test_sliding_windows_equal_one_pass_when_one_window_covers_the_image():
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 32, False, prompts=ALL_PROMPTS)
    model.eval()
    input_ids, attention_mask = tokenize_prompts(processor, ALL_PROMPTS)
    with torch.no_grad():
        conditional = encode_prompts(model, input_ids, attention_mask)
        pixels = torch.randn(2, 3, 64, 96)
        whole = native_logits(model, pixels, conditional, InferenceConfig(mode="whole"), window=32)
        sliding = native_logits(model, pixels, conditional, InferenceConfig(mode="sliding", overlap=0.5), window=32)
        one_window = native_logits(
            model, pixels[..., :32, :32], conditional, InferenceConfig(mode="sliding"), window=32
        )
        reference = native_logits(model, pixels[..., :32, :32], conditional, InferenceConfig(mode="whole"), window=32)
    assert whole.shape == sliding.shape == (2, len(ALL_PROMPTS), 64, 96)
    torch.testing.assert_close(one_window, reference)
    assert not torch.allclose(whole, sliding)  # windows see other context than one whole-image pass


def test_crops_have_the_model_size_and_seek_foreground():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[150:160, 250:260] = 255  # a small object in one corner
    empty = np.zeros_like(mask)
    seeking = build_crop_augmentation(64, CropConfig(scale_jitter=(0.8, 1.2), foreground_prob=1.0))
    uniform = build_crop_augmentation(64, CropConfig(scale_jitter=(1.0, 1.0), foreground_prob=0.0))
    hits = {"seeking": 0, "uniform": 0}
    for trial in range(40):
        for name, augmentation in (("seeking", seeking), ("uniform", uniform)):
            augmentation.set_random_seed(trial)
            out = augmentation(image=image, masks=[mask, empty])
            assert out["image"].shape == (64, 64, 3) and all(m.shape == (64, 64) for m in out["masks"])
            assert not out["masks"][1].any()  # an empty (negative-prompt) mask stays empty
            assert set(np.unique(out["masks"][0]).tolist()) <= {0, 255}
            hits[name] += bool(out["masks"][0].any())
    assert hits["seeking"] == 40 and hits["uniform"] < 20
    with pytest.raises(ValueError, match="crop_foreground_prob"):
        CropConfig(scale_jitter=(1.0, 1.0), foreground_prob=1.5)
    with pytest.raises(ValueError, match="crop_scale_jitter"):
        CropConfig(scale_jitter=(1.5, 1.0), foreground_prob=0.5)


def test_resize_augmentation_strength_zooms_and_jitters_colour_but_keeps_masks_binary():
    image = np.full((96, 96, 3), (180, 170, 160), np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[40:56, 10:86] = 255
    mild = build_augmentation(ResizeAugment())
    strong = build_augmentation(ResizeAugment(scale=(0.5, 2.0), color=0.4))
    colour_change = {"mild": [], "strong": []}
    area_change = {"mild": [], "strong": []}
    for trial in range(30):
        for name, augmentation in (("mild", mild), ("strong", strong)):
            augmentation.set_random_seed(trial)
            out = augmentation(image=image, masks=[mask])
            assert out["image"].shape == image.shape and out["masks"][0].shape == mask.shape
            assert set(np.unique(out["masks"][0]).tolist()) <= {0, 255}
            centre = out["image"][40:56, 40:56].reshape(-1, 3).astype(float).mean(0)
            colour_change[name].append(np.abs(centre - image[0, 0]).max())
            area_change[name].append(abs(np.count_nonzero(out["masks"][0]) / np.count_nonzero(mask) - 1))
    # the mild default only nudges brightness (5%); colour jitter 0.4 moves colours far more often
    assert sum(c > 25 for c in colour_change["strong"]) > 10 and max(colour_change["mild"]) < 25
    assert max(area_change["strong"]) > max(area_change["mild"]) + 0.3  # zoom 0.5-2 resizes the mask's area
    with pytest.raises(ValueError, match="augment_scale"):
        ResizeAugment(scale=(1.1, 1.3))
    with pytest.raises(ValueError, match="augment_color"):
        ResizeAugment(color=0.8)


def test_native_dataset_crops_for_training_and_keeps_whole_images_for_validation(tmp_path):
    make_manifest(tmp_path, size=64)  # images 64 x 72
    rows = read_manifest(tmp_path / "manifest.csv")
    prompts = prompts_by_dataset(rows)
    records = image_records(rows, "train", tmp_path)
    crop = CropConfig(scale_jitter=(0.9, 1.1), foreground_prob=0.7)
    train_set = SegmentationDataset(
        records,
        prompts,
        32,
        [0.5] * 3,
        [0.2] * 3,
        augment=True,
        negative_prompts=True,
        seed=0,
        working_scale=1.0,
        crop=crop,
        patch_size=16,
    )
    item = train_set[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["masks"].shape[-2:] == (32, 32)
    val_set = SegmentationDataset(
        image_records(rows, "val", tmp_path),
        prompts,
        32,
        [0.5] * 3,
        [0.2] * 3,
        augment=False,
        negative_prompts=True,
        seed=0,
        working_scale=0.5,
        patch_size=16,
    )
    item = val_set[0]
    assert item["pixel_values"].shape == (3, 32, 32)  # 64 x 72 at 0.5 -> 32 x 36 -> patch multiples 32 x 32
    assert val_set.item_size(0) == (32, 32)
    assert sorted(i for batch in size_grouped_batches(val_set, 3) for i in batch) == list(range(len(val_set)))
    with pytest.raises(ValueError, match="CropConfig"):
        SegmentationDataset(
            records, prompts, 32, [0.5] * 3, [0.2] * 3, augment=True, negative_prompts=True, seed=0, working_scale=1.0
        )


def test_config_reads_inference_and_crop_params():
    params = tiny_params(
        inference={"mode": "whole", "scale": 0.75, "overlap": 0.5},
        crop_scale_jitter=[0.7, 1.4],
        crop_foreground_prob=0.7,
    )
    config = TrainConfig.from_params(params)
    assert inference_of(config) == InferenceConfig("whole", 0.75, 0.5) and config.train.crop_scale_jitter == [
        0.7,
        1.4,
    ]
    with pytest.raises(ParamsError, match="inference.mode"):
        TrainConfig.from_params({**params, "inference": {"mode": "tiles"}})
    with pytest.raises(ParamsError, match="crop_scale_jitter"):
        TrainConfig.from_params({**params, "train": {**params["train"], "crop_scale_jitter": 0.5}})
    with pytest.raises(ParamsError, match="crop_foreground_prob"):
        TrainConfig.from_params({**params, "train": {**params["train"], "crop_foreground_prob": 2}})
    assert (config.train.augment_scale, config.train.augment_color) == ([0.9, 1.1], 0.0)  # absent: the mild default
    strong = TrainConfig.from_params(
        {**params, "train": {**params["train"], "augment_scale": [0.75, 1.33], "augment_color": 0.3}}
    )
    assert (strong.train.augment_scale, strong.train.augment_color) == ([0.75, 1.33], 0.3)
    with pytest.raises(ParamsError, match="augment_color"):
        TrainConfig.from_params({**params, "train": {**params["train"], "augment_color": -0.1}})


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_native_training_saves_its_inference_setting_and_predicts_at_full_size(tmp_path, mode):
    make_manifest(tmp_path, size=64)
    config = tiny_config(
        epochs=2,
        inference={"mode": mode, "scale": 1.0, "overlap": 0.5},
        crop_scale_jitter=(0.8, 1.25),
        crop_foreground_prob=0.7,
    )
    summary = run_training(tmp_path, config)
    assert summary["epochs_run"] == 2 and 0 <= summary["best_val_miou"] <= 1
    best = tmp_path / "out" / "models" / "best"
    assert json.loads((best / "config.json").read_text())[CONFIG_KEY] == {
        "mode": mode,
        "scale": 1.0,
        "overlap": 0.5,
        "flips": [],
        "sizes": [],
    }
    model, processor = load_model(best)
    assert InferenceConfig.of(model).mode == mode
    image = Image.open(tmp_path / "images" / "cracks00.png").convert("RGB")
    (probs,) = predict_probs(model, processor, [image], ALL_PROMPTS, device="cpu")
    assert probs.shape == (len(ALL_PROMPTS), 64, 72) and ((probs >= 0) & (probs <= 1)).all()
    # Another image size in the same batch takes its own pass, with the same result as alone.
    small = image.resize((40, 33))
    both = predict_probs(model, processor, [image, small], ALL_PROMPTS, device="cpu")
    assert both[1].shape == (len(ALL_PROMPTS), 33, 40)
    np.testing.assert_allclose(both[0], probs, atol=1e-5)


def test_a_pretrained_folder_takes_the_same_native_pipeline_at_its_own_input_size(tmp_path):
    """`model.weights` = a local save_pretrained folder (a tiny random CLIPSeg standing in for
    CIDAS/clipseg-rd64-refined): trains on crops of its input size, predicts at full size."""
    make_manifest(tmp_path, size=64)
    torch.manual_seed(0)
    pretrained, processor = build_model("tiny", None, 48, False, prompts=ALL_PROMPTS)
    folder = tmp_path / "pretrained"
    pretrained.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = tiny_config(
        epochs=1,
        weights=str(folder),
        image_size=32,
        freeze_backbone=True,
        inference={"mode": "whole", "scale": 1.0},
        crop_foreground_prob=1.0,
    )
    summary = run_training(tmp_path, config)
    assert summary["weights_init"] == str(folder) and summary["frozen_backbone"]
    model, processor = load_model(tmp_path / "out" / "models" / "best")
    assert processor.image_processor.size == {"height": 32, "width": 32}  # its own input size, the crop's
    assert InferenceConfig.of(model) == InferenceConfig(mode="whole", scale=1.0)
    image = Image.open(tmp_path / "images" / "taping00.png").convert("RGB")
    (probs,) = predict_probs(model, processor, [image], ALL_PROMPTS, device="cpu")
    assert probs.shape == (len(ALL_PROMPTS), 64, 72)


def test_a_checkpoint_without_a_setting_uses_resize(tmp_path):
    model, processor = build_model("tiny", None, 32, False, prompts=ALL_PROMPTS)
    assert InferenceConfig.of(model) == InferenceConfig()
    replace(InferenceConfig(), mode="whole").attach(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert InferenceConfig.of(loaded).mode == "whole"


def _logit(probs: np.ndarray) -> np.ndarray:
    return np.log(probs) - np.log1p(-probs)


def test_test_time_views_average_mirrored_and_resized_passes(tmp_path):
    """`inference.flips` / `inference.sizes`: each view's logits, mirrored back, are averaged. So with
    a left-right view the masks of a mirrored photo are the mirrored masks, and two sizes give the
    mean of the logits of each size alone."""
    torch.manual_seed(0)
    model, processor = build_model("tiny", None, 32, False, prompts=ALL_PROMPTS)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def probs(config: InferenceConfig, photo: Image.Image) -> np.ndarray:
        config.attach(model)
        return predict_probs(model, processor, [photo], ALL_PROMPTS, device="cpu")[0]

    plain = probs(InferenceConfig(), image)
    assert not np.allclose(
        probs(InferenceConfig(), mirror)[..., ::-1], plain, atol=1e-4
    )  # the model alone is not symmetric
    flipped = InferenceConfig(flips=("horizontal",))
    both = probs(flipped, image)
    np.testing.assert_allclose(probs(flipped, mirror)[..., ::-1], both, atol=1e-5)
    expected = (_logit(plain) + _logit(probs(InferenceConfig(), mirror))[..., ::-1]) / 2
    np.testing.assert_allclose(_logit(both), expected, atol=1e-3)

    np.testing.assert_array_equal(probs(InferenceConfig(sizes=(32,)), image), plain)  # the input size = no view
    two_sizes = probs(InferenceConfig(sizes=(32, 48)), image)
    at_48 = probs(InferenceConfig(sizes=(48,)), image)
    assert two_sizes.shape == (len(ALL_PROMPTS), 40, 56) and not np.allclose(at_48, plain, atol=1e-4)
    np.testing.assert_allclose(_logit(two_sizes), (_logit(plain) + _logit(at_48)) / 2, atol=1e-3)
    assert InferenceConfig(flips=("horizontal", "vertical"), sizes=(32, 48)).views == 6


def test_test_time_views_are_checked_and_travel_in_the_checkpoint():
    with pytest.raises(InferenceConfigError, match="inference.flips"):
        InferenceConfig.from_params({"flips": ["diagonal"]})
    with pytest.raises(InferenceConfigError, match="mode resize only"):
        InferenceConfig.from_params({"mode": "whole", "sizes": [256]})
    with pytest.raises(InferenceConfigError, match="inference.sizes"):
        InferenceConfig.from_params({"sizes": [8]})
    model, _ = build_model("tiny", None, 32, False, prompts=ALL_PROMPTS)
    views = InferenceConfig.from_params({"flips": ["vertical"], "sizes": [48]})
    views.attach(model)
    model.config = type(model.config).from_dict(json.loads(model.config.to_json_string()))  # as load_model reads it
    assert InferenceConfig.of(model) == views
