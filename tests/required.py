"""What CI must not skip: a test whose input is missing skips on a workstation, but fails where an
environment variable says the input is required (.ci/run and .github/workflows/ci.yml set them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
REQUIRE_REALDATA = "DRYWALL_QA_REQUIRE_REALDATA"


def skip_unless_required(reason: str, variable: str) -> NoReturn:
    """Skip with `reason`, or fail with it when the environment variable `variable` is set (not empty)."""
    if os.environ.get(variable):
        pytest.fail(f"{reason}, and {variable} is set: CI requires it", pytrace=False)
    pytest.skip(reason)


def require_realdata(folder: Path = REALDATA) -> Path:
    """`folder` (the real Roboflow exports, ../shared/realdata); skips without it, fails under CI."""
    if not folder.is_dir():
        skip_unless_required(f"real Roboflow exports not found at {folder}", REQUIRE_REALDATA)
    return folder
