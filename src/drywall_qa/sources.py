"""Getting the raw Roboflow exports into `data/raw/<dataset>/`, from one of three sources.

- `synthetic`: the seeded generator of `drywall_qa.synthetic` (offline default);
- `roboflow`: the real `roboflow` SDK, API key from `ROBOFLOW_API_KEY` only;
- `local`: an export downloaded by hand, a folder or a `.zip`, COCO or YOLO, copied unchanged
  (optionally a seeded slice of it, `limit_per_dataset`).

Everything is written into a temporary folder beside `data/raw` that replaces it only when
complete, with `source.json` (provenance, never the key). The API key is removed from every
message, captured SDK output and downloaded text file before any of them can reach a log.

Image size guard (`max_image_pixels`): an image whose header declares more pixels is an error
that stops the import before anything is written, not a skip. A real Roboflow export never
holds such an image (it resizes to 640x640), so one is a corrupt or hostile file, and dropping
it would silently change the dataset. The check reads only the image header (PIL opens lazily).
PIL's own decompression-bomb limit (about 179 million pixels) still applies above ours.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import requests
from PIL import Image, UnidentifiedImageError

from drywall_qa.contracts.atomic import replace_dir
from drywall_qa.contracts.naming import image_id_of, source_group
from drywall_qa.contracts.roboflow import (
    COCO_ANNOTATIONS,
    IMAGE_SUFFIXES,
    ExportFormatError,
    coco_split_dirs,
    detect_format,
    find_export_root,
    yolo_split_dirs,
)
from drywall_qa.errors import DrywallQAError
from drywall_qa.synthetic import DATASET_SPECS, InvalidGeneratorParams, generate_exports

log = logging.getLogger(__name__)

API_KEY_ENV = "ROBOFLOW_API_KEY"
SOURCE_FILE = "source.json"
# Downloaded files that are text and may be scrubbed of the API key; the key in any other
# file (an image) cannot be removed without corrupting it and is an error.
TEXT_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".csv", ".xml", ".md", ".html"}
SOURCES = ("synthetic", "roboflow", "local")


class DownloadError(DrywallQAError):
    """Base of every error the download stage reports as one line."""


class MissingApiKeyError(DownloadError):
    pass


class RoboflowUnavailableError(DownloadError):
    """The Roboflow API could not be reached (network, DNS, refused connection)."""


class RoboflowDownloadError(DownloadError):
    """The Roboflow API answered, but not with the export (bad key, unknown project, ...)."""


class UnsafeArchiveError(DownloadError):
    """A zip member would be written outside the target folder (zip-slip)."""


class ImageTooLargeError(DownloadError):
    """An image declares more pixels than `max_image_pixels` (decompression-bomb guard)."""


# ---------------------------------------------------------------- entry point


def fetch_raw_data(
    data_params: Mapping[str, Any],
    seed: int,
    raw_dir: str | Path,
    repo_root: str | Path,
    api_key: str | None = None,
    validate: Callable[[Path, str], Any] | None = None,
) -> dict[str, Any]:
    """Fill `raw_dir` from `data_params["source"]`; returns the provenance written to `source.json`.

    `api_key` is only used by the `roboflow` source (the stage reads it from the environment).
    `validate(dataset_dir, name)` runs on each new dataset folder before `raw_dir` is touched (the
    stage passes convert's reader); an error it raises keeps `raw_dir` as it was, and a path of the
    temporary folder in its message is replaced by the file the user knows (source path, zip member).
    """
    source = data_params.get("source")
    if source not in SOURCES:
        raise DownloadError(f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "roboflow" and not api_key:
        raise MissingApiKeyError(f"data.source is roboflow but {API_KEY_ENV} is not set; export your Roboflow API key")

    def fill(staging: Path) -> dict[str, Any]:
        if source == "synthetic":
            return _fill_synthetic(staging, data_params["synthetic"], seed)
        if source == "roboflow":
            return _fill_roboflow(staging, data_params["roboflow"], str(api_key), data_params["local"])
        return _fill_local(staging, data_params["local"], seed, Path(repo_root))

    def in_user_terms(message: str, staging: Path) -> str:
        for name in (data_params.get("local") or {}).get("datasets") or {}:
            message = name_user_files(message, staging / name, user_origin(data_params, name, Path(repo_root)))
        return message

    def checked_fill(staging: Path) -> dict[str, Any]:
        try:
            # fill() reads the staging copy too (describe_export): its errors must name the user's files
            record = fill(staging)
        except DrywallQAError as error:
            raise type(error)(in_user_terms(str(error), staging)) from None
        if validate is not None:
            for name in record["datasets"]:
                try:
                    validate(staging / name, name)
                except Exception as error:
                    message = name_user_files(
                        str(error), staging / name, user_origin(data_params, name, Path(repo_root))
                    )
                    raise ExportFormatError(f"{name}: {message}") from None
        return record

    return write_raw_atomically(Path(raw_dir), checked_fill)


def user_origin(data_params: Mapping[str, Any], name: str, repo_root: Path) -> str:
    """What the user knows dataset `name` as: its folder, `<zip>:` for a zip, else data/raw/<name>."""
    if data_params.get("source") != "local":
        return f"data/raw/{name}"
    configured = Path(data_params["local"]["datasets"][name])
    source = configured if configured.is_absolute() else repo_root / configured
    if source.is_file():
        return f"{source}:"  # members follow: cracks.zip:train/_annotations.coco.json
    if not source.is_dir():
        return str(source)
    try:
        return str(find_export_root(source))
    except ExportFormatError:
        return str(source)


def name_user_files(message: str, dataset_dir: Path, origin: str) -> str:
    """`message` with paths under the temporary `dataset_dir` rewritten to `origin`."""
    separator = "" if origin.endswith(":") else "/"
    for form in {str(dataset_dir), str(dataset_dir.resolve())}:
        message = message.replace(form + "/", origin + separator).replace(form, origin.rstrip(":/"))
    return message


def roboflow_api_key(env: Mapping[str, str]) -> str:
    """The API key from `ROBOFLOW_API_KEY` (never from params or files)."""
    key = (env.get(API_KEY_ENV) or "").strip()
    if not key:
        raise MissingApiKeyError(f"data.source is roboflow but {API_KEY_ENV} is not set; export your Roboflow API key")
    return key


def write_raw_atomically(raw_dir: Path, fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `fill(staging)` in a temp folder beside `raw_dir`, add `source.json`, swap it in.

    On any error the temp folder is removed and `raw_dir` is left as it was.
    """
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp's 0700 mode would stay on data/raw after the rename
    staging = raw_dir.parent / f".{raw_dir.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        record = fill(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # the same lock as every other folder swap: two downloads take turns, the last one wins
        replace_dir(staging, raw_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


# ---------------------------------------------------------------- synthetic


def _fill_synthetic(staging: Path, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    generator_params = {
        "source_images": int(params["source_images"]),
        "augmented_copies": int(params["augmented_copies"]),
        "augmented_fraction": float(params["augmented_fraction"]),
        "negative_fraction": float(params["negative_fraction"]),
        "image_size": int(params["image_size"]),
    }
    try:
        generate_exports(staging, seed=seed, **generator_params)
    except InvalidGeneratorParams as error:
        raise DownloadError(str(error)) from None
    datasets = {}
    for name in ("cracks", "taping"):
        spec = DATASET_SPECS[name]
        datasets[name] = {
            "workspace": spec.workspace,
            "project": spec.project,
            "version": spec.version,
            **describe_export(staging / name),
        }
    return {"source": "synthetic", "seed": seed, "generator": generator_params, "datasets": datasets}


# ---------------------------------------------------------------- roboflow


def _fill_roboflow(
    staging: Path, params: Mapping[str, Any], api_key: str, local_params: Mapping[str, Any]
) -> dict[str, Any]:
    export_format = str(params["format"])
    max_pixels = int(local_params["max_image_pixels"])
    datasets = {}
    api_url = None
    for name, project in params["datasets"].items():
        dest = staging / name
        log.info(
            "downloading %s: %s/%s v%s (%s)",
            name,
            project["workspace"],
            project["project"],
            project["version"],
            export_format,
        )
        api_url = download_roboflow_export(
            api_key, project["workspace"], project["project"], int(project["version"]), export_format, dest
        )
        check_image_pixels(dest, max_pixels)
        scrubbed = scrub_secret(dest, api_key)
        datasets[name] = {
            "workspace": project["workspace"],
            "project": project["project"],
            "version": int(project["version"]),
            "export_format": export_format,
            **describe_export(dest),
            "files_scrubbed_of_api_key": scrubbed,
        }
    return {"source": "roboflow", "api_url": redact(api_url or "", api_key), "datasets": datasets}


def download_roboflow_export(
    api_key: str, workspace: str, project: str, version: int, export_format: str, dest: Path
) -> str:
    """Download one export with the Roboflow SDK into `dest`; returns the API URL it used.

    The SDK prints progress (and, on some errors, URLs) and puts the key in every request URL,
    so its stdout/stderr are captured and logged only after redaction, and its exceptions are
    replaced by ours with redacted one-line messages (`from None`: the original, which may
    hold the key, is not printed as the cause).
    """
    if not api_key:
        raise MissingApiKeyError(f"{API_KEY_ENV} is not set; export your Roboflow API key")
    label = f"{workspace}/{project} v{version} ({export_format})"
    captured = io.StringIO()
    api_url = "the Roboflow API"
    try:
        with _quiet_sdk(captured):
            import roboflow
            from roboflow.config import API_URL

            api_url = API_URL
            client = roboflow.Roboflow(api_key=api_key)
            client.workspace(workspace).project(project).version(version).download(
                export_format, location=str(dest), overwrite=True
            )
    except Exception as error:
        detail = _one_line(redact(f"{type(error).__name__}: {error}", api_key))
        sdk_said = _one_line(redact(captured.getvalue(), api_key))[-300:]
        if sdk_said:
            log.debug("roboflow SDK output: %s", sdk_said)
        if isinstance(error, requests.RequestException) and not isinstance(error, requests.HTTPError):
            where = redact(api_url, api_key)
            raise RoboflowUnavailableError(f"Roboflow API {where} is unreachable ({detail})") from None
        raise RoboflowDownloadError(f"Roboflow download of {label} failed: {detail}") from None
    for line in redact(captured.getvalue(), api_key).splitlines():
        if line.strip():
            log.debug("roboflow SDK: %s", line.strip()[-200:])
    return api_url


@contextlib.contextmanager
def _quiet_sdk(sink: IO[str]) -> Iterator[None]:
    """Capture the SDK's prints and progress bars; keep urllib3 from logging request URLs."""
    urllib3_log = logging.getLogger("urllib3")
    level = urllib3_log.level
    urllib3_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        urllib3_log.setLevel(level)


_SECRET_QUERY = re.compile(r"((?:api_)?key=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str, secret: str | None) -> str:
    """Replace the secret and any `key=`/`api_key=` URL parameter value with `***`."""
    if secret:
        text = text.replace(secret, "***")
    return _SECRET_QUERY.sub(r"\1***", text)


def _one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def scrub_secret(root: Path, secret: str) -> list[str]:
    """Remove `secret` from the text files under `root`; returns their relative paths.

    The SDK writes only the export's own files, but a README or data.yaml carrying a URL with
    the key must not end up in `data/raw` (and in DVC's cache, MLflow, git history ...).
    """
    needle = secret.encode()
    scrubbed = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content = path.read_bytes()
        if needle not in content:
            continue
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise RoboflowDownloadError(f"the downloaded file {relative} contains the API key; refusing to keep it")
        path.write_bytes(content.replace(needle, b"***"))
        scrubbed.append(relative)
    return scrubbed


# ---------------------------------------------------------------- local


def _fill_local(staging: Path, params: Mapping[str, Any], seed: int, repo_root: Path) -> dict[str, Any]:
    datasets = {}
    for name, configured in params["datasets"].items():
        path = Path(configured)
        source = path if path.is_absolute() else repo_root / path
        log.info("importing %s from %s", name, source)
        datasets[name] = {
            "path": str(configured),
            **import_local_export(
                source,
                staging / name,
                max_image_pixels=int(params["max_image_pixels"]),
                limit=int(params["limit_per_dataset"]),
                seed=seed,
            ),
        }
    return {
        "source": "local",
        "seed": seed,
        "max_image_pixels": int(params["max_image_pixels"]),
        "limit_per_dataset": int(params["limit_per_dataset"]),
        "datasets": datasets,
    }


def import_local_export(source: Path, dest: Path, max_image_pixels: int, limit: int, seed: int) -> dict[str, Any]:
    """Copy (folder) or extract (zip) an export into `dest` (a new folder), unchanged unless `limit` > 0.

    A single wrapping folder (a zip of `my-export/train/...`) is stripped so that `dest` holds
    the split folders. With `limit` > 0 only a seeded slice of at most `limit` images is kept,
    whole source groups (an image and its augmented copies) at a time, with the annotation
    files filtered to match. Returns the description of what `dest` now holds.
    """
    if not source.exists():
        raise ExportFormatError(f"local export {source} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=dest.parent) as scratch:
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise ExportFormatError(f"local export {source} is neither a folder nor a zip file")
            unpacked = Path(scratch) / "unpacked"
            extract_zip_safely(source, unpacked, max_image_pixels)
            root = find_export_root(unpacked)
        else:
            refuse_links(source)
            root = find_export_root(source)
            check_image_pixels(root, max_image_pixels)
        export_format = detect_format(root)
        keep = None
        try:
            if limit > 0:
                available = len(list_images(root, export_format))
                keep = select_slice(root, export_format, limit, seed)
        except ExportFormatError as error:
            if not source.is_file():
                raise
            # the unpacked copy is gone once this returns: name the member inside the user's zip
            raise ExportFormatError(name_user_files(str(error), unpacked, f"{source}:")) from None
        copy_export(root, dest, export_format, keep)
    record: dict[str, Any] = {"kind": "zip" if source.is_file() else "folder", **describe_export(dest)}
    if keep is not None:
        record["slice"] = {"limit": limit, "images_available": available, "images_kept": len(keep)}
    return record


def extract_zip_safely(zip_path: Path, dest: Path, max_image_pixels: int) -> None:
    """Extract `zip_path` into `dest` after checking every member first.

    Members with absolute paths or `..` (zip-slip) raise UnsafeArchiveError, images over
    `max_image_pixels` raise ImageTooLargeError; in both cases nothing is extracted.
    """
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            for member in members:
                _check_member_path(member.filename, dest, zip_path)
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise UnsafeArchiveError(
                        f"{zip_path.name} holds {member.filename!r}, a symbolic link; an import takes regular "
                        "files only (a link could pull in files from outside the export)"
                    )
            for member in members:
                if not member.is_dir() and PurePosixPath(member.filename).suffix.lower() in IMAGE_SUFFIXES:
                    with archive.open(member) as stream:
                        _check_pixels(stream, f"{zip_path.name}:{member.filename}", max_image_pixels)
            dest.mkdir(parents=True, exist_ok=True)
            archive.extractall(dest)
    except zipfile.BadZipFile as error:
        raise ExportFormatError(f"{zip_path} is not a readable zip file ({error})") from None


def refuse_links(source: Path) -> None:
    """Refuse an export folder holding any symbolic link, to a file or a folder, broken or not.

    The folder the user named may itself be a link (their choice); nothing under it may be: a link
    would put files from outside the export (`/etc/...`) into data/raw, the DVC cache and remotes.
    """
    for folder, dirs, files in os.walk(source):  # followlinks=False: a linked folder is listed, not entered
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink():
                raise UnsafeArchiveError(
                    f"{path} is a symbolic link (to {os.readlink(path)}); an import copies only regular files "
                    "inside the export folder: replace the link by the file itself"
                )


def _check_member_path(name: str, dest: Path, zip_path: Path) -> None:
    normalised = name.replace("\\", "/")
    parts = PurePosixPath(normalised).parts
    escapes = (
        normalised.startswith("/")
        or ".." in parts
        or (parts and re.match(r"^[A-Za-z]:", parts[0]) is not None)  # a Windows drive
        or not (dest / normalised).resolve().is_relative_to(dest)
    )
    if escapes:
        raise UnsafeArchiveError(f"{zip_path.name} holds {name!r}, which would be written outside the target folder")


def check_image_pixels(root: Path, max_image_pixels: int) -> int:
    """Check every image file under `root` (header only); returns how many were checked."""
    checked = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            with open(path, "rb") as stream:
                _check_pixels(stream, str(path), max_image_pixels)
            checked += 1
    return checked


def _check_pixels(stream: IO[bytes], label: str, max_image_pixels: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we decide below
        try:
            with Image.open(stream) as image:
                width, height = image.size
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(f"{label}: {error}; refusing a possible decompression bomb") from None
        except (UnidentifiedImageError, OSError):
            return  # not decodable: copied as is; the convert stage counts it as an unreadable image
    if width * height > max_image_pixels:
        raise ImageTooLargeError(
            f"{label} is {width}x{height} = {width * height} pixels, over max_image_pixels={max_image_pixels}; "
            "refusing a possible decompression bomb"
        )


# ---------------------------------------------------------------- export layout


def _load_coco(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportFormatError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ExportFormatError(f"{path} has no `images` list; not a COCO annotation file")
    return document


def _yolo_label_rows(label_file: Path) -> list[int]:
    """The number of coordinates of each non-empty label line (4 = box, more = polygon)."""
    rows = []
    for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            rows.append(len(line.split()) - 1)
    return rows


def describe_export(root: Path) -> dict[str, Any]:
    """Format, geometry and per-split-folder counts of images and annotations."""
    export_format = detect_format(root)
    splits: dict[str, dict[str, int]] = {}
    if export_format == "coco":
        for annotations_file in (d / COCO_ANNOTATIONS for d in coco_split_dirs(root)):
            document = _load_coco(annotations_file)
            annotations = document.get("annotations") or []
            splits[annotations_file.parent.name] = {
                "images": len(document["images"]),
                "annotations": len(annotations),
                "annotations_with_polygon": sum(1 for a in annotations if a.get("segmentation")),
            }
    else:
        for split_dir in yolo_split_dirs(root):
            rows = [
                count
                for label_file in sorted((split_dir / "labels").glob("*.txt"))
                for count in _yolo_label_rows(label_file)
            ]
            splits[split_dir.name] = {
                "images": sum(1 for p in (split_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                "annotations": len(rows),
                "annotations_with_polygon": sum(1 for count in rows if count > 4),
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


def list_images(root: Path, export_format: str) -> list[str]:
    """Relative paths of the export's images: those the COCO files list, or YOLO's `images/` files."""
    images = []
    if export_format == "coco":
        for annotations_file in (d / COCO_ANNOTATIONS for d in coco_split_dirs(root)):
            split = annotations_file.parent.name
            images += [f"{split}/{image['file_name']}" for image in _load_coco(annotations_file)["images"]]
    else:
        for split_dir in yolo_split_dirs(root):
            images += [
                f"{split_dir.name}/images/{p.name}"
                for p in sorted((split_dir / "images").iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES
            ]
    return images


def select_slice(root: Path, export_format: str, limit: int, seed: int) -> set[str]:
    """A seeded choice of at most `limit` images (relative paths), whole source groups at a time.

    Groups (an image and its augmented copies, in any split folder) are visited in a seeded
    random order and taken when they still fit, so a slice never splits a group and reaches
    `limit` unless only groups too large to fit are left.
    """
    groups: dict[str, list[str]] = {}
    for relative in list_images(root, export_format):
        groups.setdefault(source_group(image_id_of(relative)), []).append(relative)
    names = sorted(groups)
    kept: list[str] = []
    for position in np.random.default_rng(seed).permutation(len(names)):
        members = groups[names[position]]
        if len(kept) + len(members) <= limit:
            kept += members
        if len(kept) == limit:
            break
    return set(kept)


def copy_export(root: Path, dest: Path, export_format: str, keep: set[str] | None) -> None:
    """Copy the export's files into `dest` (bytes unchanged); with `keep`, only those images.

    Copies file contents only, not permissions: a read-only source (a shared folder) must not
    give a `data/raw` that DVC cannot remove.
    """
    kept_labels = None
    if keep is not None and export_format == "yolo":
        kept_labels = {str(PurePosixPath(p).parent.parent / "labels" / (PurePosixPath(p).stem + ".txt")) for p in keep}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        target = dest / relative
        if keep is not None:
            if path.suffix.lower() in IMAGE_SUFFIXES and relative not in keep:
                continue
            if kept_labels is not None and path.parent.name == "labels" and relative not in kept_labels:
                continue
            if export_format == "coco" and path.name == COCO_ANNOTATIONS:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(_filter_coco(_load_coco(path), path.parent.name, keep)), encoding="utf-8")
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _filter_coco(document: dict[str, Any], split: str, keep: set[str]) -> dict[str, Any]:
    """The same document with only the kept images and their annotations (ids unchanged)."""
    images = [image for image in document["images"] if f"{split}/{image['file_name']}" in keep]
    image_ids = {image["id"] for image in images}
    annotations = [a for a in document.get("annotations") or [] if a.get("image_id") in image_ids]
    return {**document, "images": images, "annotations": annotations}
