"""What an import refuses before anything is written: zip members outside the target (zip-slip) or
that are links, links inside an export folder, and images over `max_image_pixels`.

Image size guard (`max_image_pixels`): an image whose header declares more pixels is an error
that stops the import before anything is written, not a skip. A real Roboflow export never
holds such an image (it resizes to 640x640), so one is a corrupt or hostile file, and dropping
it would silently change the dataset. The check reads only the image header (PIL opens lazily).
PIL's own decompression-bomb limit (about 179 million pixels) still applies above ours.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image, UnidentifiedImageError

from drywall_qa.contracts.roboflow import ExportFormatError, is_image_file
from drywall_qa.sources.base import DownloadError


class UnsafeArchiveError(DownloadError):
    """A zip member would be written outside the target folder (zip-slip)."""


class ImageTooLargeError(DownloadError):
    """An image declares more pixels than `max_image_pixels` (decompression-bomb guard)."""


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
                if not member.is_dir() and is_image_file(PurePosixPath(member.filename)):
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
        if path.is_file() and is_image_file(path):
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
