"""The `roboflow` source: the real `roboflow` SDK, the API key from `ROBOFLOW_API_KEY` only.

The API key is removed from every message, captured SDK output and downloaded text file before any
of them can reach a log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import requests

from drywall_qa.contracts.roboflow import describe_export
from drywall_qa.sources.base import DownloadError
from drywall_qa.sources.guards import check_image_pixels

log = logging.getLogger(__name__)

API_KEY_ENV = "ROBOFLOW_API_KEY"
# Downloaded files that are text and may be scrubbed of the API key; the key in any other
# file (an image) cannot be removed without corrupting it and is an error.
TEXT_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".csv", ".xml", ".md", ".html"}


class MissingApiKeyError(DownloadError):
    pass


class RoboflowUnavailableError(DownloadError):
    """The Roboflow API could not be reached (network, DNS, refused connection)."""


class RoboflowDownloadError(DownloadError):
    """The Roboflow API answered, but not with the export (bad key, unknown project, ...)."""


def roboflow_api_key(env: Mapping[str, str]) -> str:
    """The API key from `ROBOFLOW_API_KEY` (never from params or files)."""
    key = (env.get(API_KEY_ENV) or "").strip()
    if not key:
        raise MissingApiKeyError(f"data.source is roboflow but {API_KEY_ENV} is not set; export your Roboflow API key")
    return key


def fill_roboflow(
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
