"""Getting exports into data/raw: the Roboflow SDK against a local fake API, local folders and zips."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from drywall_qa.contracts.naming import image_id_of, source_group
from drywall_qa.contracts.roboflow import describe_export
from drywall_qa.sources import (
    API_KEY_ENV,
    ExportFormatError,
    ImageTooLargeError,
    MissingApiKeyError,
    UnsafeArchiveError,
    fetch_raw_data,
    roboflow_api_key,
)
from drywall_qa.sources.local import import_local_export

API_KEY = "rf-Test-s3cretKey-7f3a9c"
PROJECTS = {"cracks": ("10xConstruction", "cracks-3ii36"), "taping": ("objectdetect-pu6rn", "drywall-join-detect")}
# What a README with the key in a URL would look like; the download must not keep the key.
LEAKY_README = f"Export of this version: https://universe.roboflow.com/ds/abc?api_key={API_KEY}\n"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def local_params(datasets: dict[str, str], limit: int = 0, max_pixels: int = 50_000_000) -> dict:
    return {
        "source": "local",
        "local": {"datasets": datasets, "max_image_pixels": max_pixels, "limit_per_dataset": limit},
    }


def roboflow_params() -> dict:
    return {
        "source": "roboflow",
        "roboflow": {
            "format": "coco",
            "datasets": {name: {"workspace": ws, "project": p, "version": 1} for name, (ws, p) in PROJECTS.items()},
        },
        "local": {"datasets": {}, "max_image_pixels": 50_000_000, "limit_per_dataset": 0},
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a run could have left beside data/raw (the swap's lock file stays, as git ignores it)."""
    if not parent.exists():
        return []
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".replace-lock")]


# ---------------------------------------------------------------- fake Roboflow API


class FakeRoboflow(ThreadingHTTPServer):
    """The endpoints `Roboflow().workspace().project().version().download()` use (roboflow 1.x).

    POST /?api_key -> workspace of the key; GET /<ws> -> workspace; GET /<ws>/<project> -> project
    and its versions; GET /<ws>/<project>/<v> -> generation status; GET /<ws>/<project>/<v>/<format>
    -> export link; GET the link -> the zip (with Content-Length: the SDK sizes its progress bar).
    """

    def __init__(self, zips: dict[tuple[str, str], bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.zips = zips
        self.seen: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeRoboflow

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload: dict, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _route(self) -> None:
        self.server.seen.append(self.path)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        if parts[:1] == ["files"]:
            workspace, project = parts[1], parts[2].removesuffix(".zip")
            return self._send(200, self.server.zips[(workspace, project)], "application/zip")
        if query.get("api_key") != [API_KEY]:
            # echoes the request, key included, as some error pages do: our message must not
            message = f"This API key does not exist (or has been revoked): {self.command} {self.path}"
            return self._json({"error": {"message": message}}, 401)
        if self.command == "POST" and not parts:
            return self._json({"welcome": "Welcome to the Roboflow API.", "workspace": "10xConstruction"})
        if len(parts) == 1:
            projects = [{"id": f"{ws}/{p}"} for ws, p in self.server.zips if ws == parts[0]]
            return self._json({"workspace": {"name": parts[0], "url": parts[0], "projects": projects}})
        workspace, project = parts[0], parts[1]
        if (workspace, project) not in self.server.zips:
            return self._json({"error": {"message": f"{workspace}/{project} not found"}}, 404)
        if len(parts) == 2:
            return self._json(
                {
                    "project": {
                        "id": f"{workspace}/{project}",
                        "name": project,
                        "type": "object-detection",
                        "annotation": "joint",
                        "classes": {"joint": 10},
                        "colors": {},
                        "created": 1700000000,
                        "updated": 1700000000,
                        "images": 10,
                        "public": True,
                        "splits": {"train": 7, "valid": 2, "test": 1},
                        "unannotated": 0,
                    },
                    "versions": [
                        {
                            "id": f"{workspace}/{project}/1",
                            "name": "v1",
                            "augmentation": {},
                            "preprocessing": {},
                            "created": 1700000000,
                            "images": 10,
                            "splits": {"train": 7, "valid": 2, "test": 1},
                            "exports": ["coco"],
                        }
                    ],
                }
            )
        if len(parts) == 3:
            return self._json({"version": {"id": f"{workspace}/{project}/1", "generating": False, "images": 10}})
        link = f"{self.server.url}/files/{workspace}/{project}.zip?api_key={API_KEY}"  # worst case: key in link
        return self._json({"export": {"link": link, "format": parts[3]}})

    do_GET = _route
    do_POST = _route


@pytest.fixture(scope="module")
def served_zips(synthetic_exports) -> dict[tuple[str, str], dict[str, bytes]]:
    served = {}
    for name, project in PROJECTS.items():
        files = tree_bytes(synthetic_exports / name)
        files["README.dataset.txt"] = LEAKY_README.encode()
        served[project] = files
    return served


@pytest.fixture(scope="module")
def fake_roboflow(served_zips):
    server = FakeRoboflow({project: zip_bytes(files) for project, files in served_zips.items()})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# The stage's code path in a fresh interpreter: the SDK reads API_URL when it is imported.
# DEBUG logging on, so that any log line with the key would show up in the captured output.
DOWNLOAD_SCRIPT = """
import json, logging, os, sys
from pathlib import Path
from drywall_qa.sources import DownloadError, fetch_raw_data, roboflow_api_key
logging.basicConfig(level=logging.DEBUG)
try:
    key = roboflow_api_key(os.environ)
    params, raw_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    record = fetch_raw_data(params, seed=1, raw_dir=raw_dir, repo_root=Path("."), api_key=key)
except DownloadError as error:
    raise SystemExit(f"download: {error}")
print(json.dumps(record))
"""


def run_download(api_url: str, raw_dir: Path, key: str = API_KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBOFLOW", "API_URL"))}
    env.update(
        {
            "API_URL": api_url,
            API_KEY_ENV: key,
            "ROBOFLOW_CONFIG_DIR": str(raw_dir.parent / "no-roboflow-config.json"),  # ignore ~/.config/roboflow
        }
    )
    return subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, json.dumps(roboflow_params()), str(raw_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_roboflow_download_through_the_sdk_keeps_the_export_and_never_the_key(tmp_path, fake_roboflow, served_zips):
    raw_dir = tmp_path / "data" / "raw"
    result = run_download(fake_roboflow.url, raw_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    # the key went to the API (the SDK was really used) but nowhere else
    assert any(f"api_key={API_KEY}" in path for path in fake_roboflow.seen)
    assert any(path.startswith("/files/10xConstruction/cracks-3ii36.zip") for path in fake_roboflow.seen)
    assert API_KEY not in result.stdout and API_KEY not in result.stderr
    for path in raw_dir.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    for name, project in PROJECTS.items():
        served = dict(served_zips[project])
        downloaded = tree_bytes(raw_dir / name)
        assert downloaded.pop("README.dataset.txt") == LEAKY_README.replace(API_KEY, "***").encode()
        served.pop("README.dataset.txt")
        assert downloaded == served  # every image and annotation file byte for byte
    record = json.loads((raw_dir / "source.json").read_text())
    assert record == json.loads(result.stdout.strip().splitlines()[-1])
    assert record["source"] == "roboflow" and record["api_url"] == fake_roboflow.url
    cracks = record["datasets"]["cracks"]
    assert (cracks["workspace"], cracks["project"], cracks["version"]) == ("10xConstruction", "cracks-3ii36", 1)
    assert cracks["format"] == "coco" and cracks["geometry"] == "polygons"
    assert cracks["files_scrubbed_of_api_key"] == ["README.dataset.txt"]
    assert cracks["images"] == describe_export(raw_dir / "cracks")["images"] > 0
    assert leftovers(raw_dir.parent) == []


def test_wrong_key_is_one_redacted_line_and_writes_nothing(tmp_path, fake_roboflow):
    raw_dir = tmp_path / "data" / "raw"
    wrong = "rf-Wrong-key-0000aaaa"
    result = run_download(fake_roboflow.url, raw_dir, key=wrong)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("download: Roboflow download of 10xConstruction/cracks-3ii36 v1 (coco) failed")
    assert "revoked" in message
    assert wrong not in result.stdout + result.stderr
    assert not raw_dir.exists() and leftovers(raw_dir.parent) == []


def test_unreachable_api_is_one_clear_line_without_the_key(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw_dir = tmp_path / "data" / "raw"
    result = run_download(f"http://127.0.0.1:{port}", raw_dir)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"download: Roboflow API http://127.0.0.1:{port} is unreachable (ConnectionError")
    assert API_KEY not in result.stdout + result.stderr
    assert not raw_dir.exists() and leftovers(raw_dir.parent) == []


def test_missing_key_is_a_clear_error_naming_the_variable(tmp_path):
    with pytest.raises(MissingApiKeyError, match=API_KEY_ENV):
        roboflow_api_key({})
    with pytest.raises(MissingApiKeyError, match=API_KEY_ENV):
        roboflow_api_key({API_KEY_ENV: "  "})
    assert roboflow_api_key({API_KEY_ENV: " abc "}) == "abc"
    raw_dir = tmp_path / "data" / "raw"
    with pytest.raises(MissingApiKeyError, match=API_KEY_ENV):
        fetch_raw_data(roboflow_params(), seed=1, raw_dir=raw_dir, repo_root=tmp_path, api_key=None)
    assert not raw_dir.exists() and leftovers(raw_dir.parent) == []


# ---------------------------------------------------------------- synthetic source


def test_synthetic_source_writes_both_exports_and_provenance(tmp_path):
    params = {
        "source": "synthetic",
        "synthetic": {
            "source_images": 5,
            "augmented_copies": 1,
            "augmented_fraction": 0.4,
            "negative_fraction": 0.2,
            "image_size": 64,
        },
    }
    raw_dir = tmp_path / "data" / "raw"
    record = fetch_raw_data(params, seed=9, raw_dir=raw_dir, repo_root=tmp_path)
    assert sorted(p.name for p in raw_dir.iterdir()) == ["cracks", "source.json", "taping"]
    assert json.loads((raw_dir / "source.json").read_text()) == record
    assert record["seed"] == 9 and record["generator"]["source_images"] == 5
    for name, (workspace, project) in PROJECTS.items():
        dataset = record["datasets"][name]
        assert (dataset["workspace"], dataset["project"]) == (workspace, project)
        assert dataset["images"] == 7  # 5 sources + 2 augmented copies
        assert sum(s["images"] for s in dataset["splits"].values()) == 7
    assert record["datasets"]["taping"]["geometry"] == "boxes"
    # a second run replaces the first as a whole
    fetch_raw_data(params, seed=10, raw_dir=raw_dir, repo_root=tmp_path)
    assert json.loads((raw_dir / "source.json").read_text())["seed"] == 10
    assert leftovers(raw_dir.parent) == []


# ---------------------------------------------------------------- local source


def yolo_export(root: Path) -> Path:
    """A small Roboflow YOLO export: one box and one polygon label, an image without labels."""
    root.mkdir(parents=True)
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['drywall-join']\n")
    for split, stem, label in [
        ("train", "IMG_1_JPG_jpg.rf." + "a" * 32, "0 0.5 0.5 0.2 0.9\n0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n"),
        ("train", "IMG_1_JPG_jpg.rf." + "b" * 32, "0 0.5 0.5 0.9 0.2\n"),
        ("valid", "IMG_2_JPG_jpg.rf." + "c" * 32, None),
    ]:
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 200, 200)).save(root / split / "images" / f"{stem}.jpg")
        if label is not None:
            (root / split / "labels" / f"{stem}.txt").write_text(label)
    return root


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    zip_path.write_bytes(zip_bytes({prefix + k: v for k, v in tree_bytes(folder).items()}))
    return zip_path


def test_local_coco_folder_and_zip_are_imported_unchanged(tmp_path, synthetic_exports):
    source = synthetic_exports / "cracks"
    zip_folder(source, tmp_path / "cracks.zip", prefix="cracks-3ii36/")  # zipped with its folder
    shutil.copytree(source, tmp_path / "exports" / "cracks")
    raw_dir = tmp_path / "data" / "raw"
    # relative paths in params are relative to the repo root
    params = local_params({"cracks": "exports/cracks", "taping": "cracks.zip"})
    record = fetch_raw_data(params, seed=1, raw_dir=raw_dir, repo_root=tmp_path)
    assert tree_bytes(raw_dir / "cracks") == tree_bytes(source)
    assert tree_bytes(raw_dir / "taping") == tree_bytes(source)
    assert record["datasets"]["cracks"]["kind"] == "folder" and record["datasets"]["taping"]["kind"] == "zip"
    assert record["datasets"]["cracks"]["path"] == "exports/cracks"
    assert record["datasets"]["cracks"]["format"] == "coco" and "slice" not in record["datasets"]["cracks"]
    assert record["datasets"]["taping"]["images"] == describe_export(source)["images"]
    assert leftovers(raw_dir.parent) == []


def test_local_yolo_folder_and_zip_are_imported_unchanged(tmp_path):
    source = yolo_export(tmp_path / "yolo")
    for kind, path in [("folder", source), ("zip", zip_folder(source, tmp_path / "yolo.zip"))]:
        dest = tmp_path / kind
        dest.parent.mkdir(exist_ok=True)
        record = import_local_export(path, dest, max_image_pixels=10_000, limit=0, seed=1)
        assert tree_bytes(dest) == tree_bytes(source)
        assert record["kind"] == kind and record["format"] == "yolo" and record["geometry"] == "polygons"
        assert record["splits"] == {
            "train": {"images": 2, "annotations": 3, "annotations_with_polygon": 1},
            "valid": {"images": 1, "annotations": 0, "annotations_with_polygon": 0},
        }


def test_a_folder_that_is_no_export_is_rejected(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.jpg")
    with pytest.raises(ExportFormatError, match="not a Roboflow export"):
        import_local_export(tmp_path / "photos", tmp_path / "dest", max_image_pixels=100, limit=0, seed=1)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("evil_name", ["../evil.txt", "train/../../evil.txt", "/tmp/evil-abs.txt"])
def test_zip_slip_is_rejected_and_nothing_is_written(tmp_path, synthetic_exports, evil_name):
    files = tree_bytes(synthetic_exports / "taping")
    files[evil_name] = b"owned"
    zip_path = tmp_path / "evil.zip"
    zip_path.write_bytes(zip_bytes(files))
    raw_dir = tmp_path / "work" / "data" / "raw"
    with pytest.raises(UnsafeArchiveError, match="outside the target folder"):
        fetch_raw_data(local_params({"taping": str(zip_path)}), seed=1, raw_dir=raw_dir, repo_root=tmp_path)
    assert not raw_dir.exists() and leftovers(raw_dir.parent) == []
    assert not list(tmp_path.rglob("evil*.txt")) and not Path("/tmp/evil-abs.txt").exists()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in a few bytes: what a decompression bomb looks like to a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_stop_the_import(tmp_path, synthetic_exports):
    # folder: a plain image over a small limit
    with pytest.raises(ImageTooLargeError, match=r"96x96 = 9216 pixels, over max_image_pixels=9000"):
        import_local_export(synthetic_exports / "cracks", tmp_path / "a", max_image_pixels=9000, limit=0, seed=1)
    assert not (tmp_path / "a").exists()
    # zip: checked from the headers before extraction, over our limit and over PIL's own bomb limit
    for width, height in [(8000, 8000), (40000, 40000)]:
        files = tree_bytes(synthetic_exports / "cracks")
        files["train/bomb_png.rf." + "d" * 32 + ".png"] = png_header_only(width, height)
        zip_path = tmp_path / f"bomb{width}.zip"
        zip_path.write_bytes(zip_bytes(files))
        with pytest.raises(ImageTooLargeError, match="decompression bomb"):
            import_local_export(zip_path, tmp_path / "b", max_image_pixels=50_000_000, limit=0, seed=1)
        assert not (tmp_path / "b").exists()


def _kept_files(dataset_dir: Path) -> dict[str, list[str]]:
    """Per split: the images the annotation file lists; checks the slice is self-consistent."""
    kept = {}
    for annotations_file in sorted(dataset_dir.glob("*/_annotations.coco.json")):
        document = json.loads(annotations_file.read_text())
        names = [image["file_name"] for image in document["images"]]
        on_disk = sorted(p.name for p in annotations_file.parent.iterdir() if p != annotations_file)
        assert sorted(names) == on_disk
        ids = {image["id"] for image in document["images"]}
        assert all(a["image_id"] in ids for a in document["annotations"])
        kept[annotations_file.parent.name] = names
    return kept


def test_limit_keeps_a_seeded_slice_of_whole_groups(tmp_path, synthetic_exports):
    source = synthetic_exports / "taping"
    originals = {}
    for annotations_file in source.glob("*/_annotations.coco.json"):
        document = json.loads(annotations_file.read_text())
        for image in document["images"]:
            count = sum(1 for a in document["annotations"] if a["image_id"] == image["id"])
            originals[image["file_name"]] = (annotations_file.parent.name, count)
    record = import_local_export(source, tmp_path / "a", max_image_pixels=10**6, limit=9, seed=5)
    kept = _kept_files(tmp_path / "a")
    names = [name for split_names in kept.values() for name in split_names]
    assert len(names) == record["images"] == record["slice"]["images_kept"] == 9
    assert record["slice"] == {"limit": 9, "images_available": len(originals), "images_kept": 9}
    assert record["annotations"] == sum(originals[name][1] for name in names)  # each kept image keeps its labels
    assert all(originals[name][0] == split for split, split_names in kept.items() for name in split_names)
    groups = {source_group(image_id_of(name)) for name in names}
    for name in originals:  # whole groups: a kept source image keeps all its augmented copies
        assert (name in names) == (source_group(image_id_of(name)) in groups)
    import_local_export(source, tmp_path / "b", max_image_pixels=10**6, limit=9, seed=5)
    assert tree_bytes(tmp_path / "b") == tree_bytes(tmp_path / "a")
    import_local_export(source, tmp_path / "c", max_image_pixels=10**6, limit=9, seed=6)
    assert _kept_files(tmp_path / "c") != kept


def test_limit_on_a_yolo_export_keeps_images_with_their_labels(tmp_path):
    source = yolo_export(tmp_path / "yolo")
    record = import_local_export(source, tmp_path / "dest", max_image_pixels=10**6, limit=1, seed=0)
    files = tree_bytes(tmp_path / "dest")
    images = [k for k in files if "/images/" in k]
    labels = [k for k in files if "/labels/" in k]
    assert len(images) == 1 and record["images"] == 1 and "data.yaml" in files
    assert images[0].startswith("valid/")  # the 2 train images are one group and do not fit in 1
    assert labels == []


@pytest.mark.parametrize("link", ["file", "folder", "image", "broken"])
def test_symlinks_in_a_local_export_are_refused_and_data_raw_is_kept(tmp_path, synthetic_exports, link):
    export = tmp_path / "export"
    shutil.copytree(synthetic_exports / "cracks", export)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hostname").write_text("secret host\n")
    Image.new("RGB", (8, 8)).save(outside / "photo.jpg")
    target, name = {
        "file": (outside / "hostname", "train/notes.txt"),
        "folder": (outside, "train/extra"),
        "image": (outside / "photo.jpg", "train/linked.jpg"),
        "broken": (outside / "gone", "train/dangling.jpg"),
    }[link]
    (export / name).symlink_to(target)
    raw_dir = tmp_path / "work" / "data" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "previous.txt").write_text("the last good import")
    with pytest.raises(UnsafeArchiveError, match=f"{name}.* is a symbolic link"):
        fetch_raw_data(
            local_params({"cracks": str(export), "taping": str(synthetic_exports / "taping")}),
            seed=1,
            raw_dir=raw_dir,
            repo_root=tmp_path,
        )
    assert [p.name for p in raw_dir.iterdir()] == ["previous.txt"]  # unchanged on refusal
    assert "secret host" not in "".join(p.read_text(errors="ignore") for p in raw_dir.rglob("*") if p.is_file())


def test_a_symlink_member_of_a_zip_is_refused(tmp_path, synthetic_exports):
    zip_path = tmp_path / "links.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for relative, data in tree_bytes(synthetic_exports / "taping").items():
            archive.writestr(relative, data)
        member = zipfile.ZipInfo("train/notes.txt")
        member.external_attr = 0o120777 << 16  # S_IFLNK: how zip stores a symbolic link
        archive.writestr(member, "/etc/hostname")
    raw_dir = tmp_path / "work" / "data" / "raw"
    with pytest.raises(UnsafeArchiveError, match="'train/notes.txt', a symbolic link"):
        fetch_raw_data(local_params({"taping": str(zip_path)}), seed=1, raw_dir=raw_dir, repo_root=tmp_path)
    assert not raw_dir.exists()


def _download_with_slow_swaps(raw_dir: str, label: str, barrier) -> None:
    """One download process whose folder renames each take 0.3 s, so two of them overlap in the swap."""
    import os
    import time

    from drywall_qa.sources import write_raw_atomically

    real_replace = os.replace

    def slow_replace(source, target):
        time.sleep(0.3)
        real_replace(source, target)

    def fill(staging: Path) -> dict:
        (staging / "cracks").mkdir()
        (staging / "cracks" / "from.txt").write_text(label)
        barrier.wait(60)  # both have filled their staging folder: now both swap at once
        return {"source": label, "datasets": {}}

    os.replace = slow_replace
    write_raw_atomically(Path(raw_dir), fill)


def test_two_downloads_at_once_take_turns_and_leave_one_complete_data_raw(tmp_path):
    import multiprocessing

    raw_dir = tmp_path / "data" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "previous.txt").write_text("the last good import")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_download_with_slow_swaps, args=(str(raw_dir), label, barrier)) for label in "ab"
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]  # the second waits for the lock, then swaps
    winner = json.loads((raw_dir / "source.json").read_text())["source"]
    assert sorted(p.name for p in raw_dir.iterdir()) == ["cracks", "source.json"]
    assert (raw_dir / "cracks" / "from.txt").read_text() == winner  # one download's files, whole
    assert [p.name for p in raw_dir.parent.iterdir() if p.is_dir()] == ["raw"]  # no staging or old copy left
