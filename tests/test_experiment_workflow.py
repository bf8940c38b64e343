"""The README's experiment workflow on a copy of this repo, at the smallest settings: `dvc repro`,
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

    # the way back (README, "Experiments and tracking")
    run(["git", "checkout", "--", "."], clone)
    run(["dvc", "checkout"], clone)
    assert model_hash(clone) == committed and (clone / "models" / "clipseg" / "best" / "model.safetensors").is_file()
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
