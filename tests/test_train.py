"""Training: loss goes down, outputs and checkpoints are written, a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from drywall_qa.contracts.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    image_records,
    prompts_by_dataset,
    read_manifest,
)
from drywall_qa.data import SegmentationDataset, channel_statistics, collate_pairs
from drywall_qa.model import (
    build_model,
    decode,
    encode_images,
    encode_prompts,
    load_model,
    pair_activations,
    tokenize_prompts,
)
from drywall_qa.params import ModelParams, ParamsError
from drywall_qa.training.checkpoint import (
    HISTORY_COLUMNS,
    OPTIMIZER_FILE,
    read_state,
    recover_checkpoints,
    save_checkpoint,
)
from drywall_qa.training.config import TrainConfig, TrainConfigError
from drywall_qa.training.loop import resumable_run_id, train, warmup_warning
from drywall_qa.training.losses import pair_scores, segmentation_loss

PROMPTS = {"cracks": ["segment crack", "segment wall crack"], "taping": ["segment taping area"]}


def make_manifest(root: Path, per_dataset: int = 8, size: int = 48, seed: int = 0) -> Path:
    """A tiny manifest: textured grey images with a dark rectangle (cracks) or a bright band (taping);
    the mask is that shape, one {0, 255} PNG per prompt. Splits: 5 train, 2 val, rest test."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, prompts in PROMPTS.items():
        for index in range(per_dataset):
            image_id = f"{dataset}{index:02d}"
            pixels = rng.integers(110, 150, (size, size + 8, 3)).astype(np.uint8)
            mask = np.zeros((size, size + 8), np.uint8)
            top, left = rng.integers(2, size // 2, 2)
            if dataset == "cracks":
                mask[top : top + size // 3, left : left + 5] = 255
                pixels[mask > 0] = 30
            else:
                mask[top : top + 10, :] = 255
                pixels[mask > 0] = 230
            image_path = root / "images" / f"{image_id}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(image_path)
            split = "train" if index < 5 else "val" if index < 7 else "test"
            for prompt in prompts:
                mask_path = root / "masks" / f"{image_id}__{prompt.replace(' ', '_')}.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask, "L").save(mask_path)
                rows.append(
                    {
                        "dataset": dataset,
                        "split": split,
                        "image_id": image_id,
                        "image_path": image_path.relative_to(root).as_posix(),
                        "mask_path": mask_path.relative_to(root).as_posix(),
                        "prompt": prompt,
                        "group": image_id,
                        "width": size + 8,
                        "height": size,
                        "source_split": "train",
                    }
                )
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def tiny_params(**changes) -> dict:
    """Tiny training params; `changes` are `seed`, `lr`, `inference` (a section) or keys of the model or train section."""
    params = {
        "seed": 3,
        "lr": 5e-4,
        "model": {"weights": None, "preset": "tiny", "image_size": 32, "freeze_backbone": False},
        "train": {
            "epochs": 3,
            "batch_size": 4,
            "weight_decay": 1e-4,
            "scheduler": "cosine",
            "warmup_epochs": 1,
            "early_stopping_patience": 10,
            "grad_clip": 1.0,
            "bce_weight": 1.0,
            "dice_weight": 1.0,
            "negative_prompts": True,
            "augment": True,
            "cache_activations": True,
            "cached_views": 2,
            "num_threads": 1,
        },
    }
    for key, value in changes.items():
        if key in ("seed", "lr", "inference"):
            params[key] = value
        elif key in ModelParams.model_fields:
            params["model"][key] = value
        else:
            params["train"][key] = value
    return params


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig.from_params(tiny_params(**changes))


def run_training(root: Path, config: TrainConfig, out: str = "out", **kwargs) -> dict:
    return train(
        config,
        root / "manifest.csv",
        root / out / "models",
        root / out / "train.json",
        root / out / "history.csv",
        root=root,
        progress=False,
        log=kwargs.pop("log", lambda _: None),
        **kwargs,
    )


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_dataset_pairs_each_image_with_its_prompts_and_empty_negatives(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    prompts = prompts_by_dataset(rows)
    records = image_records(rows, "train", tmp_path)
    assert len(records) == 10 and records[0].prompts == ("segment crack", "segment wall crack")
    dataset = SegmentationDataset(
        records, prompts, 32, [0.5] * 3, [0.2] * 3, augment=False, negative_prompts=True, seed=0
    )
    item = dataset[0]  # a cracks image
    assert item["pixel_values"].shape == (3, 32, 32)
    assert [dataset.prompt_list[i] for i in item["prompt_index"]] == [
        "segment crack",
        "segment wall crack",
        "segment taping area",
    ]
    assert item["positive"].tolist() == [True, True, False]
    assert item["masks"][0].sum() > 0 and item["masks"][2].sum() == 0
    # the dark rectangle is where the mask is
    darkness = item["pixel_values"].mean(0)
    assert darkness[item["masks"][0] > 0].mean() < darkness[item["masks"][0] == 0].mean() - 1
    batch = collate_pairs([dataset[0], dataset[9]])
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["masks"].shape == (6, 32, 32)


def test_sampled_prompts_train_one_own_and_one_negative_pair_and_cover_every_prompt(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    records = image_records(rows, "train", tmp_path)
    prompts = prompts_by_dataset(rows)
    sampled = SegmentationDataset(
        records, prompts, 32, [0.5] * 3, [0.2] * 3, augment=True, negative_prompts=True, seed=0, sample_prompts=True
    )
    full = SegmentationDataset(records, prompts, 32, [0.5] * 3, [0.2] * 3, augment=True, negative_prompts=True, seed=0)
    seen = set()
    for epoch in range(12):
        sampled.set_epoch(epoch)
        full.set_epoch(epoch)
        item, everything = sampled[0], full[0]  # a cracks image
        names = [sampled.prompt_list[i] for i in item["prompt_index"]]
        assert item["positive"].tolist() == [True, False]  # one of its own prompts, then one negative
        assert names[0] in ("segment crack", "segment wall crack") and names[1] == "segment taping area"
        # the same pixels and, for the kept pairs, the same masks as the full item of that epoch
        assert torch.equal(item["pixel_values"], everything["pixel_values"])
        kept = [everything["prompt_index"].tolist().index(i) for i in item["prompt_index"].tolist()]
        assert torch.equal(item["masks"], everything["masks"][kept])
        seen.add(names[0])
    assert seen == {"segment crack", "segment wall crack"}  # over the epochs every synonym gets its turn
    sampled.set_epoch(3)
    assert torch.equal(sampled[0]["prompt_index"], sampled[0]["prompt_index"])  # seeded: the same draw again


def test_training_with_sampled_prompts_validates_every_pair(tmp_path):
    make_manifest(tmp_path)
    summary = run_training(tmp_path, tiny_config(epochs=2, sample_prompts=True))
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert len(history) == 2 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert summary["val_images"] == 4 and 0 <= summary["best_val_miou"] <= 1


def test_augmented_views_are_reproducible_and_cycle(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    dataset = SegmentationDataset(
        image_records(rows, "train", tmp_path),
        prompts_by_dataset(rows),
        32,
        [0.5] * 3,
        [0.2] * 3,
        augment=True,
        negative_prompts=False,
        seed=0,
        views=2,
    )
    views = [dataset.load(1, view) for view in range(3)]
    again = dataset.load(1, 1)
    assert torch.equal(views[1]["pixel_values"], again["pixel_values"])
    assert torch.equal(views[1]["masks"], again["masks"])
    assert not torch.equal(views[0]["pixel_values"], views[1]["pixel_values"])
    dataset.set_epoch(3)
    assert dataset.current_view() == 1 and torch.equal(dataset[1]["pixel_values"], views[1]["pixel_values"])
    # a view belongs to the image, not to its position in the split
    records = image_records(rows, "train", tmp_path)
    reordered = SegmentationDataset(
        records[::-1],
        prompts_by_dataset(rows),
        32,
        [0.5] * 3,
        [0.2] * 3,
        augment=True,
        negative_prompts=False,
        seed=0,
        views=2,
    )
    assert torch.equal(reordered.load(len(records) - 2, 1)["pixel_values"], views[1]["pixel_values"])


def test_bad_masks_and_missing_images_fail_with_the_file_named(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    records = image_records(rows, "train", tmp_path)
    Image.fromarray(np.full((48, 56), 7, np.uint8), "L").save(next(iter(records[0].mask_paths.values())))
    dataset = SegmentationDataset(
        records, prompts_by_dataset(rows), 32, [0.5] * 3, [0.2] * 3, augment=False, negative_prompts=False, seed=0
    )
    with pytest.raises(ManifestError, match=r"cracks00__segment_crack\.png has values \[7\]"):
        dataset[0]
    records[1].image_path.unlink()
    with pytest.raises(ManifestError, match=r"cannot read image .*cracks01\.png"):
        dataset[1]
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_channel_statistics_measure_the_training_images(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    mean, std = channel_statistics(image_records(rows, "train", tmp_path), 32)
    assert all(0.4 < value < 0.7 for value in mean)
    assert all(0.05 < value < 0.4 for value in std)


def test_loss_and_scores():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1
    perfect = torch.where(masks > 0, 20.0, -20.0)
    assert segmentation_loss(perfect, masks, 1, 1) < 1e-3
    assert segmentation_loss(-perfect, masks, 1, 1) > 10
    iou, dice = pair_scores(perfect, masks)
    assert iou.tolist() == [1.0, 1.0] and dice.tolist() == [1.0, 1.0]  # empty vs empty counts as 1
    half = torch.where(masks > 0, 20.0, -20.0)
    half[0, :2] = -20.0
    iou, dice = pair_scores(half, masks)
    assert iou[0].item() == pytest.approx(0.5) and dice[0].item() == pytest.approx(2 / 3)
    noisy = torch.full((1, 8, 8), 5.0)
    assert pair_scores(noisy, torch.zeros(1, 8, 8))[0].item() == 0.0


def test_a_few_steps_on_a_tiny_model_reduce_the_loss(tmp_path):
    make_manifest(tmp_path)
    rows = read_manifest(tmp_path / "manifest.csv")
    records = image_records(rows, "train", tmp_path)
    torch.manual_seed(0)
    mean, std = channel_statistics(records, 32)
    model, processor = build_model(
        "tiny", None, 32, False, prompts=["segment crack", "segment taping area"], image_mean=mean, image_std=std
    )
    dataset = SegmentationDataset(
        records, prompts_by_dataset(rows), 32, mean, std, augment=False, negative_prompts=True, seed=0
    )
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    input_ids, attention_mask = tokenize_prompts(processor, dataset.prompt_list)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        conditional = encode_prompts(model, input_ids, attention_mask)[batch["prompt_index"]]
        activations = pair_activations(encode_images(model, batch["pixel_values"]), batch["image_index"])
        return segmentation_loss(decode(model, activations, conditional), batch["masks"], 1.0, 1.0)

    first = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first


def test_train_writes_metrics_history_and_checkpoints(tmp_path):
    make_manifest(tmp_path)
    messages: list[str] = []
    rows_seen: list[dict] = []
    summary = run_training(tmp_path, tiny_config(), on_epoch=rows_seen.append, log=messages.append)
    out = tmp_path / "out"
    assert summary["epochs_run"] == 3 and summary["weights_init"] == "scratch:tiny"
    assert summary["device"] == "cpu" and summary["train_images"] == 10 and summary["val_images"] == 4
    assert json.loads((out / "train.json").read_text()) == summary
    with open(out / "history.csv", encoding="utf-8") as handle:
        history = list(csv.DictReader(handle))
    assert list(history[0]) == HISTORY_COLUMNS and [row["epoch"] for row in history] == ["1", "2", "3"]
    best_row = max(history, key=lambda row: float(row["val_miou"]))
    assert summary["best_val_miou"] == pytest.approx(float(best_row["val_miou"]), rel=1e-5)
    assert [row["epoch"] for row in rows_seen] == [1, 2, 3] and "val_negative_iou" in rows_seen[0]
    assert any("normalising with the train images' mean" in message for message in messages)
    for name in ("best", "last"):
        folder = out / "models" / name
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert read_state(folder)["fingerprint"] == read_state(out / "models" / "last")["fingerprint"]
    assert (out / "models" / "last" / "optimizer_state.pt").is_file()
    assert not (out / "models" / "best" / "optimizer_state.pt").exists()
    assert read_state(out / "models" / "best")["epoch"] == summary["best_epoch"]
    assert read_state(out / "models" / "last")["complete"] is True
    assert sorted(p.name for p in (out / "models").iterdir()) == ["best", "last"]  # no temp folders left


class Killed(Exception):
    """Stands in for SIGKILL: raised by the epoch callback after the checkpoint of epoch 2."""


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_killed_run_resumes_from_last_and_ends_like_an_uninterrupted_one(tmp_path, ema_decay):
    make_manifest(tmp_path)
    config = tiny_config(epochs=3, ema_decay=ema_decay)  # the weight average resumes too
    uninterrupted = run_training(tmp_path, config, out="a")

    def kill_after_epoch_2(row: dict) -> None:
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_training(tmp_path, config, out="b", on_epoch=kill_after_epoch_2, tracking_run_id="run-of-b")
    last = tmp_path / "b" / "models" / "last"
    assert read_state(last)["epoch"] == 2 and read_state(last)["complete"] is False
    # the stage continues the killed run's MLflow run; other params would start fresh (no run to continue)
    assert resumable_run_id(config, tmp_path / "manifest.csv", tmp_path / "b" / "models") == "run-of-b"
    assert resumable_run_id(config.changed(lr=1e-3), tmp_path / "manifest.csv", tmp_path / "b" / "models") is None

    messages: list[str] = []
    resumed = run_training(tmp_path, config, out="b", log=messages.append)
    assert any("resuming from last/ after epoch 2" in message for message in messages)
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3
    for key in ("best_epoch", "best_val_miou", "best_val_dice", "final_train_loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-6), key
    history_a = (tmp_path / "a" / "history.csv").read_text().splitlines()
    history_b = (tmp_path / "b" / "history.csv").read_text().splitlines()
    strip_seconds = lambda lines: [line.rsplit(",", 1)[0] for line in lines]  # noqa: E731
    assert strip_seconds(history_a) == strip_seconds(history_b)


def test_changed_params_start_fresh_instead_of_resuming(tmp_path):
    make_manifest(tmp_path)
    with pytest.raises(Killed):
        run_training(tmp_path, tiny_config(), on_epoch=lambda row: (_ for _ in ()).throw(Killed()))
    messages: list[str] = []
    summary = run_training(tmp_path, tiny_config(lr=1e-3, epochs=1), log=messages.append)
    assert any("other params or another manifest; starting fresh" in message for message in messages)
    assert summary["resumed_from_epoch"] == 0 and summary["epochs_run"] == 1


def test_checkpoint_swap_is_atomic_and_an_interrupted_swap_is_recovered(tmp_path):
    model, processor = build_model("tiny", None, 32, False, prompts=["segment crack"])
    models = tmp_path / "models"
    save_checkpoint(models, "last", model, processor, {"epoch": 1})
    save_checkpoint(models, "last", model, processor, {"epoch": 2})
    assert read_state(models / "last")["epoch"] == 2
    assert sorted(p.name for p in models.iterdir()) == ["last"]
    # A kill between "rename old away" and "rename new in": only .last.old and a temp folder exist.
    (models / "last").rename(models / ".last.old")
    (models / ".last.tmp-abc").mkdir()
    (models / ".last.tmp-abc" / "config.json").write_text("{")
    recover_checkpoints(models, log=lambda _: None)
    assert sorted(p.name for p in models.iterdir()) == ["last"]
    assert read_state(models / "last")["epoch"] == 2


def test_config_from_params_coerces_and_validates():
    params = tiny_params(lr="5e-05", cache_activations=True)  # as PyYAML 1.1 once read `5e-05`
    config = TrainConfig.from_params(params)
    assert config.lr == 5e-5 and config.weights_init == "scratch:tiny" and not config.uses_cache
    with pytest.raises(ParamsError, match="train.scheduler must be 'cosine' or 'constant', got 'step'"):
        TrainConfig.from_params({**params, "train": {**params["train"], "scheduler": "step"}})
    with pytest.raises(ParamsError, match="train.batch_size is missing"):
        TrainConfig.from_params({**params, "train": {"epochs": 1}})


def test_pyfunc_model_predicts_binary_masks_from_paths_and_base64(tmp_path, monkeypatch):
    from drywall_qa.mlflow_model import LOCAL_PATHS_ENV, ImageInputError, log_pyfunc_model

    monkeypatch.setenv(LOCAL_PATHS_ENV, "1")  # this local Python call opts in to reading paths
    make_manifest(tmp_path)
    run_training(tmp_path, tiny_config(epochs=1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc_model(tmp_path / "out" / "models" / "best", registered_model_name="drywall-test")
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    image_path = tmp_path / "images" / "cracks00.png"
    import base64

    encoded = base64.b64encode(image_path.read_bytes()).decode()
    frame = pd.DataFrame(
        {
            "image": [str(image_path), str(image_path), encoded],
            "prompt": ["segment crack", "segment taping area", "segment crack"],
        }
    )
    masks = loaded.predict(frame)
    assert len(masks) == 3
    for mask in masks:
        assert mask.shape == (48, 56) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
    np.testing.assert_array_equal(masks[0], masks[2])  # path and base64 of the same file
    everything = loaded.predict(frame.iloc[:1], params={"threshold": 0.0})[0]
    assert (everything == 255).all()
    assert mlflow.MlflowClient().get_registered_model("drywall-test").name == "drywall-test"
    with pytest.raises(mlflow.exceptions.MlflowException, match="neither an existing file nor base64") as error:
        loaded.predict(pd.DataFrame({"image": ["/no/such/file.png"], "prompt": ["segment crack"]}))
    assert isinstance(error.value.__cause__, ImageInputError) and error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_served_pyfunc_reads_only_base64_unless_local_paths_are_opted_in(tmp_path, monkeypatch):
    """Under `mlflow models serve` a client must not make the server read or probe its own files."""
    from drywall_qa.mlflow_model import LOCAL_PATHS_ENV, ImageInputError, decode_image

    monkeypatch.delenv(LOCAL_PATHS_ENV, raising=False)
    existing = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(existing)
    messages = []
    for value in (str(existing), str(tmp_path / "missing.png"), "/etc/hostname"):
        with pytest.raises(ImageInputError, match=f"not base64-encoded image bytes .*{LOCAL_PATHS_ENV}=1") as error:
            decode_image(value)
        messages.append(str(error.value).replace(value, "<value>"))
    assert len(set(messages)) == 1  # the same answer whether or not the file exists
    import base64

    assert decode_image(base64.b64encode(existing.read_bytes()).decode()).size == (8, 8)
    monkeypatch.setenv(LOCAL_PATHS_ENV, "1")
    assert decode_image(str(existing)).size == (8, 8)


def test_the_published_model_has_the_same_bytes_when_the_same_training_runs_again(tmp_path):
    """What DVC hashes (models/clipseg) holds no wall times or run ids: a repeated run, even one killed
    and resumed, gives the same files, so a committed dvc.lock's model hash is reproducible and
    `dvc checkout` finds it in the cache."""
    import hashlib

    make_manifest(tmp_path)
    config = tiny_config(epochs=2)

    def contents(folder: Path) -> dict[str, str]:
        return {
            path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    def kill_after_epoch_1(row: dict) -> None:
        if row["epoch"] == 1:
            raise Killed

    published = []
    for name in ("a", "b"):
        work = tmp_path / name / "work"
        if name == "b":
            with pytest.raises(Killed):
                run_training(tmp_path, config, out=name, work_dir=work, on_epoch=kill_after_epoch_1)
            assert not (tmp_path / name / "models" / "best").exists()  # published only when training ends
        run_training(tmp_path, config, out=name, work_dir=work, tracking_run_id=f"run-{name}")
        models = tmp_path / name / "models"
        assert sorted(p.name for p in models.iterdir()) == ["best"]  # last/ stays in the work folder
        assert read_state(work / "last")["mlflow_run_id"] == f"run-{name}"
        state = read_state(models / "best")
        assert "run" not in state and "mlflow_run_id" not in state and state["best_val_miou"] > -1
        assert not (models / "best" / "optimizer_state.pt").exists()
        published.append(contents(models / "best"))
    assert published[0] == published[1]
    # the work folder's best/ is the same model, with its run's state
    loaded, _ = load_model(tmp_path / "a" / "models" / "best")
    original, _ = load_model(tmp_path / "a" / "work" / "best")
    for ours, theirs in zip(loaded.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_warm_up_over_every_step_is_reported():
    # one epoch of one step: the linear warm-up's only step is at lr 0, so nothing would train
    only_step = warmup_warning(tiny_config(epochs=1, warmup_epochs=1), warmup_steps=1, steps=1)
    assert only_step is not None and "its only step runs at lr 0" in only_step
    assert "(1 step, train.warmup_epochs=1) covers all 1 optimizer step," in only_step
    whole_run = warmup_warning(tiny_config(epochs=2, warmup_epochs=2), warmup_steps=10, steps=10)
    assert (
        whole_run is not None and "covers all 10 optimizer steps" in whole_run and "never reaches 0.0005" in whole_run
    )
    assert warmup_warning(tiny_config(epochs=3, warmup_epochs=1), warmup_steps=5, steps=15) is None
    assert warmup_warning(tiny_config(epochs=1, warmup_epochs=0), warmup_steps=0, steps=1) is None


def test_training_whose_warm_up_spans_its_one_step_says_so(tmp_path):
    make_manifest(tmp_path)
    messages: list[str] = []
    run_training(tmp_path, tiny_config(epochs=1, batch_size=64, cache_activations=False), log=messages.append)
    assert any("its only step runs at lr 0" in message for message in messages), messages


def test_with_a_weight_average_best_holds_the_average_and_last_the_trained_weights(tmp_path):
    """`train.ema_decay`: validation scores the moving average, so best/ must hold it (not the raw
    weights of that epoch); last/ keeps the raw weights and the average's state for resuming."""
    make_manifest(tmp_path)
    config = tiny_config(epochs=1, warmup_epochs=0, ema_decay=0.5)  # one epoch: best/ is that epoch's
    run_training(tmp_path, config)
    models = tmp_path / "out" / "models"
    best, _ = load_model(models / "best")
    last, _ = load_model(models / "last")
    saved = torch.load(models / "last" / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    average = {k.removeprefix("module."): v for k, v in saved["weight_average"].items() if k.startswith("module.")}
    assert int(saved["weight_average"]["n_averaged"]) > 1
    raw = last.state_dict()
    differs = [name for name, value in average.items() if not torch.equal(value, raw[name])]
    assert differs, "the average equals the raw weights: it was not updated as an average"
    for name, value in best.state_dict().items():
        torch.testing.assert_close(value, average[name])
    with pytest.raises(ParamsError, match="train.ema_decay must be less than 1"):
        tiny_config(ema_decay=1.0)


def crack_masks() -> torch.Tensor:
    """Two 32x32 masks with a 2 px vertical line each (the shape of a crack at training scale)."""
    masks = torch.zeros(2, 32, 32)
    masks[:, 4:28, 15:17] = 1
    return masks


def test_cldice_weighs_only_the_thin_pairs_and_prefers_the_whole_line_to_a_thick_part():
    masks = crack_masks()
    whole = torch.where(masks > 0, 8.0, -8.0)
    blob = torch.full_like(masks, -8.0)
    blob[:, 4:12, 11:21] = 8.0  # a thick blob over a third of the line: similar area overlap, wrong shape
    neither, both = torch.tensor([False, False]), torch.tensor([True, True])
    for logits in (whole, blob):
        plain = segmentation_loss(logits, masks, 1, 1)
        assert segmentation_loss(logits, masks, 1, 1, neither, cldice_weight=2.0) == plain  # not thin: no term
        assert segmentation_loss(logits, masks, 1, 1, both, cldice_weight=0.0) == plain  # weight 0: off
    whole_extra = segmentation_loss(whole, masks, 1, 1, both, 1.0) - segmentation_loss(whole, masks, 1, 1)
    blob_extra = segmentation_loss(blob, masks, 1, 1, both, 1.0) - segmentation_loss(blob, masks, 1, 1)
    assert whole_extra < 0.05 and blob_extra > 0.4
    # an empty mask gets no clDice term even when its prompt is thin (it has no centre line to trace)
    empty = torch.zeros(1, 32, 32)
    assert segmentation_loss(blob[:1], empty, 1, 1, both[:1], 1.0) == segmentation_loss(blob[:1], empty, 1, 1)


def test_cldice_datasets_must_be_datasets_of_the_manifest(tmp_path):
    make_manifest(tmp_path)
    with pytest.raises(TrainConfigError, match=r"cldice_datasets names \['crack'\]"):
        run_training(tmp_path, tiny_config(cldice_weight=1.0, cldice_datasets=("crack",)))
    with pytest.raises(ParamsError, match="train.cldice_weight must be greater than or equal to 0"):
        tiny_config(cldice_weight=-1.0)


def test_training_with_cldice_on_crack_prompts_runs_and_counts_it_in_the_loss(tmp_path):
    make_manifest(tmp_path)
    first_epoch = {}
    for name, config in {"plain": tiny_config(epochs=1), "thin": tiny_config(epochs=1, cldice_weight=1.0)}.items():
        run_training(tmp_path, config, out=name)
        first_epoch[name] = pd.read_csv(tmp_path / name / "history.csv").iloc[0]
    # the same seed and data: the clDice term of the crack pairs adds to both the train and the val loss
    assert first_epoch["thin"]["train_loss"] > first_epoch["plain"]["train_loss"]
    assert first_epoch["thin"]["val_loss"] > first_epoch["plain"]["val_loss"]


def test_deep_supervision_trains_the_side_heads_and_needs_the_skip_decoder(tmp_path):
    make_manifest(tmp_path)
    skip = {"conv_stem": [8, 8, 16, 16], "skip_decoder": [16, 8]}
    first_epoch = {}
    for name, weight in {"plain": 0.0, "deep": 1.0}.items():
        run_training(tmp_path, tiny_config(epochs=1, deep_supervision=weight, **skip), out=name)
        first_epoch[name] = pd.read_csv(tmp_path / name / "history.csv").iloc[0]
    # the side logits' BCE + Dice is added to the training loss (validation scores the mask alone)
    assert first_epoch["deep"]["train_loss"] > first_epoch["plain"]["train_loss"] + 0.3
    model, _ = load_model(tmp_path / "deep" / "models" / "best")
    heads = model.decoder.transposed_convolution.side_heads
    assert model.config.skip_decoder_side_heads and len(heads) == 2
    with pytest.raises(ParamsError, match="train.deep_supervision scores the skip decoder"):
        tiny_config(deep_supervision=0.5)


KILL_AFTER_EPOCH_1 = """
import os, runpy, signal
import drywall_qa.training.loop as train_module

real_write_history = train_module.write_history

def write_history_then_die(path, history):
    real_write_history(path, history)
    if len(history) == 1:  # epoch 1 is checkpointed and in the CSV; MLflow has not been told yet
        os.kill(os.getpid(), signal.SIGKILL)

train_module.write_history = write_history_then_die
runpy.run_path("stages/train.py", run_name="__main__")
"""


def test_a_kill_after_an_epochs_checkpoint_loses_no_epoch_from_mlflow(tmp_path):
    import subprocess
    import sys

    import yaml

    from drywall_qa.training.checkpoint import read_history

    repo = Path(__file__).resolve().parents[1]
    make_manifest(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "manifest.csv").rename(tmp_path / "data" / "manifest.csv")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(preset="tiny", weights=None, image_size=32)
    params["train"].update(epochs=3, warmup_epochs=0, num_threads=1, batch_size=4)
    params["cpu_numerics"] = "native"  # the driver imports torch before the stage could pin portable kernels
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(repo / "stages", tmp_path / "stages")
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(repo / name, tmp_path / name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env.pop("DVC_ROOT", None)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_1], cwd=tmp_path, env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    resumed = subprocess.run([sys.executable, "stages/train.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from last/ after epoch 1" in resumed.stdout + resumed.stderr

    history = read_history(tmp_path / "plots" / "train_history.csv")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = [r for r in client.search_runs(client.search_experiments()[0].experiment_id) if r.info.run_name == "train"]
    for key in ("train_loss", "val_loss", "val_miou", "val_dice", "lr"):
        logged = client.get_metric_history(run.info.run_id, key)
        # every epoch once, the one the kill kept from MLflow included, with the CSV's values
        assert sorted(metric.step for metric in logged) == [1, 2, 3], key
        by_step = {metric.step: metric.value for metric in logged}
        for row in history:
            assert by_step[int(row["epoch"])] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (key, row["epoch"])
    # per-epoch curves only: the total time and the counts are tags, so no chart mixes a step-0 total in
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "seconds")] == [1, 2, 3]
    run = client.get_run(run.info.run_id)
    assert run.data.tags["summary.epochs_run"] == "3" and "epochs_run" not in run.data.metrics
    assert {"best_val_miou", "best_val_dice", "final_train_loss"} <= set(run.data.metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/model.safetensors" in logged and "checkpoint/config.json" in logged


def test_a_second_training_seed_retrains_differently_and_its_default_is_the_top_level_seed(tmp_path):
    """`train.seed` draws a second run on the same split (the top-level seed also drew the split):
    set to the top-level seed it is the default run, set to another value it trains other weights."""
    make_manifest(tmp_path)

    def trained_weights(train_seed: int | None, out: str) -> dict[str, torch.Tensor]:
        params = tiny_params(epochs=1)
        params["train"]["seed"] = train_seed
        config = TrainConfig.from_params(params)
        assert config.training_seed == (params["seed"] if train_seed is None else train_seed)
        run_training(tmp_path, config, out=out)
        return load_model(tmp_path / out / "models" / "best")[0].state_dict()

    default, same, other = trained_weights(None, "a"), trained_weights(3, "b"), trained_weights(4, "c")
    assert all(torch.equal(default[key], same[key]) for key in default)
    assert not all(torch.equal(default[key], other[key]) for key in default)
