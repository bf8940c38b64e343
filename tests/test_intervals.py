"""Bootstrap intervals over source photos (groups), on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from drywall_qa.intervals import group_bootstrap, paired_group_bootstrap, verdict


def test_identical_models_differ_by_exactly_nothing():
    scores = [0.1, 0.5, 0.9, 0.3, 0.0, 1.0]
    groups = ["a", "a", "b", "c", "c", "d"]
    difference = paired_group_bootstrap(scores, scores, groups)
    assert (difference.mean, difference.low, difference.high, difference.groups) == (0.0, 0.0, 0.0, 4)
    assert verdict(difference) == "neutral"


def test_a_constant_gain_is_its_own_interval_and_helps():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 0.8, 30)
    groups = [f"photo{i // 3}" for i in range(30)]
    difference = paired_group_bootstrap(b + 0.1, b, groups)
    assert difference.mean == pytest.approx(0.1)
    assert difference.low == pytest.approx(0.1) and difference.high == pytest.approx(0.1)
    assert verdict(difference) == "helps"
    assert verdict(paired_group_bootstrap(b, b + 0.1, groups)) == "hurts"


def test_two_photos_give_the_three_possible_resample_means():
    # one pair each, IoU 0 and 1: resamples {0,0} (1/4), {0,1} (1/2), {1,1} (1/4)
    wide = group_bootstrap([0.0, 1.0], ["x", "y"])
    assert (wide.mean, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = group_bootstrap([0.0, 1.0], ["x", "y"], confidence=0.4)  # 30th and 70th percentiles
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_copies_of_one_photo_are_resampled_together():
    values = [0.0, 1.0, 0.0, 1.0]
    one_photo = group_bootstrap(values, ["p"] * 4)
    assert (one_photo.low, one_photo.high, one_photo.groups) == (0.5, 0.5, 1)
    as_images = group_bootstrap(values, ["a", "b", "c", "d"])
    assert as_images.low < 0.5 < as_images.high
    # a resample's mean weighs each photo by its pairs: 3 pairs at 1 and 1 pair at 0 mean 0.75
    weighted = group_bootstrap([1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"])
    assert (weighted.mean, weighted.low, weighted.high) == (0.75, 0.0, 1.0)


def test_the_interval_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(2)
    values, groups = rng.uniform(size=40), [str(i % 13) for i in range(40)]
    assert group_bootstrap(values, groups, seed=5) == group_bootstrap(values, groups, seed=5)
    assert group_bootstrap(values, groups, seed=5) != group_bootstrap(values, groups, seed=6)
    assert group_bootstrap(values, groups).as_dict("val.x.miou_")["val.x.miou_groups"] == 13
    with pytest.raises(ValueError, match="one group name per value"):
        group_bootstrap([0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="same pairs"):
        paired_group_bootstrap([0.1, 0.2], [0.1], ["a", "b"])
    with pytest.raises(ValueError, match="no values"):
        group_bootstrap([], [])
