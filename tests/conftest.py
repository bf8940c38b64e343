"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from drywall_qa.synthetic import generate_exports

# Small but with every feature: augmented copies (some in other split folders), negatives,
# crack annotations without a polygon. Generated once per test session (well under a second).
SMALL_SYNTHETIC = {
    "seed": 3,
    "source_images": 20,
    "augmented_copies": 1,
    "augmented_fraction": 0.5,
    "negative_fraction": 0.1,
    "image_size": 96,
}


@pytest.fixture(scope="session")
def synthetic_exports(tmp_path_factory) -> Path:
    """A folder with `cracks/` and `taping/`: small synthetic Roboflow COCO exports. Do not modify."""
    root = tmp_path_factory.mktemp("synthetic_exports")
    generate_exports(root, **SMALL_SYNTHETIC)
    return root
