"""A copy of this working tree as a new git repo, with params at the smallest settings: for tests that
run the real pipeline (`dvc repro`, experiments, remotes, queues) in seconds per stage."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    ("data", "synthetic", "source_images"): 6,
    ("data", "synthetic", "image_size"): 64,
    ("model", "image_size"): 32,
    ("train", "epochs"): 1,
    # one optimizer step per epoch here: a warm-up would make it a step at lr 0, and nothing would train
    ("train", "warmup_epochs"): 0,
    ("train", "num_threads"): 1,
    ("evaluate", "zero_shot"): False,
    ("evaluate", "timing_images"): 2,
    ("visualize", "examples_per_prompt"): 1,
    ("visualize", "worst_k"): 1,
    ("cpu_numerics",): "native",
}
# What the tests rely on that an applied experiment (`dvc exp apply`, e.g. the real recipe of
# scripts/run_real.sh) changes in the workspace's params.yaml: these keys take their committed values.
PINNED = (
    ("data", "source"),
    ("data", "local", "limit_per_dataset"),
    ("lr",),
    ("model", "weights"),
    ("model", "preset"),
    ("model", "freeze_backbone"),
    ("model", "conv_stem"),
    ("model", "skip_decoder"),
    ("inference",),
    ("train",),
    ("gate", "baseline_file"),
)


def committed_params(repo: Path = REPO) -> dict:
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True, text=True, check=True)
    return YAML(typ="safe").load(shown.stdout)


def pinned_values(repo: Path = REPO) -> dict[tuple[str, ...], object]:
    committed = committed_params(repo)
    values = {}
    for keys in PINNED:
        node = committed
        for key in keys:
            node = node[key]
        values[keys] = node
    return values


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: int = 900):
    """`command` in `cwd` with the store at `cwd/mlflow.db` unless `env` names another; fails the test
    with the output when it fails."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    full_env.pop("DVC_ROOT", None)
    full_env |= env or {}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def make_small_repo(root: Path, workspace: Path = REPO) -> Path:
    """`workspace`'s tracked and unignored files, committed in a new git repo at `root`, at SMALL and PINNED
    whatever experiment the workspace has applied."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=workspace, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = workspace / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    yaml = YAML()
    params = yaml.load((root / "params.yaml").read_text())
    for keys, value in (pinned_values(workspace) | SMALL).items():
        node = params
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    with open(root / "params.yaml", "w") as handle:
        yaml.dump(params, handle)
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "ci@example.com"],
        ["git", "config", "user.name", "ci"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "small"],
    ):
        run(command, root)
    return root


def model_hash(root: Path) -> str:
    lock = YAML(typ="safe").load((root / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/clipseg"]
    return out["md5"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, url: str, timeout: float) -> None:
    """Poll `url` until it answers 200; fail the test (with the server's output) if `process` exits first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.stdout.read().decode()[-3000:] if process.stdout else ""
            pytest.fail(f"{url} did not come up:\n{output}")
        time.sleep(1)
