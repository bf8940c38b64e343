"""The trained checkpoint as an MLflow pyfunc model (`mlflow.transformers` cannot log CLIPSeg).

Input: a pandas DataFrame with string columns
- `image`: the base64 encoding of an image file's bytes (PNG/JPEG/...; a `data:image/...;base64,`
  prefix is allowed). A path to a file where the model runs is read only where whoever runs the
  model opted in with the environment variable `DRYWALL_QA_PYFUNC_LOCAL_PATHS=1`: under
  `mlflow models serve` any client could otherwise make the server read (and probe) its own files.
- `prompt`: the text prompt, e.g. `segment crack`.
An image whose width x height is over `DRYWALL_QA_PYFUNC_MAX_IMAGE_PIXELS` (default 50 million,
set by whoever runs the server) is refused before it is decoded.
Params: `threshold` (a pixel whose probability is >= it is in the mask). By default each prompt
uses the rule evaluation chose for it on val (the model's `thresholds.json`: its threshold, and
whether its components are snapped to their bounding boxes; 0.5 and unsnapped for a prompt it has
none for). A `threshold` param replaces the threshold only.
Output: a list with one mask per row, a `uint8` array `[H, W]` with values {0, 255} at the image's
original size (the same contract as the pipeline's mask PNGs).

Rows that share an image are predicted together: one vision pass per distinct image.

Runtime: PyTorch by default (the logged model config `runtime: torch`). A model logged with an ONNX
export (`onnx_file`; the `register` stage does) runs it with ONNX Runtime instead when the config
says so: `mlflow.pyfunc.load_model(uri, model_config={"runtime": "onnx"})`, or, for `mlflow models
serve`, MLflow's `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"runtime": "onnx"}'` where it runs. The mask rules
are the same code and the same `thresholds.json` either way.

Bad input raises an `MlflowException` (INVALID_PARAMETER_VALUE) carrying the project's message, so
`mlflow models serve` answers HTTP 400 with that text in the response's `message` (any other
exception becomes MLflow's generic "unexpected error", with the useful text only in `stack_trace`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from drywall_qa.contracts.thresholds import DEFAULT_THRESHOLD, read_boxed, read_thresholds
from drywall_qa.errors import DrywallQAError

CHECKPOINT_ARTIFACT = "checkpoint"
THRESHOLDS_ARTIFACT = "thresholds"
ONNX_ARTIFACT = "onnx"
RUNTIMES = ("torch", "onnx")
INPUT_COLUMNS = ("image", "prompt")


LOCAL_PATHS_ENV = "DRYWALL_QA_PYFUNC_LOCAL_PATHS"
MAX_PIXELS_ENV = "DRYWALL_QA_PYFUNC_MAX_IMAGE_PIXELS"
# the download stage's default cap (data.local.max_image_pixels): far above any phone photo, far below
# the ~179 MP at which PIL itself refuses; a served request is decoded in the server's memory
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class ImageInputError(DrywallQAError, ValueError):
    """An `image` value is not base64 image bytes (nor, with the opt-in, an existing file)."""


class ModelInputError(DrywallQAError, ValueError):
    """The input DataFrame lacks a column, or a param is out of range."""


def local_paths_allowed() -> bool:
    return os.environ.get(LOCAL_PATHS_ENV, "").strip().lower() in {"1", "true", "yes"}


def max_image_pixels() -> int:
    """The server's cap on a request image's width x height (`DRYWALL_QA_PYFUNC_MAX_IMAGE_PIXELS`)."""
    configured = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not configured:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not configured.isdigit() or int(configured) <= 0:
        raise ModelInputError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {configured!r}")
    return int(configured)


def _open_within_limit(source: str | io.BytesIO, shown: str, limit: int) -> Image.Image:
    """Open lazily, check the size the header declares, and only then decode: a small file can
    declare a huge image (a decompression bomb)."""
    try:
        with warnings.catch_warnings():  # ours is the limit that applies; PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as handle:
                pixels = handle.width * handle.height
                if pixels > limit:
                    raise ImageInputError(
                        f"image {shown} is {handle.width}x{handle.height} = {pixels} pixels, over the limit of "
                        f"{limit} ({MAX_PIXELS_ENV})"
                    )
                return handle.convert("RGB")
    except Image.DecompressionBombError:
        raise ImageInputError(
            f"image {shown} declares more pixels than PIL decodes, over the limit of {limit} ({MAX_PIXELS_ENV})"
        ) from None


def decode_image(value: str, allow_paths: bool | None = None, pixel_limit: int | None = None) -> Image.Image:
    """An `image` cell as an RGB PIL image (see the module docstring for the accepted forms).

    `allow_paths`: read a string naming an existing file as a path; None follows the environment
    opt-in. Without it, the error never says whether a file exists (no probing of the server).
    `pixel_limit`: the largest width x height accepted; None follows `max_image_pixels()`.
    """
    if not isinstance(value, str) or not value:
        raise ImageInputError(f"image must be a non-empty string (base64), got {type(value).__name__}")
    allow_paths = local_paths_allowed() if allow_paths is None else allow_paths
    limit = max_image_pixels() if pixel_limit is None else pixel_limit
    shown = repr(value if len(value) <= 80 else value[:77] + "...")
    if allow_paths and len(value) < 4096 and os.path.isfile(value):
        try:
            return _open_within_limit(value, shown, limit)
        except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
            raise ImageInputError(
                f"image file {value} is not an image PIL can read ({' '.join(str(error).split())[:200]})"
            ) from None
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(payload, validate=True)
        return _open_within_limit(io.BytesIO(raw), "(base64)", limit)
    except ImageInputError:
        raise  # over the pixel limit: a ValueError too, but its own message says what is wrong
    except (binascii.Error, ValueError, OSError, SyntaxError):
        if allow_paths:
            raise ImageInputError(f"image {shown} is neither an existing file nor base64-encoded image bytes") from None
        raise ImageInputError(
            f"image {shown} is not base64-encoded image bytes (file paths are read only with {LOCAL_PATHS_ENV}=1)"
        ) from None


class ClipSegPyfunc(mlflow.pyfunc.PythonModel):
    """Text-prompted drywall segmentation: (image, prompt) rows -> {0, 255} masks."""

    def load_context(self, context) -> None:
        runtime = (context.model_config or {}).get("runtime", "torch")
        if runtime not in RUNTIMES:
            raise ModelInputError(f"model config runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "onnx":
            from drywall_qa.onnx_runtime import load_onnx_model, onnx_predict_probs

            if ONNX_ARTIFACT not in context.artifacts:
                raise ModelInputError("runtime onnx asked for, but this model was logged without an ONNX export")
            onnx_model = load_onnx_model(context.artifacts[ONNX_ARTIFACT])
            self.probs_of = lambda image, prompts: onnx_predict_probs(onnx_model, [image], prompts)[0]
        else:
            from drywall_qa.inference import predict_probs, select_device
            from drywall_qa.model import load_model

            model, processor = load_model(context.artifacts[CHECKPOINT_ARTIFACT])
            device = select_device()
            self.probs_of = lambda image, prompts: predict_probs(model, processor, [image], prompts, device=device)[0]
        self.runtime = runtime
        path = context.artifacts.get(THRESHOLDS_ARTIFACT)
        self.thresholds = read_thresholds(path) if path else {}
        self.boxed = read_boxed(path) if path else {}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[np.ndarray]:
        try:
            return self._masks(model_input, params or {})
        except DrywallQAError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error

    def _masks(self, model_input: pd.DataFrame, params: dict[str, Any]) -> list[np.ndarray]:
        from drywall_qa.contracts.masks import binarize

        missing = [column for column in INPUT_COLUMNS if column not in model_input.columns]
        if missing:
            raise ModelInputError(f"input DataFrame lacks columns {missing}; expected {list(INPUT_COLUMNS)}")
        override = params.get("threshold")
        if override is not None and not 0 <= float(override) <= 1:
            raise ModelInputError(f"param threshold must be in [0, 1], got {override!r}")
        masks: list[np.ndarray | None] = [None] * len(model_input)
        rows_by_image: dict[str, list[int]] = {}
        for row, value in enumerate(model_input["image"]):
            rows_by_image.setdefault(value, []).append(row)
        for value, rows in rows_by_image.items():
            image = decode_image(value)
            prompts = list(dict.fromkeys(str(model_input["prompt"].iloc[row]) for row in rows))
            probs = self.probs_of(image, prompts)
            for row in rows:
                prompt = str(model_input["prompt"].iloc[row])
                threshold = float(override) if override is not None else self.thresholds.get(prompt, DEFAULT_THRESHOLD)
                mask = binarize(probs[prompts.index(prompt)], threshold, self.boxed.get(prompt))
                masks[row] = mask.astype(np.uint8) * 255
        return masks


def pyfunc_signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt")]),
        params=ParamSchema([ParamSpec("threshold", "double", None)]),  # None: the val-chosen ones
    )


def pip_requirements(
    packages: Sequence[str] = (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "pillow",
        "numpy",
        "pandas",
        "mlflow",
    ),
) -> list[str]:
    """Pinned requirements of the serving environment (no slow inference by MLflow)."""
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def log_pyfunc_model(
    checkpoint_dir: str | Path,
    thresholds_file: str | Path | None = None,
    registered_model_name: str | None = None,
    name: str = "model",
    onnx_file: str | Path | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log `checkpoint_dir` (a `save_pretrained` folder) as a pyfunc model of the active run, with
    `thresholds_file` (contracts.thresholds) as its default per-prompt thresholds and `onnx_file`
    (`drywall_qa.onnx_export`), when given, as the artifact its ONNX runtime runs.

    The `drywall_qa` package goes with it (`code_paths`), so the model loads where the package is
    not installed. Registers it under `registered_model_name` when given.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a save_pretrained checkpoint (no config.json)")
    package_dir = Path(__file__).resolve().parent
    artifacts = {CHECKPOINT_ARTIFACT: str(checkpoint_dir)}
    artifacts |= {THRESHOLDS_ARTIFACT: str(thresholds_file)} if thresholds_file else {}
    artifacts |= {ONNX_ARTIFACT: str(onnx_file)} if onnx_file else {}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=ClipSegPyfunc(),
        artifacts=artifacts,
        code_paths=[str(package_dir)],
        signature=pyfunc_signature(),
        # logged so that a load may override it: MLflow only overrides keys the logged config has
        model_config={"runtime": "torch"},
        pip_requirements=pip_requirements() + (pip_requirements(("onnxruntime",)) if onnx_file else []),
        registered_model_name=registered_model_name,
    )
