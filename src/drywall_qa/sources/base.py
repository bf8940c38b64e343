"""What every source shares: the error base, the user's names for files in the staging folder, and
the download stage's words for a COCO annotation file it cannot read."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from drywall_qa.contracts.roboflow import ExportFormatError, MalformedAnnotationsError
from drywall_qa.errors import DrywallQAError


class DownloadError(DrywallQAError):
    """Base of every error the download stage reports as one line."""


def name_user_files(message: str, dataset_dir: Path, origin: str) -> str:
    """`message` with paths under the temporary `dataset_dir` rewritten to `origin`."""
    separator = "" if origin.endswith(":") else "/"
    for form in {str(dataset_dir), str(dataset_dir.resolve())}:
        message = message.replace(form + "/", origin + separator).replace(form, origin.rstrip(":/"))
    return message


@contextlib.contextmanager
def download_wording() -> Iterator[None]:
    """The download's words for the two problems `contracts.roboflow.read_coco` finds (its tests pin them).

    The sources describe and slice an export through `read_coco` only, so a file that does not parse
    (`<file> is not valid JSON (<parser's message>)`) or is no object with an `images` list is all
    that can fail here; conversion's reader, run on the new data/raw before it replaces the old one,
    checks the rest in its own words.
    """
    try:
        yield
    except MalformedAnnotationsError as error:
        if error.parse_error is not None:
            raise ExportFormatError(f"{error.path} is not valid JSON ({error.parse_error})") from None
        raise ExportFormatError(f"{error.path} has no `images` list; not a COCO annotation file") from None
