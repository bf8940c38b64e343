"""`drywall-qa plots`: DVC's plots rendered offline, one chart per plot of dvc.yaml, with the right fields."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from drywall_qa.plots import render_offline

REPO = Path(__file__).resolve().parents[1]
PLOT_FILES = ["train_history.csv", "eval_per_prompt.csv", "threshold_sweep.csv", "eval_per_image.csv"]


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A DVC repo holding the project's dvc.yaml, its plot templates and the committed plot data."""
    root = tmp_path_factory.mktemp("plots_repo")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "plots").mkdir()
    for name in PLOT_FILES:
        shutil.copy(REPO / "plots" / name, root / "plots" / name)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    return root


def data_plots(root: Path) -> dict[str, dict]:
    shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=root, capture_output=True, text=True, check=True)
    return {
        name: renders[0]["content"]
        for name, renders in json.loads(shown.stdout)["data"].items()
        if renders and renders[0]["type"] == "vega"
    }


def encoding(spec: dict) -> dict:
    found = spec.get("encoding") or spec["layer"][0].get("encoding", {})
    return {channel: value.get("field") for channel, value in found.items() if isinstance(value, dict)}


def test_each_plot_draws_the_columns_it_is_about(plots_repo):
    specs = data_plots(plots_repo)
    assert len(specs) == 6
    loss = specs["training loss"]
    assert {row["field"] for row in loss["data"]["values"]} == {"train_loss", "val_loss"}
    assert encoding(loss)["x"] == "epoch"
    assert {row["field"] for row in specs["val mIoU and Dice per epoch"]["data"]["values"]} == {"val_miou", "val_dice"}
    assert encoding(specs["learning rate"])["y"] == "lr"
    bars = encoding(specs["test mIoU per prompt"])
    assert (bars["x"], bars["y"]) == ("test_miou", "prompt")
    sweep = specs["val mIoU per threshold, one line per prompt"]
    assert encoding(sweep) | {"strokeDash": None} == {
        "x": "threshold",
        "y": "val_miou",
        "color": "prompt",
        "strokeDash": None,
    }
    prompts = {row["prompt"] for row in sweep["data"]["values"]}
    assert len(prompts) == 5  # one line each
    scatter = encoding(specs["test IoU per image against its ground-truth foreground"])
    assert (scatter["x"], scatter["y"], scatter["color"]) == ("gt_fg_fraction", "iou", "prompt")


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_offline_page_draws_every_chart_with_no_network(plots_repo):
    page = render_offline(plots_repo, "dvc_plots")
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html), "the page must not load scripts from anywhere"
    binary = browser()
    if binary is None:
        if os.environ.get("DRYWALL_QA_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH, and DRYWALL_QA_REQUIRE_BROWSER is set (CI installs it)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    dom = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: the page is offline
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # each chart's div up to the next one: vega draws an <svg class="marks"> with its data marks in it
    parts = re.split(r'<div id="([^"]+)" class="vega-embed[^"]*">', dom)[1:]
    charts = dict(zip(parts[::2], parts[1::2], strict=True))
    expected = {re.sub(r"[^A-Za-z0-9-]", "_", name) for name in data_plots(plots_repo)}
    assert len(expected) == 6 and expected <= set(charts), sorted(charts)
    for name in expected:
        chart = charts[name]
        assert 'class="marks"' in chart, f"{name} was not drawn"
        assert chart.count('role="graphics-symbol"') >= 1, f"{name} has no data marks"
