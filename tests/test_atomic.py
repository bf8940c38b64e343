"""Atomic writes leave the old file or the new one, with the permissions a plain write would give."""

from __future__ import annotations

import json
import os
import stat

import pytest

from drywall_qa.contracts.atomic import write_csv_atomic, write_json_atomic, write_text_atomic


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


def _replace_many(target: str, writer: int, rounds: int, errors) -> None:
    from pathlib import Path

    from drywall_qa.contracts.atomic import replace_dir

    for round_ in range(rounds):
        staging = Path(target).parent / f".staging-{writer}-{round_}"
        staging.mkdir()
        for index in range(3):
            (staging / f"file{index}.txt").write_text(f"{writer}:{round_}")
        try:
            replace_dir(staging, Path(target))
        except Exception as error:
            errors.put(f"{type(error).__name__}: {error}")


def test_two_processes_replacing_one_folder_take_turns(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    target = tmp_path / "masks"
    writers = [context.Process(target=_replace_many, args=(str(target), n, 150, errors)) for n in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == [] and all(process.exitcode == 0 for process in writers)
    contents = {path.read_text() for path in target.iterdir()}
    assert len(contents) == 1 and sorted(p.name for p in target.iterdir()) == ["file0.txt", "file1.txt", "file2.txt"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".staging", ".masks.old"))]


def test_a_held_lock_gives_a_clear_message(tmp_path):
    from filelock import FileLock

    from drywall_qa.contracts.atomic import DirectoryBusyError, replace_dir, replace_lock_path

    target, staging = tmp_path / "predictions", tmp_path / "staging"
    staging.mkdir()
    with FileLock(replace_lock_path(target)), pytest.raises(DirectoryBusyError, match="another run holds the lock"):
        replace_dir(staging, target, timeout=0.2)
    assert staging.is_dir() and not target.exists()
