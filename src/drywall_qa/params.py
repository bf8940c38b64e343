"""Reading params.yaml: the one place parameters come from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml and coerce values YAML leaves as strings (see `load_params_text`)."""
    with open(path, encoding="utf-8") as handle:
        return load_params_text(handle.read())


def load_params_text(text: str) -> dict[str, Any]:
    """params.yaml text -> dict. PyYAML follows YAML 1.1, which reads `5e-05` (what
    `dvc exp run -S lr=5e-5` writes) as a string; `lr` and every `*lr*`/`*decay*`-style number must
    be floats."""
    return _coerce_numbers(yaml.safe_load(text) or {})


def _coerce_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _coerce_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_coerce_numbers(item) for item in value]
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, for logging to MLflow."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
