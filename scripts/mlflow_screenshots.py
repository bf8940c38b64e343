"""Screenshots of the MLflow UI on this repo's store, as a user sees it in a browser.

    python scripts/mlflow_screenshots.py            # after `dvc repro` and `dvc exp run -S lr=5e-5`

Starts `mlflow server` on the store (default `sqlite:///mlflow.db`, read-only use), opens it in
headless Chromium (Playwright with the system browser: `apt-get install chromium`, and the `ui`
extra: `pip install -e ".[ui]"`), and saves to `docs/screenshots/`:
- `runs_table.png`: the experiment's runs, one parent per pipeline execution;
- `parent_overview.png`: the latest parent: its params, headline metrics, tags and description;
- `train_charts.png`: the latest train stage run's per-epoch charts (loss, val mIoU, learning rate, seconds);
- `compare.png`: the two latest parents in MLflow's Compare view.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

SETTLE_SECONDS = 6  # the UI keeps polling, so "network idle" never comes: wait, then shoot


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(store: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"mlflow server on port {port} did not start")


def pages(store: str, experiment_name: str) -> dict[str, str]:
    """Screenshot name -> UI route (after `#`)."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name!r} in {store}: run the pipeline first")
    eid = experiment.experiment_id
    parents = client.search_runs(
        [eid], "tags.`drywall_qa.role` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=2
    )
    if not parents:
        raise SystemExit("no pipeline parent runs yet: run `dvc repro` first")
    trains = client.search_runs([eid], "tags.stage = 'train'", order_by=["attributes.start_time DESC"], max_results=1)
    routes = {
        # MLflow 3.17's UI takes its mode from `workflowType` in the URL, else the browser's last choice
        # (GenAI at first): the link in docs/experiments.md chooses Model training, and so do these routes
        "runs_table": f"/experiments/{eid}/runs?workflowType=machine_learning",
        "parent_overview": f"/experiments/{eid}/runs/{parents[0].info.run_id}",
    }
    if trains:
        routes["train_charts"] = f"/experiments/{eid}/runs/{trains[0].info.run_id}/model-metrics"
    if len(parents) == 2:
        ids = json.dumps([run.info.run_id for run in parents])
        routes["compare"] = (
            f"/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(json.dumps([eid]))}"
        )
    return routes


def dismiss_popups(page) -> None:
    """The UI's first-visit tips and the assistant panel cover the page."""
    for text in ("Got it",):
        found = page.get_by_text(text, exact=True)
        if found.count():
            found.first.click()
    closers = page.locator('button[aria-label="Close"]')
    for index in range(closers.count()):
        with contextlib.suppress(Exception):  # a closer that is gone or hidden is fine
            closers.nth(index).click(timeout=1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="drywall-qa")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    routes = pages(args.store, args.experiment)
    port = free_port()
    server = start_server(args.store, port)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/#/experiments", wait_until="load")
            time.sleep(SETTLE_SECONDS)
            toggle = page.get_by_text("Model training", exact=True)
            if toggle.count():  # what a user does once: the browser then keeps the choice for every page
                toggle.first.click()
                time.sleep(1)
            for name, route in routes.items():
                # the train run's per-epoch charts and its few summary scores: show them all
                page.set_viewport_size({"width": 1600, "height": 1800 if name == "train_charts" else 1000})
                page.goto(f"http://127.0.0.1:{port}/#{route}", wait_until="load")
                time.sleep(SETTLE_SECONDS)
                dismiss_popups(page)
                time.sleep(1)
                page.screenshot(path=str(args.out / f"{name}.png"))
                print(f"{args.out / (name + '.png')}: #{route}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
