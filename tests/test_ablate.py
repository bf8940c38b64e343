"""The val ablation script's pieces: box snapping and the generated table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import ablate_real


def test_snap_to_boxes_fills_each_component_bounding_rectangle():
    mask = np.zeros((20, 30), bool)
    mask[2, 2:10] = True
    mask[2:8, 2] = True  # an L: its box is rows 2-7, columns 2-9
    mask[15:18, 25:28] = True
    snapped = ablate_real.snap_to_boxes(mask)
    expected = np.zeros_like(mask)
    expected[2:8, 2:10] = True
    expected[15:18, 25:28] = True
    np.testing.assert_array_equal(snapped, expected)
    assert not ablate_real.snap_to_boxes(np.zeros((5, 5), bool)).any()


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


def test_training_mode_needs_epochs_and_a_finished_run_needs_neither(tmp_path, monkeypatch, capsys):
    base = ["ablate_real.py", "--manifest", "m.csv", "--root", ".", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*base, "--variant", "a={}"])
    with pytest.raises(SystemExit):
        ablate_real.main()
    assert "--epochs is required" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    prompts = {"cracks": ["segment crack"], "taping": ["segment taping area"]}
    (run / "eval.json").write_text(
        json.dumps({"val.segment_crack.miou": 0.4, "val.segment_taping_area.miou": 0.5, "val.miou": 0.45})
    )
    (run / "train.json").write_text(json.dumps({"epochs_run": 30, "seconds": 100.0}))
    monkeypatch.setattr(ablate_real, "load_params", lambda path: {"prompts": prompts})
    monkeypatch.setattr(sys, "argv", [*base, "--full-run", f"colour={run}"])
    assert ablate_real.main() == 0
    (record,) = json.loads((tmp_path / "ablation.json").read_text())["full_runs"]
    assert record["val.cracks.miou"] == 0.4 and record["val.taping.miou"] == 0.5 and record["train_seconds"] == 100.0


def write_history(path: Path, rows: list[tuple[int, float, float, float]]) -> None:
    lines = ["epoch,train_loss,val_loss,val_miou,val_dice,lr,seconds"]
    lines += [f"{epoch},1.0,{loss},{miou},0.5,0.0001,{seconds}" for epoch, loss, miou, seconds in rows]
    path.write_text("\n".join(lines) + "\n")


def test_a_stopped_run_is_compared_with_the_reference_at_its_last_epoch(tmp_path, monkeypatch):
    reference, stopped = tmp_path / "train_history.csv", tmp_path / "small.csv"
    write_history(reference, [(1, 0.9, 0.10, 70.0), (2, 0.8, 0.30, 72.0), (3, 0.7, 0.35, 74.0)])
    write_history(stopped, [(1, 0.95, 0.05, 110.0), (2, 0.85, 0.20, 120.0)])
    base = ["ablate_real.py", "--manifest", "m.csv", "--root", ".", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*base, "--stopped-run", f"small={stopped}"])
    assert ablate_real.main() == 0
    (record,) = json.loads((tmp_path / "ablation.json").read_text())["stopped_runs"]
    assert record["epochs_run"] == 2 and record["val_miou"] == 0.2 and record["reference_val_miou"] == 0.3
    assert record["seconds_per_epoch"] == 115.0 and record["reference_seconds_per_epoch"] == 71.0
    table = (tmp_path / "ablation.md").read_text()
    assert "| small | " in table and "| 2 | 0.2 |" in table and "| 115 (71) |" in table
    # a stopped run longer than its reference cannot be compared
    write_history(stopped, [(epoch, 0.5, 0.4, 100.0) for epoch in range(1, 5)])
    with pytest.raises(SystemExit, match="has no epoch 4"):
        ablate_real.main()
