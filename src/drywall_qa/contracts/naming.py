"""File naming rules shared by every stage (see docs/architecture.md)."""

from __future__ import annotations

import re
from pathlib import Path

# Roboflow names exports `<stem>_<ext>.rf.<32 hex>.<ext>`; every augmented copy of
# one source image shares `<stem>_<ext>`, which is what a leak-free split groups by.
_ROBOFLOW_NAME = re.compile(r"^(?P<group>.+)_(?P<ext>[A-Za-z0-9]+)\.rf\.[0-9a-fA-F]{32}$")


def prompt_slug(prompt: str) -> str:
    """`segment joint/tape` -> `segment_joint-tape`: spaces to `_`, `/` to `-`."""
    return prompt.strip().replace(" ", "_").replace("/", "-")


def image_id_of(file_name: str) -> str:
    """The image id is the file's stem: unique per Roboflow export."""
    return Path(file_name).stem


def mask_file_name(image_id: str, prompt: str) -> str:
    return f"{image_id}__{prompt_slug(prompt)}.png"


def source_group(image_id: str) -> str:
    """The source image an (augmented) Roboflow copy was made from."""
    match = _ROBOFLOW_NAME.match(image_id)
    if match is None:
        return image_id
    return f"{match.group('group')}_{match.group('ext')}"
