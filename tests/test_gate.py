"""The CI regression gate: comparison rules, and the real `dvc metrics diff --json` output it parses."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drywall_qa.gate import GateError, compare, gate, main, run_metrics_diff, split_metrics_diff

PATTERNS = ["test.*miou", "test.*dice"]
BASELINE = {
    "test.miou": 0.60,
    "test.dice": 0.70,
    "test.cracks.miou": 0.50,
    "test.cracks.iou_dataset": 0.9,
    "runtime.ms_per_image_1_prompt": 20.0,
    "runtime.device": "cpu",
}


def test_equal_metrics_pass():
    code, message = gate(compare(BASELINE, dict(BASELINE), PATTERNS, 0.02))
    assert code == 0 and "3 gated metrics" in message


def test_better_and_within_tolerance_pass():
    current = BASELINE | {"test.miou": 0.75, "test.dice": 0.685, "runtime.ms_per_image_1_prompt": 999.0}
    assert gate(compare(BASELINE, current, PATTERNS, 0.02))[0] == 0


def test_worse_beyond_tolerance_fails_and_lists_only_the_fallen():
    current = BASELINE | {"test.cracks.miou": 0.45, "test.cracks.iou_dataset": 0.1}  # iou_dataset is not gated
    code, message = gate(compare(BASELINE, current, PATTERNS, 0.02))
    assert code == 1
    assert "test.cracks.miou" in message and "-0.0500" in message
    assert "test.miou " not in message and "iou_dataset" not in message


def test_vanished_metric_fails():
    current = {k: v for k, v in BASELINE.items() if k != "test.dice"}
    code, message = gate(compare(BASELINE, current, PATTERNS, 0.02))
    assert code == 1 and "gone" in message


def test_new_metric_without_baseline_passes():
    assert gate(compare(BASELINE, BASELINE | {"test.taping.miou": 0.1}, PATTERNS, 0.02))[0] == 0


def test_patterns_matching_nothing_are_an_error():
    with pytest.raises(GateError, match="no metric matches"):
        compare(BASELINE, BASELINE, ["val.*"], 0.02)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gate_on_a_real_dvc_repo(tmp_path, monkeypatch, capsys):
    """Commit a baseline eval.json, write a worse one, and let the gate read `dvc metrics diff` itself."""
    repo = tmp_path
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "ci@example.com")
    _git(repo, "config", "user.name", "ci")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, capture_output=True)
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"evaluate": {"cmd": "true", "metrics": [{"metrics/eval.json": {"cache": False}}]}}})
    )
    project = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    project["gate"] = {"metrics_file": "metrics/eval.json", "keys": PATTERNS, "tolerance": 0.02}
    (repo / "params.yaml").write_text(yaml.safe_dump(project))
    (repo / "metrics").mkdir()
    (repo / "metrics" / "eval.json").write_text(json.dumps(BASELINE))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    monkeypatch.chdir(repo)

    assert main([]) == 0  # workspace equals HEAD
    worse = BASELINE | {"test.dice": 0.60}
    (repo / "metrics" / "eval.json").write_text(json.dumps(worse))
    diff = run_metrics_diff("metrics/eval.json")
    # the shape dvc 3 prints: {file: {key: {"old", "new", "diff"}}}; strings have no "diff"
    assert diff["metrics/eval.json"]["test.dice"] == {"old": 0.70, "new": 0.60, "diff": pytest.approx(-0.10)}
    assert split_metrics_diff(diff, "metrics/eval.json") == (BASELINE, worse)
    capsys.readouterr()
    assert main([]) == 1
    assert "test.dice" in capsys.readouterr().out
