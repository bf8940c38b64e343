"""Bootstrap intervals over source photos.

Augmented copies of one source photo (the manifest's `group`) are not independent samples: a split
keeps them together, and so does resampling here. A score is the mean of per-pair values (mIoU is
the mean of per-(image, prompt) IoU); the bootstrap draws whole groups with replacement, so a
resample's mean is the sum of its groups' sums over the sum of their pair counts.

`paired_group_bootstrap` compares two models on the same pairs: it resamples the per-pair
differences, so what both models find hard cancels out, and the interval is that of the difference
of their means. `verdict` reads it: a lever helps when the whole interval is above 0, hurts when it
is below, and is neutral otherwise (kept then only when it is cheaper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval (`low`, `high`) at `confidence`, over `groups` groups."""

    mean: float
    low: float
    high: float
    groups: int
    confidence: float = CONFIDENCE

    def as_dict(self, prefix: str = "", decimals: int = 4) -> dict[str, float | int]:
        return {
            f"{prefix}mean": round(self.mean, decimals),
            f"{prefix}ci_low": round(self.low, decimals),
            f"{prefix}ci_high": round(self.high, decimals),
            f"{prefix}groups": self.groups,
        }


def group_bootstrap(
    values: Sequence[float],
    groups: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """The mean of `values` (one per pair) and its percentile interval when whole groups (one name
    per pair in `groups`) are drawn with replacement, `resamples` times, from a seeded generator."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) != len(groups):
        raise ValueError(f"{values.size} values for {len(groups)} group names: one group name per value")
    if values.size == 0:
        raise ValueError("no values to bootstrap")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is not between 0 and 1")
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(names))
    sizes = np.bincount(index, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(names), size=(resamples, len(names)))
    means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), len(names), confidence)


def paired_group_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    groups: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """mean(a) - mean(b) over the same pairs and its interval, resampling groups of per-pair
    differences (`a[i]` and `b[i]` score the same pair)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} and {b.size} values: a paired comparison needs the same pairs")
    return group_bootstrap(a - b, groups, resamples, seed, confidence)


def verdict(difference: Interval) -> str:
    """`helps` when the interval of a difference lies above 0, `hurts` below, else `neutral`."""
    if difference.low > 0:
        return "helps"
    if difference.high < 0:
        return "hurts"
    return "neutral"
