"""The requirement flags turn a skip for a missing input into a failure."""

from __future__ import annotations

import pytest
from required import REQUIRE_REALDATA, require_realdata, skip_unless_required


def test_a_missing_input_skips_without_the_flag(monkeypatch):
    monkeypatch.delenv("DRYWALL_QA_REQUIRE_SOMETHING", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        skip_unless_required("no widget", "DRYWALL_QA_REQUIRE_SOMETHING")
    monkeypatch.setenv("DRYWALL_QA_REQUIRE_SOMETHING", "")  # set but empty: not required
    with pytest.raises(pytest.skip.Exception):
        skip_unless_required("no widget", "DRYWALL_QA_REQUIRE_SOMETHING")


def test_a_missing_input_fails_with_the_flag(monkeypatch):
    monkeypatch.setenv("DRYWALL_QA_REQUIRE_SOMETHING", "1")
    with pytest.raises(pytest.fail.Exception, match="no widget, and DRYWALL_QA_REQUIRE_SOMETHING is set"):
        skip_unless_required("no widget", "DRYWALL_QA_REQUIRE_SOMETHING")


def test_missing_real_exports_fail_under_ci_and_present_ones_pass(monkeypatch, tmp_path):
    monkeypatch.setenv(REQUIRE_REALDATA, "1")
    with pytest.raises(pytest.fail.Exception, match="real Roboflow exports not found"):
        require_realdata(tmp_path / "absent")
    monkeypatch.delenv(REQUIRE_REALDATA)
    with pytest.raises(pytest.skip.Exception):
        require_realdata(tmp_path / "absent")
    assert require_realdata(tmp_path) == tmp_path
