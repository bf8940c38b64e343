"""The experiment workflow of docs/experiments.md on a copy of this repo, at the smallest settings: `dvc repro`,
an experiment, `dvc exp apply`, and the way back to the committed default with `git checkout` +
`dvc checkout` (which needs the committed model hash to be reproducible: `dvc repro` again gives
the same dvc.lock)."""

from __future__ import annotations

from pathlib import Path

import pytest
from small_repo import make_small_repo, model_hash, run


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return make_small_repo(tmp_path_factory.mktemp("workflow") / "repo")


def test_an_experiment_can_be_applied_and_the_default_restored(clone):
    run(["dvc", "repro"], clone)
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "default pipeline"], clone)
    committed = model_hash(clone)

    # the committed model hash is reproducible: training again writes the same bytes
    run(["dvc", "repro", "--force", "--single-item", "train"], clone)
    assert model_hash(clone) == committed
    # (train.json's wall times change its hash: records, not the model, may differ between runs)
    run(["git", "checkout", "--", "."], clone)

    run(["dvc", "exp", "run", "-n", "faster", "-S", "lr=2e-3"], clone)
    run(["dvc", "exp", "apply", "faster"], clone)
    assert model_hash(clone) != committed
    assert "lr: 0.002" in (clone / "params.yaml").read_text()

    # the way back (docs/experiments.md)
    run(["git", "checkout", "--", "."], clone)
    run(["dvc", "checkout"], clone)
    assert model_hash(clone) == committed and (clone / "models" / "clipseg" / "best" / "model.safetensors").is_file()
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status


def real_recipe_settings() -> dict[str, str]:
    """The `-S key=value` settings of scripts/run_real.sh (the real-data experiment), as written there."""
    import re

    text = (Path(__file__).resolve().parents[1] / "scripts" / "run_real.sh").read_text()
    settings = {}
    for match in re.finditer(r"^\s+-S '?([\w.]+)=([^'\s]*)'?\s*$", text, flags=re.M):
        settings[match.group(1)] = match.group(2)
    return settings


def test_the_small_repo_is_the_offline_default_after_a_real_experiment_is_applied(tmp_path):
    """`dvc exp apply real` rewrites the workspace's params.yaml; tests that copy the workspace must not
    follow it to `data.source: local`, a conv stem or 30 epochs."""
    from ruamel.yaml import YAML

    workspace = make_small_repo(tmp_path / "workspace")  # committed: the default
    committed = (workspace / "params.yaml").read_text()
    settings = real_recipe_settings()
    assert {"data.source", "model.conv_stem", "train.epochs", "inference.flips"} <= set(settings)
    yaml = YAML()
    params = yaml.load(committed)
    for dotted, value in settings.items():  # what `dvc exp apply` of the real recipe leaves in the workspace
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = YAML(typ="safe").load(value.replace('"$threads"', "2"))
    with open(workspace / "params.yaml", "w") as handle:
        yaml.dump(params, handle)
    assert "source: local" in (workspace / "params.yaml").read_text()

    small = make_small_repo(tmp_path / "small", workspace=workspace)
    safe = YAML(typ="safe")
    assert safe.load((small / "params.yaml").read_text()) == safe.load(committed)
    run(["dvc", "repro", "download"], small)  # the synthetic source, not ../shared/realdata
    assert '"source": "synthetic"' in (small / "data" / "raw" / "source.json").read_text()
