"""The val-chosen mask rule of each prompt (its threshold, and whether and how its foreground is
snapped to boxes: `contracts.mask_rule.SNAPS`), as evaluation records it and models carry it.

- `metrics/eval.json` holds `threshold.<prompt_slug>`, `boxes.<prompt_slug>` (1 = snapped, 0 = not) and
  `arms.<prompt_slug>` (1 = snapped per straight arm, 0 = per component), flat keys with the other metrics;
- a logged MLflow model carries `thresholds.json`: `{"<prompt>": <threshold>, ...}`, where a snapped
  prompt's value is `{"threshold": <threshold>, "snap": "boxes" | "arms"}` (files written before the
  arms have `"boxes": true`, read as `boxes`); the pyfunc and `drywall-qa predict --model models:/...`
  read it as their default.

A prompt without a recorded threshold gets `DEFAULT_THRESHOLD`, and is not snapped. A prompt's
snapping travels as `boxed`: a mapping of each snapped prompt to its snap (`"boxes"` or `"arms"`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from drywall_qa.contracts.atomic import write_json_atomic
from drywall_qa.contracts.mask_rule import SNAPS
from drywall_qa.contracts.naming import prompt_slug
from drywall_qa.errors import DrywallQAError

DEFAULT_THRESHOLD = 0.5
THRESHOLDS_FILE = "thresholds.json"


class ThresholdsError(DrywallQAError, ValueError):
    """A thresholds file is unreadable or holds a value outside [0, 1]; the message names it."""


def _checked(source: str, thresholds: Mapping[str, object]) -> dict[str, float]:
    checked = {}
    for prompt, value in thresholds.items():
        if isinstance(value, dict):
            value = value.get("threshold")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ThresholdsError(f"{source}: the threshold of {prompt!r} must be a number in [0, 1], got {value!r}")
        checked[str(prompt)] = float(value)
    return checked


def eval_key(prompt: str) -> str:
    return f"threshold.{prompt_slug(prompt)}"


def boxes_key(prompt: str) -> str:
    return f"boxes.{prompt_slug(prompt)}"


def arms_key(prompt: str) -> str:
    return f"arms.{prompt_slug(prompt)}"


def boxed_from_eval_metrics(metrics: Mapping[str, object], prompts: Sequence[str]) -> dict[str, str]:
    """The prompts eval.json records as snapped to boxes, each with its snap."""
    return {p: "arms" if metrics.get(arms_key(p)) == 1 else "boxes" for p in prompts if metrics.get(boxes_key(p)) == 1}


def boxed_metrics(prompts: Sequence[str], boxed: Mapping[str, str]) -> dict[str, int]:
    """eval.json's `boxes.*` and `arms.*` keys of `prompts`."""
    return {boxes_key(p): int(p in boxed) for p in prompts} | {
        arms_key(p): int(boxed.get(p) == "arms") for p in prompts
    }


def from_eval_metrics(
    metrics: Mapping[str, object], prompts: Sequence[str], source: str = "eval.json"
) -> dict[str, float]:
    """The thresholds eval.json records for `prompts` (those it has)."""
    return _checked(source, {p: metrics[eval_key(p)] for p in prompts if eval_key(p) in metrics})


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ThresholdsError(f"cannot read thresholds from {path}: {error}") from None


def read_eval_thresholds(path: str | Path, prompts: Sequence[str]) -> dict[str, float]:
    path = Path(path)
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        raise ThresholdsError(f"{path} is not a JSON object of metrics")
    return from_eval_metrics(metrics, prompts, str(path))


def read_eval_boxed(path: str | Path, prompts: Sequence[str]) -> dict[str, str]:
    path = Path(path)
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        raise ThresholdsError(f"{path} is not a JSON object of metrics")
    return boxed_from_eval_metrics(metrics, prompts)


def write_thresholds(path: str | Path, thresholds: Mapping[str, float], boxed: Mapping[str, str] | None = None) -> None:
    boxed = checked_boxed(str(path), boxed or {})
    unknown = sorted(set(boxed) - set(thresholds))
    if unknown:
        raise ThresholdsError(f"{path}: prompts {unknown} are snapped to boxes but have no threshold")
    document = {
        prompt: {"threshold": value, "snap": boxed[prompt]} if prompt in boxed else value
        for prompt, value in _checked(str(path), thresholds).items()
    }
    write_json_atomic(path, document)


def checked_boxed(source: str, boxed: Mapping[str, str]) -> dict[str, str]:
    bad = {prompt: snap for prompt, snap in boxed.items() if snap not in SNAPS}
    if bad:
        raise ThresholdsError(f"{source}: unknown snapping {bad}; expected one of {list(SNAPS)}")
    return dict(boxed)


def read_thresholds(path: str | Path) -> dict[str, float]:
    path = Path(path)
    document = _read_json(path)
    if not isinstance(document, dict):
        raise ThresholdsError(f"{path} must map each prompt to its threshold")
    return _checked(str(path), document)


def read_boxed(path: str | Path) -> dict[str, str]:
    """The prompts a thresholds.json snaps to boxes, each with its snap."""
    path = Path(path)
    document = _read_json(path)
    if not isinstance(document, dict):
        raise ThresholdsError(f"{path} must map each prompt to its threshold")
    boxed = {}
    for prompt, value in document.items():
        if not isinstance(value, dict):
            continue
        if "snap" in value:
            if value["snap"] not in SNAPS:
                raise ThresholdsError(
                    f"{path}: `snap` of {prompt!r} must be one of {list(SNAPS)}, got {value['snap']!r}"
                )
            boxed[str(prompt)] = value["snap"]
        elif "boxes" in value:  # written before the arms
            if not isinstance(value["boxes"], bool):
                raise ThresholdsError(f"{path}: `boxes` of {prompt!r} must be true or false, got {value['boxes']!r}")
            if value["boxes"]:
                boxed[str(prompt)] = "boxes"
    return boxed
