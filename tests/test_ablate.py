"""The val ablation script: its subcommands, evaluation's scoring, the paired comparison and its tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import ablate_real


def test_ablation_table_lists_every_variant_and_rescoring():
    shared = {"train.epochs": 8}
    document = {
        "variants": {"a": {"inference.mode": "whole"}, "b": {}},
        "records": [
            {
                "variant": "a",
                "inference_mode": "whole",
                "val.cracks.miou": 0.3,
                "val.taping.miou": 0.4,
                "val.all.miou": 0.35,
                "best_epoch": 8,
                "train_seconds": 100.0,
                "shared": shared,
                "as_sliding": {"val.cracks.miou": 0.2, "val.taping.miou": 0.1, "val.all.miou": 0.15},
            },
            {
                "variant": "b",
                "inference_mode": "resize",
                "val.cracks.miou": 0.1,
                "val.taping.miou": 0.2,
                "val.all.miou": 0.15,
                "best_epoch": 7,
                "train_seconds": 50.0,
                "shared": shared,
            },
        ],
        "scored": [
            {
                "variant": "final",
                "val.cracks.miou": 0.5,
                "val.taping.miou": 0.6,
                "val.taping_snapped.miou": 0.65,
                "val.all.miou": 0.55,
            }
        ],
    }
    table = ablate_real.markdown(document)
    assert '| a | `{"inference.mode": "whole"}` | whole | 0.3 | 0.4 | 0.35 | 8 | 100 |' in table
    assert "| a, scored as sliding | (same checkpoint) | sliding | 0.2 | 0.1 | 0.15 | | |" in table
    assert "| b | `{}` | resize | 0.1 | 0.2 | 0.15 | 7 | 50 |" in table
    assert "| taping snapped to boxes | 0.5 | 0.65 | |" in table and "(8 epochs max)" in table


def test_views_table_lists_each_setting_of_one_checkpoint():
    row = {"checkpoint": "final", "folder": "m", "val_seconds": 31.6}
    document = {
        "variants": {},
        "records": [],
        "views": [
            row | {"name": "plain", "views": {}, "val.cracks.miou": 0.39, "val.cracks.rule": "0.4"},
            row
            | {
                "name": "mirrors at 256",
                "views": {"flips": ["horizontal", "vertical"], "sizes": [256]},
                "val.taping.miou": 0.45,
                "val.taping.rule": "0.6 + boxes",
            },
        ],
    }
    table = ablate_real.markdown(document)
    assert "## Test-time views on the final checkpoint, on val" in table
    assert "| plain | none | input size | 0.39 | 0.4 |  |  | 32 |" in table
    assert "| mirrors at 256 | horizontal, vertical | 256 |  |  | 0.45 | 0.6 + boxes | 32 |" in table


def test_training_needs_epochs_and_a_finished_run_needs_neither(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        ablate_real.main(["train", "--manifest", "m.csv", "--root", ".", "--out", str(tmp_path), "--variant", "a={}"])
    assert "--epochs" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    prompts = {"cracks": ["segment crack"], "taping": ["segment taping area"]}
    (run / "eval.json").write_text(
        json.dumps({"val.segment_crack.miou": 0.4, "val.segment_taping_area.miou": 0.5, "val.miou": 0.45})
    )
    (run / "train.json").write_text(json.dumps({"epochs_run": 30, "seconds": 100.0}))
    write_history(run / "train_history.csv", [(1, 0.9, 0.1, 70.0), (2, 0.8, 0.3, 72.0)])
    monkeypatch.setattr(ablate_real, "load_params", lambda path: {"prompts": prompts})
    assert ablate_real.main(["full-run", "--out", str(tmp_path), f"colour={run}"]) == 0
    (record,) = json.loads((tmp_path / "ablation.json").read_text())["full_runs"]
    assert record["val.cracks.miou"] == 0.4 and record["val.taping.miou"] == 0.5 and record["train_seconds"] == 100.0
    assert [row["val_miou"] for row in record["history"]] == [0.1, 0.3]  # the run's history, kept with it


def write_history(path: Path, rows: list[tuple[int, float, float, float]]) -> None:
    lines = ["epoch,train_loss,val_loss,val_miou,val_dice,lr,seconds"]
    lines += [f"{epoch},1.0,{loss},{miou},0.5,0.0001,{seconds}" for epoch, loss, miou, seconds in rows]
    path.write_text("\n".join(lines) + "\n")


def test_a_stopped_run_is_compared_with_the_reference_at_its_last_epoch(tmp_path):
    reference, stopped = tmp_path / "train_history.csv", tmp_path / "small.csv"
    write_history(reference, [(1, 0.9, 0.10, 70.0), (2, 0.8, 0.30, 72.0), (3, 0.7, 0.35, 74.0)])
    write_history(stopped, [(1, 0.95, 0.05, 110.0), (2, 0.85, 0.20, 120.0)])
    command = ["stopped-run", "--out", str(tmp_path), f"small={stopped}"]
    assert ablate_real.main(command) == 0
    (record,) = json.loads((tmp_path / "ablation.json").read_text())["stopped_runs"]
    assert record["epochs_run"] == 2 and record["val_miou"] == 0.2 and record["reference_val_miou"] == 0.3
    assert record["seconds_per_epoch"] == 115.0 and record["reference_seconds_per_epoch"] == 71.0
    table = (tmp_path / "ablation.md").read_text()
    assert "| small | " in table and "| 2 | 0.2 |" in table and "| 115 (71) |" in table
    # a stopped run longer than its reference cannot be compared
    write_history(stopped, [(epoch, 0.5, 0.4, 100.0) for epoch in range(1, 5)])
    with pytest.raises(SystemExit, match="has no epoch 4"):
        ablate_real.main(command)


# ---------------------------------------------------------------- scoring, comparison, subcommands

W, H = 8, 6
PROMPTS = {"cracks": ["segment crack"], "taping": ["segment taping area"]}
SCORING_PARAMS = {
    "prompts": PROMPTS,
    "model": {},
    "seed": 0,
    "evaluate": {
        "thresholds": [0.1, 0.3, 0.5, 0.7, 0.9],
        "batch_size": 2,
        "zero_shot": False,
        "timing_images": 1,
        "box_snapping": ["boxes", "arms"],
    },
}


def region(x0, x1, y0=0, y1=H):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_val_set(root: Path) -> Path:
    """One val photo per dataset (told apart by colour), its masks and a manifest."""
    from PIL import Image

    from drywall_qa.contracts.manifest import MANIFEST_COLUMNS, write_manifest
    from drywall_qa.contracts.naming import mask_file_name

    rows = []
    for dataset, image_id, colour, gt in (("cracks", "c1", 10, region(0, 2)), ("taping", "t1", 20, region(4, 8))):
        image = root / dataset / f"{image_id}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (colour, 0, 0)).save(image)
        for prompt in PROMPTS[dataset]:
            mask = root / "masks" / mask_file_name(image_id, prompt)
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gt.astype(np.uint8) * 255, mode="L").save(mask)
            rows.append(
                {
                    "dataset": dataset,
                    "split": "val",
                    "image_id": image_id,
                    "image_path": image.relative_to(root).as_posix(),
                    "mask_path": mask.relative_to(root).as_posix(),
                    "prompt": prompt,
                    "group": f"source-{image_id}",
                    "width": W,
                    "height": H,
                    "source_split": "valid",
                }
            )
    assert list(rows[0]) == MANIFEST_COLUMNS
    write_manifest(root / "manifest.csv", rows)
    return root / "manifest.csv"


def fake_probs(model, processor, images, prompts, device=None, batch_size=8):
    """Cracks: the ground truth exactly at any threshold up to 1 (a flat val curve). Taping: an L inside
    the ground-truth box at 0.8, so snapping it to its box scores IoU 1 up to threshold 0.7."""
    out = []
    for image in images:
        probs = np.zeros((H, W), np.float32)
        if int(np.asarray(image)[0, 0, 0]) == 10:
            probs[region(0, 2)] = 1.0
        else:
            probs[:, 4] = probs[0, 4:8] = 0.8
        out.append(np.stack([probs for _ in prompts]))
    return out


def test_scoring_reuses_evaluation_rule_choice_and_its_tie_breaks(tmp_path, monkeypatch):
    import drywall_qa.inference
    import drywall_qa.model
    from drywall_qa.contracts.manifest import image_records, read_manifest
    from drywall_qa.evaluate import evaluate_predictions

    manifest = write_val_set(tmp_path)
    monkeypatch.setattr(drywall_qa.model, "load_model", lambda folder: (object(), None))
    monkeypatch.setattr(drywall_qa.inference, "predict_probs", fake_probs)
    scoring = ablate_real.score_val(tmp_path / "model", manifest, tmp_path, SCORING_PARAMS)
    # ties (every threshold up to 0.7 scores 1) go to 0.5 as in evaluation, not to the lowest threshold
    assert scoring.rules == {"segment crack": "0.5", "segment taping area": "0.5 + boxes"}
    val = image_records(read_manifest(manifest), "val", tmp_path)
    chosen = evaluate_predictions(
        lambda images, prompts: fake_probs(None, None, images, prompts),
        val,
        val,
        ["segment crack", "segment taping area"],
        SCORING_PARAMS["evaluate"]["thresholds"],
        None,
        snaps=("boxes", "arms"),
    )
    assert chosen.thresholds == {"segment crack": 0.5, "segment taping area": 0.5}
    assert chosen.boxed == {"segment taping area": "boxes"}
    assert {(p["image_id"], p["group"], p["iou"]) for p in scoring.pairs} == {
        ("c1", "source-c1", 1.0),
        ("t1", "source-t1", 1.0),
    }
    record = scoring.record()
    assert record["val.taping.miou"] == 1.0 and record["val.taping.rule"] == "0.5 + boxes"


def pairs_of(values: dict[str, list[float]]) -> list[dict]:
    """Pairs per dataset, two per source photo."""
    return [
        {"image_id": f"{dataset}{i}", "dataset": dataset, "prompt": "p", "group": f"g{i // 2}", "iou": value}
        for dataset, scores in values.items()
        for i, value in enumerate(scores)
    ]


def test_paired_differences_per_dataset_with_known_intervals():
    base = {"cracks": [0.1, 0.2, 0.3, 0.4], "taping": [0.5, 0.6, 0.7, 0.8]}
    lever = {"cracks": [0.2, 0.3, 0.4, 0.5], "taping": base["taping"]}
    result = ablate_real.paired_differences(pairs_of(lever), pairs_of(base), seed=3)
    assert result["cracks"] | {"a": 0, "b": 0} == {
        "a": 0,
        "b": 0,
        "difference": 0.1,
        "ci_low": 0.1,
        "ci_high": 0.1,
        "verdict": "helps",
        "groups": 2,
        "pairs": 4,
    }
    assert (result["cracks"]["a"], result["cracks"]["b"]) == (0.35, 0.25)
    assert (result["taping"]["difference"], result["taping"]["ci_low"], result["taping"]["ci_high"]) == (0, 0, 0)
    assert result["taping"]["verdict"] == "neutral"
    assert result["all"]["difference"] == 0.05 and result["all"]["groups"] == 4  # photos are per dataset
    with pytest.raises(SystemExit, match="differ in pairs"):
        ablate_real.paired_differences(pairs_of(lever), pairs_of({"cracks": base["cracks"]}))


def test_a_lever_is_kept_when_it_helps_or_is_neutral_and_cheaper():
    def verdicts(cracks, taping):
        return {"cracks": {"verdict": cracks}, "taping": {"verdict": taping}, "all": {"verdict": "neutral"}}

    assert ablate_real.lever_decision(verdicts("helps", "neutral"), 200.0, 100.0) == "keep"
    assert ablate_real.lever_decision(verdicts("helps", "hurts"), 50.0, 100.0) == "drop"
    assert ablate_real.lever_decision(verdicts("neutral", "neutral"), 90.0, 100.0) == "keep (neutral, cheaper)"
    assert ablate_real.lever_decision(verdicts("neutral", "neutral"), 110.0, 100.0) == "drop (neutral, not cheaper)"


def fake_scoring(gain: float) -> ablate_real.ValScoring:
    base = {"cracks": [0.1, 0.2, 0.3, 0.4], "taping": [0.5, 0.6, 0.7, 0.8]}
    pairs = pairs_of({"cracks": [v + gain for v in base["cracks"]], "taping": base["taping"]})
    return ablate_real.ValScoring(pairs, {"p": "0.5"}, 1.0)


def test_train_keeps_each_variant_history_and_its_paired_difference(tmp_path, monkeypatch):
    class FakeConfig:
        @staticmethod
        def from_params(params):
            return SimpleNamespace(inference=SimpleNamespace(mode="resize"), lever=params.get("lever", False))

    def fake_train(config, manifest_path, output_dir, metrics_path, history_path, **_):
        write_history(Path(history_path), [(1, 0.9, 0.2, 50.0 if config.lever else 60.0)])
        return {"epochs_run": 1, "best_epoch": 1, "params": 10}

    monkeypatch.setattr(ablate_real, "trainer", lambda: (FakeConfig, fake_train))
    monkeypatch.setattr(ablate_real, "load_params", lambda path: {"inference": {"mode": "resize"}})
    monkeypatch.setattr(
        ablate_real,
        "score_val",
        lambda folder, manifest, root, params, adjust=None: fake_scoring(0.1 * bool(params.get("lever"))),
    )
    command = ["train", "--manifest", "m.csv", "--root", ".", "--out", str(tmp_path), "--epochs", "1"]
    assert ablate_real.main([*command, "--variant", "base", "--variant", 'lever={"lever": true}']) == 0
    base, lever = json.loads((tmp_path / "ablation.json").read_text())["records"]
    assert base["history"][0]["seconds"] == 60.0 and lever["history"][0]["seconds"] == 50.0
    assert Path(lever["history_file"]).is_file() and Path(lever["val_pairs_file"]).is_file()
    assert "vs_baseline" not in base
    vs = lever["vs_baseline"]
    assert vs["baseline"] == "base" and vs["cracks"]["difference"] == 0.1 and vs["cracks"]["verdict"] == "helps"
    assert vs["decision"] == "keep"
    table = (tmp_path / "ablation.md").read_text()
    assert "| lever | base | +0.1000 [+0.1000, +0.1000] helps | +0.0000 [+0.0000, +0.0000] neutral |" in table


def test_compare_scores_two_checkpoints_on_the_same_pairs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate_real, "load_params", lambda path: {})
    gains = {"a": 0.1, "b": 0.0}
    monkeypatch.setattr(
        ablate_real, "score_val", lambda folder, manifest, root, params, adjust=None: fake_scoring(gains[folder.name])
    )
    command = ["compare", "--manifest", "m.csv", "--root", ".", str(tmp_path / "a"), str(tmp_path / "b")]
    assert ablate_real.main([*command, "--names", "new", "old", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["datasets"]["cracks"]["difference"] == 0.1 and printed["datasets"]["cracks"]["verdict"] == "helps"
    # over both datasets a resample can hold only taping photos, where nothing changed
    assert printed["datasets"]["all"]["ci_low"] == 0.0 and printed["datasets"]["all"]["verdict"] == "neutral"
    (recorded,) = json.loads((tmp_path / "ablation.json").read_text())["comparisons"]
    assert recorded == printed
    table = (tmp_path / "ablation.md").read_text()
    assert "## new against old, paired on the same val pairs" in table
    assert "| cracks | 0.35 | 0.25 | +0.1000 [+0.1000, +0.1000] helps | 2 | 4 |" in table


def test_snaps_scores_one_checkpoint_under_each_candidate_rule_set_paired(tmp_path, monkeypatch):
    import drywall_qa.inference
    import drywall_qa.model

    manifest = write_val_set(tmp_path)
    monkeypatch.setattr(ablate_real, "load_params", lambda path: SCORING_PARAMS)
    monkeypatch.setattr(drywall_qa.model, "load_model", lambda folder: (object(), None))
    monkeypatch.setattr(drywall_qa.inference, "predict_probs", fake_probs)
    common = ["--manifest", str(manifest), "--root", str(tmp_path), "--out", str(tmp_path)]
    candidates = ["--candidate", "none=", "--candidate", "boxes=boxes", "--candidate", "both=boxes,arms"]
    assert ablate_real.main(["snaps", *common, "--checkpoint", str(tmp_path), "--name", "ckpt", *candidates]) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "ablation.json").read_text())["snaps"]}
    # the taping L inside its box: unsnapped (and as arms, which are the L's own two runs) IoU 9/24
    assert rows["none"]["val.taping.miou"] == 0.375 and rows["none"]["val.taping.rule"] == "0.5"
    assert rows["boxes"]["val.taping.rule"] == "0.5 + boxes" and rows["boxes"]["val.taping.miou"] == 1.0
    assert rows["both"]["val.taping.rule"] == "0.5 + boxes"  # arms score lower here, so val keeps boxes
    assert rows["boxes"]["vs_baseline"]["taping"]["difference"] == 0.625 and "vs_baseline" not in rows["none"]
    assert rows["boxes"]["vs_baseline"]["cracks"]["difference"] == 0.0
    assert "| ckpt | boxes (`boxes`) | 1.0 | 0.5 | 1.0 | 0.5 + boxes | none |" in (tmp_path / "ablation.md").read_text()
    with pytest.raises(SystemExit, match="snaps among"):
        ablate_real.main(["snaps", *common, "--checkpoint", str(tmp_path), "--name", "x", "--candidate", "o=ovals"])
