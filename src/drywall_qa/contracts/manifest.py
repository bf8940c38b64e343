"""`data/interim/images.csv` (convert -> split) and `data/manifest.csv` (split -> train, evaluate,
visualize): their columns, their one reader each, the one record type, and the prompt order.

images.csv: one row per converted image. The manifest: one row per (image, prompt), sorted by
(dataset, split, image_id, prompt), with the image's split, its mask file and its size. Paths in both
are relative to the repo root, in POSIX form.

The prompt order: datasets sorted by name, each dataset's prompts in params order. Every model
output and table that lists "all prompts" follows it (`prompt_order`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drywall_qa.contracts.atomic import write_csv_atomic
from drywall_qa.errors import DrywallQAError

SPLITS = ("train", "val", "test")
IMAGES_CSV_COLUMNS = ["dataset", "image_id", "image_path", "group", "source_split", "width", "height", "n_instances"]
MANIFEST_COLUMNS = [
    "dataset",
    "split",
    "image_id",
    "image_path",
    "mask_path",
    "prompt",
    "group",
    "width",
    "height",
    "source_split",
]
_WHOLE_NUMBER_COLUMNS = {"images.csv": ("width", "height", "n_instances"), "manifest": ("width", "height")}


class ManifestError(DrywallQAError, ValueError):
    """images.csv or the manifest, or an image or mask it names, is unusable; the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of one split with the prompts it is paired with and each prompt's mask file."""

    dataset: str
    image_id: str
    image_path: Path
    width: int
    height: int
    mask_paths: Mapping[str, Path] = field(default_factory=dict)  # prompt -> mask file, prompts sorted

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(self.mask_paths)


def prompt_order(prompts: Mapping[str, Sequence[str]]) -> list[str]:
    """Every prompt once, datasets sorted by name, each dataset's prompts in their given order."""
    return list(dict.fromkeys(prompt for dataset in sorted(prompts) for prompt in prompts[dataset]))


def _read_rows(path: Path, columns: Sequence[str], kind: str, hint: str, exact: bool) -> list[dict[str, str]]:
    if not path.is_file():
        raise ManifestError(f"{path} does not exist ({hint})")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        if (exact and found != list(columns)) or (not exact and not set(columns) <= set(found)):
            raise ManifestError(f"{path}: columns {found} differ from {list(columns)}")
        rows = list(reader)
    if not rows:
        raise ManifestError(f"{path} has no rows")
    for line, row in enumerate(rows, start=2):
        if None in row or any(row.get(column) in (None, "") for column in columns):
            raise ManifestError(f"{path}:{line}: a field is missing or empty")
        for column in _WHOLE_NUMBER_COLUMNS[kind]:
            if not row[column].isdigit():
                raise ManifestError(f"{path}:{line}: {column} {row[column]!r} is not a whole number")
    return rows


def read_images_csv(path: str | Path) -> list[dict[str, str]]:
    """images.csv rows, checked: exactly its columns, no empty field, whole-number sizes and counts."""
    return _read_rows(Path(path), IMAGES_CSV_COLUMNS, "images.csv", "run the convert stage", exact=True)


def write_images_csv(path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
    write_csv_atomic(path, IMAGES_CSV_COLUMNS, rows)


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Manifest rows, checked: every column present, no empty field, whole-number sizes."""
    return _read_rows(Path(path), MANIFEST_COLUMNS, "manifest", "run the split stage", exact=False)


def write_manifest(path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
    write_csv_atomic(path, MANIFEST_COLUMNS, rows)


def prompts_by_dataset(rows: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """Every dataset's prompts in the manifest (all splits), sorted: the training prompt set."""
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[row["dataset"]].add(row["prompt"])
    return {dataset: sorted(prompts) for dataset, prompts in sorted(found.items())}


def image_records(rows: Sequence[Mapping[str, str]], split: str, root: str | Path = ".") -> list[ImageRecord]:
    """The images of `split`, sorted by (dataset, image_id); relative paths resolve against `root`."""
    root = Path(root)
    grouped: dict[tuple[str, str], list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        if row["split"] == split:
            grouped[(row["dataset"], row["image_id"])].append(row)
    records = []
    for (dataset, image_id), image_rows in sorted(grouped.items()):
        image_rows = sorted(image_rows, key=lambda row: row["prompt"])
        first = image_rows[0]
        if len({row["image_path"] for row in image_rows}) != 1:
            raise ManifestError(f"image {dataset}/{image_id} has rows with different image paths")
        prompts = [row["prompt"] for row in image_rows]
        if len(set(prompts)) != len(prompts):
            raise ManifestError(f"image {dataset}/{image_id} lists a prompt twice")
        records.append(
            ImageRecord(
                dataset=dataset,
                image_id=image_id,
                image_path=root / first["image_path"],
                width=int(first["width"]),
                height=int(first["height"]),
                mask_paths={row["prompt"]: root / row["mask_path"] for row in image_rows},
            )
        )
    return records
