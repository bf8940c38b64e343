"""The seed-spread table: each run's val and test score, their mean and range, and runs on another split refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import seed_spread

SPLIT = {"seed": 42, "fractions": {"train": 0.7, "val": 0.15, "test": 0.15}, "totals": {"val": {"images": 3}}}


def write_run(folder: Path, cracks_test: float, split: dict | None = None) -> str:
    folder.mkdir(parents=True)
    scores = {}
    for key, value in {"val.cracks.miou": 0.40, "test.cracks.miou": cracks_test}.items():
        scores |= {key: value, f"{key}_ci_low": value - 0.05, f"{key}_ci_high": value + 0.05}
    (folder / "eval.json").write_text(json.dumps(scores))
    (folder / "split.json").write_text(json.dumps(split or SPLIT))
    return str(folder)


def test_each_seed_its_mean_and_range_on_val_and_test(tmp_path):
    a = write_run(tmp_path / "a", cracks_test=0.43)
    b = write_run(tmp_path / "b", cracks_test=0.40)
    assert seed_spread.main(["--run", f"seed 42={a}", "--run", f"seed 7={b}", "--out", str(tmp_path / "seeds")]) == 0
    record = json.loads((tmp_path / "seeds.json").read_text())
    test = record["scores"]["test.cracks"]
    assert test["runs"]["seed 42"] == {"miou": 0.43, "ci": [0.38, 0.48]}
    assert test["mean"] == pytest.approx(0.415) and test["range"] == pytest.approx(0.03)
    assert record["scores"]["val.cracks"]["range"] == 0
    table = (tmp_path / "seeds.md").read_text()
    assert "| test, cracks | 0.4300 [0.380, 0.480] | 0.4000 [0.350, 0.450] | 0.4150 | 0.0300 |" in table


def test_runs_on_different_splits_or_missing_records_are_refused(tmp_path):
    a = write_run(tmp_path / "a", 0.43)
    b = write_run(tmp_path / "b", 0.40, split=SPLIT | {"seed": 1})
    with pytest.raises(SystemExit, match="not scored on the same split"):
        seed_spread.main(["--run", f"x={a}", "--run", f"y={b}", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="eval.json is missing"):
        seed_spread.main(["--run", f"x={a}", "--run", f"y={tmp_path / 'nowhere'}", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="at least two runs"):
        seed_spread.main(["--run", f"x={a}", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s.json").exists()
