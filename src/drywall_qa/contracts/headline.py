"""`metrics/headline.json`: what experiments are compared on, and the only DVC metrics file.

`dvc exp show` prints a column per metric key, so the DVC metric is this short projection of the
full records (`metrics/eval.json`, `metrics/train.json`, which stay outputs): test mIoU overall, per
dataset and per prompt, test Dice overall and per dataset, val mIoU, and the training summary
(`train.best_val_miou`, `train.best_epoch`, `train.seconds`). The CI gate and the registry's gate
compare it with the committed one.

The pipeline's MLflow parent run gets more (`pipeline_metrics`): also the per-prompt Dice, the
chosen thresholds, the footprint and inference times.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from drywall_qa.contracts.atomic import write_json_atomic

EVAL_KEYS = ("test.miou", "test.dice", "test.*.miou", "test.cracks.dice", "test.taping.dice", "val.miou")
TRAIN_KEYS = ("best_val_miou", "best_epoch", "seconds")
PIPELINE_EVAL_KEYS = EVAL_KEYS + (
    "test.*.dice",
    "val.*.miou",
    "threshold.*",
    "footprint.*",
    "runtime.ms_per_image_*",
    "cross_prompt.test.pred_fg_fraction",
)


def _numbers(metrics: Mapping[str, Any], patterns: tuple[str, ...]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in sorted(metrics.items())
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
        and (key.count(".") <= 2)  # `test.<prompt>.miou`, not `test.<prompt>.<other>.miou`
    }


def headline(eval_metrics: Mapping[str, Any], train_summary: Mapping[str, Any]) -> dict[str, float]:
    train = {f"train.{key}": train_summary[key] for key in TRAIN_KEYS if key in train_summary}
    return _numbers(eval_metrics, EVAL_KEYS) | _numbers(train, tuple(train))


def pipeline_metrics(eval_metrics: Mapping[str, Any]) -> dict[str, float]:
    return _numbers(eval_metrics, PIPELINE_EVAL_KEYS)


def write_headline(path: str, eval_metrics: Mapping[str, Any], train_summary: Mapping[str, Any]) -> dict[str, float]:
    values = headline(eval_metrics, train_summary)
    write_json_atomic(path, {key: round(value, 6) for key, value in values.items()})
    return values
