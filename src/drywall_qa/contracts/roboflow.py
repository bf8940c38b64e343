"""A Roboflow export as Roboflow ships it: its layout, how its format is detected, which files are images.

- COCO: `<split>/_annotations.coco.json` beside the split's images;
- YOLO: `data.yaml` at the root with `<split>/images/` and `<split>/labels/`.

Split folders are `train`, `valid` (Roboflow's name), `val` and `test`; anything else sorts after them.

The one reader of an export's files is here too: the COCO annotation files (`read_coco`, and
`load_coco` with every entry conversion reads checked), YOLO's `data.yaml` names and label lines,
the image list and the description `source.json` records. Problems raise `MalformedAnnotationsError`.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

import yaml

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


def is_image_file(path: PurePath) -> bool:
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


# ---------------------------------------------------------------- reading an export's files
# The one reader of the annotation files and image folders; convert (masks), sources (the download's
# description and slicing) and the download preview (through convert) all read through it.


class MalformedAnnotationsError(ExportFormatError):
    """An annotation file that is not valid JSON/YAML or lacks the structure the format requires.

    `parse_error` is the parser's own message when the text did not parse at all (None otherwise).
    """

    def __init__(
        self,
        path: Path,
        detail: str,
        line: int | None = None,
        column: int | None = None,
        parse_error: str | None = None,
    ):
        self.path, self.detail, self.line, self.column = Path(path), detail, line, column
        self.parse_error = parse_error
        where = f"{path}:{line}:{column}" if line is not None else str(path)
        super().__init__(f"malformed annotation file {where}: {detail}")


def is_id(value: Any) -> bool:
    """A COCO id: an int or a string (never a bool)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def read_coco(path: Path) -> dict[str, Any]:
    """A COCO annotation file: a JSON object with an `images` list, else MalformedAnnotationsError.

    What describing and slicing an export need; `load_coco` also checks the entries conversion reads.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        detail = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise MalformedAnnotationsError(path, detail, parse_error=str(error)) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedAnnotationsError(path, error.msg, error.lineno, error.colno, parse_error=str(error)) from None
    if not isinstance(document, dict):
        raise MalformedAnnotationsError(path, "top level is not an object")
    if not isinstance(document.get("images"), list):
        raise MalformedAnnotationsError(path, "`images` is missing or not a list")
    return document


def load_coco(path: Path) -> dict[str, Any]:
    """`read_coco`, and `annotations` and `categories` lists, every category with an id, every image
    with an id and a file name, no image id twice (MalformedAnnotationsError names the first defect)."""
    document = read_coco(path)
    for key in ("annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise MalformedAnnotationsError(path, f"`{key}` is missing or not a list")
    for index, category in enumerate(document["categories"]):
        if not (isinstance(category, dict) and is_id(category.get("id"))):
            raise MalformedAnnotationsError(path, f"categories[{index}] has no `id`")
    seen = set()
    for index, entry in enumerate(document["images"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and is_id(entry.get("id"))):
            raise MalformedAnnotationsError(path, f"images[{index}] needs an `id` and a `file_name`")
        if entry["id"] in seen:
            raise MalformedAnnotationsError(path, f"images[{index}]: image id {entry['id']} repeats")
        seen.add(entry["id"])
    return document


def coco_annotations(document: dict[str, Any]) -> list:
    """The document's `annotations` list as it is (entries unchecked); [] when it is missing or no list."""
    annotations = document.get("annotations")
    return annotations if isinstance(annotations, list) else []


def read_yolo_names(data_file: Path) -> dict[int, str]:
    """The class names of a YOLO `data.yaml`, by index, else MalformedAnnotationsError."""
    try:
        data = yaml.safe_load(data_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise MalformedAnnotationsError(data_file, str(getattr(error, "problem", error)), line, column) from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        return {index: str(name) for index, name in enumerate(names)}
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        return {index: str(name) for index, name in names.items()}
    raise MalformedAnnotationsError(data_file, "`names` must be a list or an {index: name} mapping")


def yolo_images(split_dir: Path) -> list[Path]:
    """The image files of a YOLO split folder's `images/`, sorted (other files there are not images)."""
    return [path for path in sorted((split_dir / "images").iterdir()) if is_image_file(path)]


def yolo_label_lines(label_file: Path) -> list[str]:
    """The non-empty lines of a YOLO label file, one annotation each (undecodable bytes replaced)."""
    return [line for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def list_images(root: Path, export_format: str) -> list[str]:
    """Relative paths of the export's images: those the COCO files list, or YOLO's `images/` files."""
    if export_format == "coco":
        return [
            f"{split_dir.name}/{image['file_name']}"
            for split_dir in coco_split_dirs(root)
            for image in read_coco(split_dir / COCO_ANNOTATIONS)["images"]
        ]
    return [
        f"{split_dir.name}/images/{path.name}" for split_dir in yolo_split_dirs(root) for path in yolo_images(split_dir)
    ]


def describe_export(root: Path) -> dict[str, Any]:
    """Format, geometry and per-split-folder counts of images and annotations (as `source.json` records them)."""
    export_format = detect_format(root)
    splits: dict[str, dict[str, int]] = {}
    if export_format == "coco":
        for split_dir in coco_split_dirs(root):
            document = read_coco(split_dir / COCO_ANNOTATIONS)
            annotations = coco_annotations(document)
            splits[split_dir.name] = {
                "images": len(document["images"]),
                "annotations": len(annotations),
                "annotations_with_polygon": sum(
                    1 for a in annotations if isinstance(a, dict) and a.get("segmentation")
                ),
            }
    else:
        for split_dir in yolo_split_dirs(root):
            coordinates = [
                len(line.split()) - 1
                for label_file in sorted((split_dir / "labels").glob("*.txt"))
                for line in yolo_label_lines(label_file)
            ]
            splits[split_dir.name] = {
                "images": len(yolo_images(split_dir)),
                "annotations": len(coordinates),
                "annotations_with_polygon": sum(1 for count in coordinates if count > 4),  # 4 = a box
            }
    annotations = sum(s["annotations"] for s in splits.values())
    polygons = sum(s["annotations_with_polygon"] for s in splits.values())
    geometry = "none" if annotations == 0 else "polygons" if polygons else "boxes"
    return {
        "format": export_format,
        "geometry": geometry,
        "images": sum(s["images"] for s in splits.values()),
        "annotations": annotations,
        "splits": splits,
    }
