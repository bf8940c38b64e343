"""A Roboflow export as Roboflow ships it: its layout, how its format is detected, which files are images.

- COCO: `<split>/_annotations.coco.json` beside the split's images;
- YOLO: `data.yaml` at the root with `<split>/images/` and `<split>/labels/`.

Split folders are `train`, `valid` (Roboflow's name), `val` and `test`; anything else sorts after them.
"""

from __future__ import annotations

from pathlib import Path

from drywall_qa.errors import DrywallQAError

COCO_ANNOTATIONS = "_annotations.coco.json"
YOLO_DATA_FILE = "data.yaml"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SPLIT_ORDER = {"train": 0, "valid": 1, "val": 2, "test": 3}
FORMATS = ("coco", "yolo")

_EXPECTED = (
    f"expected <split>/{COCO_ANNOTATIONS} (COCO) or {YOLO_DATA_FILE} with <split>/images and <split>/labels (YOLO)"
)


class ExportFormatError(DrywallQAError):
    """A folder is not a Roboflow export (or holds two); the message names it."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def split_folder_order(name: str) -> tuple[int, str]:
    """Roboflow's folders first in pipeline order, anything else alphabetically after them."""
    return (SPLIT_ORDER.get(name, len(SPLIT_ORDER)), name)


def coco_split_dirs(root: Path) -> list[Path]:
    """The split folders of a COCO export (those holding an annotation file), in split order."""
    return sorted((p.parent for p in root.glob(f"*/{COCO_ANNOTATIONS}")), key=lambda p: split_folder_order(p.name))


def yolo_split_dirs(root: Path) -> list[Path]:
    """The split folders of a YOLO export (those with an `images/` folder), in split order."""
    return sorted((p for p in root.iterdir() if (p / "images").is_dir()), key=lambda p: split_folder_order(p.name))


def is_export_root(folder: Path) -> bool:
    return (folder / YOLO_DATA_FILE).is_file() or any(folder.glob(f"*/{COCO_ANNOTATIONS}"))


def find_export_root(path: Path) -> Path:
    """`path` itself, or its only sub-folder (a zip's top folder), whichever holds the split folders."""
    if is_export_root(path):
        return path
    children = [c for c in path.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and is_export_root(children[0]):
        return children[0]
    raise ExportFormatError(f"{path} is not a Roboflow export: {_EXPECTED}")


def detect_format(root: Path) -> str:
    """`coco` or `yolo`; ExportFormatError for a missing folder, neither format, or both."""
    if not root.is_dir():
        raise ExportFormatError(f"dataset folder {root} does not exist (run the download stage)")
    has_coco = any(root.glob(f"*/{COCO_ANNOTATIONS}"))
    has_yolo = (root / YOLO_DATA_FILE).is_file()
    if has_coco and has_yolo:
        raise ExportFormatError(f"{root} holds both a COCO and a YOLO export; keep one")
    if has_coco:
        return "coco"
    if has_yolo:
        return "yolo"
    raise ExportFormatError(f"{root} is not a Roboflow export: {_EXPECTED}")
