"""Atomic writes: a reader (or a `dvc repro` after a kill) sees the old file or the new one, never half of one."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from drywall_qa.errors import DrywallQAError

REPLACE_LOCK_SECONDS = 120.0


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the target's folder, then rename it over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        # mkstemp makes the file owner-only; give it the mode a plain open() would have
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_csv_atomic(path: str | Path, columns: list[str], rows: Iterable[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


class DirectoryBusyError(DrywallQAError, RuntimeError):
    """Another process is replacing the same folder and did not finish in time."""


def replace_lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.replace-lock"


def replace_dir(staging: Path, target: Path, timeout: float = REPLACE_LOCK_SECONDS) -> None:
    """Swap a finished folder into place: two renames, the old copy removed last.

    The two renames are not one atomic step, so two writers of the same target would trip over each
    other (one renames away the folder the other just put in place). A file lock beside the target
    makes them take turns; the last one wins, and readers only ever see a complete folder or none.
    """
    try:
        with FileLock(replace_lock_path(target), timeout=timeout):
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
    except Timeout:
        raise DirectoryBusyError(
            f"another run holds the lock on {target} ({replace_lock_path(target)}) and has not released it "
            f"within {timeout:g} s; wait for it to finish"
        ) from None
