"""The README's experiment workflow on a copy of this repo, at the smallest settings: `dvc repro`,
an experiment, `dvc exp apply`, and the way back to the committed default with `git checkout` +
`dvc checkout` (which needs the committed model hash to be reproducible: `dvc repro` again gives
the same dvc.lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]

SMALL = {  # a pipeline of a few seconds per stage
    ("data", "synthetic", "source_images"): 6,
    ("data", "synthetic", "image_size"): 64,
    ("model", "image_size"): 32,
    ("train", "epochs"): 1,
    ("train", "num_threads"): 1,
    ("evaluate", "zero_shot"): False,
    ("evaluate", "timing_images"): 2,
    ("visualize", "examples_per_prompt"): 1,
    ("visualize", "worst_k"): 1,
    ("cpu_numerics",): "native",
}


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    env.pop("DVC_ROOT", None)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """This working tree's tracked and unignored files, committed in a new git repo, at SMALL settings."""
    root = tmp_path_factory.mktemp("workflow") / "repo"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    yaml = YAML()
    params = yaml.load((root / "params.yaml").read_text())
    for keys, value in SMALL.items():
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


def test_an_experiment_can_be_applied_and_the_default_restored(clone):
    run(["dvc", "repro"], clone)
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "default pipeline"], clone)
    committed = model_hash(clone)

    # the committed model hash is reproducible: training again writes the same bytes
    run(["dvc", "repro", "--force", "--single-item", "train"], clone)
    assert model_hash(clone) == committed
    assert run(["git", "status", "--porcelain", "dvc.lock"], clone).stdout == ""

    run(["dvc", "exp", "run", "-n", "faster", "-S", "lr=2e-3"], clone)
    run(["dvc", "exp", "apply", "faster"], clone)
    assert model_hash(clone) != committed
    assert "lr: 0.002" in (clone / "params.yaml").read_text()

    # the way back (README, "Experiments and tracking")
    run(["git", "checkout", "--", "."], clone)
    run(["dvc", "checkout"], clone)
    assert model_hash(clone) == committed and (clone / "models" / "clipseg" / "best" / "model.safetensors").is_file()
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
