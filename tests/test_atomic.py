"""Atomic writes leave the old file or the new one, with the permissions a plain write would give."""

from __future__ import annotations

import json
import os
import stat

import pytest

from drywall_qa.atomic import write_csv_atomic, write_json_atomic, write_text_atomic


def test_atomic_files_get_the_umask_mode_not_owner_only(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "metrics" / "eval.json", {"test.miou": 0.5})
    finally:
        os.umask(previous)
    target = tmp_path / "metrics" / "eval.json"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by the team, like any metrics file
    assert json.loads(target.read_text(encoding="utf-8")) == {"test.miou": 0.5}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "history.csv"
    write_csv_atomic(target, ["epoch", "loss"], [{"epoch": 1, "loss": 0.5}])
    with pytest.raises(UnicodeEncodeError):  # fails inside the temp file's write, after it was created
        write_text_atomic(target, "epoch,loss\n2,\ud800\n")
    assert target.read_text(encoding="utf-8") == "epoch,loss\n1,0.5\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["history.csv"]
    write_text_atomic(target, "replaced\n")
    assert target.read_text(encoding="utf-8") == "replaced\n"
