"""CI regression gate: fail when a gated metric fell more than the tolerance below its committed baseline.

The baseline is the metrics file committed at a git revision (HEAD by default), the candidate the
workspace after `dvc repro`; `dvc metrics diff --json --all` reports both (and always exits 0 by
itself, hence this gate). Gated keys are higher-is-better scores chosen by glob patterns
(`params.yaml: gate.keys`, e.g. `test.*miou` matches `test.miou` and `test.cracks.miou`).

Exit codes of `main`: 0 nothing regressed, 1 a gated metric regressed or vanished, 2 the gate could not
run (dvc failed, bad configuration).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drywall_qa.errors import DrywallQAError
from drywall_qa.params import ParamsError, load_params


class GateError(DrywallQAError, RuntimeError):
    """The gate cannot decide (dvc failed, patterns match nothing); exit code 2."""


@dataclass(frozen=True)
class Check:
    key: str
    old: float | None
    new: float | None
    tolerance: float

    @property
    def change(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def regressed(self) -> bool:
        """Worse by more than the tolerance, or gone (a baseline value with no numeric new value)."""
        if self.old is None:
            return False  # new metric: nothing to compare against
        if self.new is None:
            return True
        return self.new < self.old - self.tolerance


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def compare(
    baseline: dict[str, Any], current: dict[str, Any], patterns: Sequence[str], tolerance: float
) -> list[Check]:
    """One check per key matching a pattern in either dict, sorted by key. Pure: no dvc, no files."""
    if tolerance < 0:
        raise GateError(f"gate tolerance must be >= 0, got {tolerance}")
    keys = sorted(k for k in set(baseline) | set(current) if any(fnmatch.fnmatchcase(k, p) for p in patterns))
    if not keys:
        raise GateError(f"no metric matches the gated patterns {list(patterns)}")
    return [Check(k, _number(baseline.get(k)), _number(current.get(k)), tolerance) for k in keys]


def split_metrics_diff(diff: dict[str, dict[str, dict[str, Any]]], metrics_file: str) -> tuple[dict, dict]:
    """(baseline, current) flat dicts of one file from `dvc metrics diff --json` output:
    `{"<file>": {"<key>": {"old": x, "new": y, "diff": d}}}` (no "diff" when a side is missing)."""
    entries = diff.get(metrics_file)
    if entries is None:
        found = ", ".join(diff) or "none"
        raise GateError(
            f"`dvc metrics diff` reports nothing for {metrics_file} (files: {found}); is it a metric in dvc.yaml?"
        )
    baseline = {key: entry.get("old") for key, entry in entries.items() if entry.get("old") is not None}
    current = {key: entry.get("new") for key, entry in entries.items() if entry.get("new") is not None}
    return baseline, current


def run_metrics_diff(metrics_file: str, baseline_rev: str = "HEAD", repo: str | Path = ".") -> dict:
    """`dvc metrics diff --json --all <rev> -- <file>`: the baseline at `rev` against the workspace."""
    # this interpreter's dvc (a dependency of the package), not whichever `dvc` is first on PATH
    command = [
        sys.executable,
        "-m",
        "dvc",
        "metrics",
        "diff",
        "--json",
        "--all",
        baseline_rev,
        "--targets",
        metrics_file,
    ]
    try:
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise GateError(f"could not run `dvc metrics diff`: {error}") from None
    if result.returncode != 0:
        raise GateError(f"`{' '.join(command[2:])}` failed: {result.stderr.strip()[-500:]}")
    text = result.stdout.strip()
    return json.loads(text) if text else {}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(checks: Sequence[Check]) -> str:
    width = max(len("metric"), *(len(c.key) for c in checks))
    lines = [f"{'metric':<{width}}  {'baseline':>9}  {'current':>9}  {'change':>9}", "-" * (width + 33)]
    for c in checks:
        change = "gone" if c.old is not None and c.new is None else ("-" if c.change is None else f"{c.change:+.4f}")
        lines.append(f"{c.key:<{width}}  {_fmt(c.old):>9}  {_fmt(c.new):>9}  {change:>9}")
    return "\n".join(lines)


def gate(checks: Sequence[Check]) -> tuple[int, str]:
    """(exit code, message) for the checks."""
    failed = [c for c in checks if c.regressed]
    compared = [c for c in checks if c.old is not None]
    tolerance = checks[0].tolerance if checks else 0.0
    if failed:
        return 1, (
            f"regression gate FAILED: {len(failed)} of {len(compared)} gated metrics fell more than "
            f"{tolerance} below the baseline (or vanished):\n{format_table(failed)}"
        )
    if not compared:
        return 0, "regression gate: no baseline value for any gated metric (first run?); nothing to compare"
    return 0, f"regression gate passed: {len(compared)} gated metrics within {tolerance} of the baseline or better"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file with the `gate` section")
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline metrics (default HEAD)")
    parser.add_argument("--diff-json", help="read this saved `dvc metrics diff --json` output instead of running dvc")
    args = parser.parse_args(argv)
    try:
        config = load_params(args.params).get("gate")
        if not config or not config.get("keys"):
            raise GateError(f"{args.params} has no `gate.keys`")
        metrics_file = config.get("metrics_file", "metrics/headline.json")
        if args.diff_json:
            diff = json.loads(Path(args.diff_json).read_text(encoding="utf-8"))
        else:
            diff = run_metrics_diff(metrics_file, args.baseline)
        baseline, current = split_metrics_diff(diff, metrics_file)
        checks = compare(baseline, current, config["keys"], float(config.get("tolerance", 0.0)))
    except (GateError, ParamsError, OSError, json.JSONDecodeError) as error:
        print(f"regression gate: cannot run: {error}", file=sys.stderr)
        return 2
    code, message = gate(checks)
    print(message)
    return code
