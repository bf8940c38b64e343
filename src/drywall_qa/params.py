"""Reading params.yaml: the one place parameters come from, checked at load against one schema.

YAML 1.2, as DVC reads and writes params (ruamel): `dvc exp run -S lr=5e-5` writes `lr: 5e-05`,
which YAML 1.2 reads as a float (PyYAML's YAML 1.1 read it as a string). Every key, type, range and
choice is declared once below (pydantic); a bad value stops the stage with one line naming the key,
e.g. `params.yaml: lr must be a number, got 'abc'`. Stages get plain dicts of checked values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from drywall_qa.errors import DrywallQAError

Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Seed = int
LearningRate = Annotated[float, Field(gt=0)]
SchemaT = TypeVar("SchemaT", bound=BaseModel)


class ParamsError(DrywallQAError, ValueError):
    """params.yaml is unreadable or a value breaks the schema; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class SyntheticParams(_Section):
    source_images: Positive
    augmented_copies: NonNegative
    augmented_fraction: Fraction
    negative_fraction: Fraction
    image_size: Annotated[int, Field(ge=64)]


class RoboflowDataset(_Section):
    workspace: str
    project: str
    version: Positive


class RoboflowParams(_Section):
    format: Literal["coco", "yolo"]
    datasets: dict[str, RoboflowDataset]


class LocalParams(_Section):
    datasets: dict[str, str]
    max_image_pixels: Positive
    limit_per_dataset: NonNegative


class DataParams(_Section):
    source: Literal["synthetic", "roboflow", "local"]
    synthetic: SyntheticParams
    roboflow: RoboflowParams
    local: LocalParams


class SplitParams(_Section):
    train: Fraction
    val: Fraction
    test: Fraction
    shuffles: Positive

    @model_validator(mode="after")
    def fractions_sum_to_one(self) -> SplitParams:
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {self.train} + {self.val} + {self.test}")
        return self


class ModelParams(_Section):
    weights: str | None
    preset: Literal["tiny", "small", "base"]
    freeze_backbone: bool
    image_size: Positive
    conv_stem: list[Positive] | None = None  # scratch only: channel widths of the convolutional stem
    skip_decoder: list[Positive] | None = None  # widths of the skip-connected upsampler on the stem's maps

    @model_validator(mode="after")
    def skip_decoder_has_a_stem(self) -> ModelParams:
        if self.skip_decoder and (self.weights or not self.conv_stem):
            raise ValueError("skip_decoder reads the conv stem's feature maps: it needs conv_stem and weights null")
        if self.skip_decoder and len(self.skip_decoder) >= len(self.conv_stem):
            raise ValueError(
                f"skip_decoder has {len(self.skip_decoder)} levels; a {len(self.conv_stem)}-layer conv_stem "
                f"has {len(self.conv_stem) - 1} maps finer than its patch grid"
            )
        return self


class InferenceParams(_Section):
    mode: Literal["resize", "whole", "sliding"] = "resize"
    scale: Annotated[float, Field(ge=0.05, le=8)] = 1.0
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    flips: list[Literal["horizontal", "vertical"]] = []
    sizes: list[Annotated[int, Field(ge=16, le=4096)]] = []  # resize mode only

    @model_validator(mode="after")
    def views_fit_the_mode(self) -> InferenceParams:
        if len(set(self.flips)) != len(self.flips):
            raise ValueError(f"flips must be distinct, got {self.flips}")
        if self.sizes and self.mode != "resize":
            raise ValueError(f"sizes applies to mode resize only (mode {self.mode!r} uses inference.scale)")
        return self


class TrainParams(_Section):
    epochs: Positive
    batch_size: Positive
    weight_decay: Annotated[float, Field(ge=0)]
    scheduler: Literal["cosine", "constant"]
    warmup_epochs: Annotated[float, Field(ge=0)]
    early_stopping_patience: Positive
    grad_clip: Annotated[float, Field(ge=0)]
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bce_weight: Annotated[float, Field(ge=0)]
    dice_weight: Annotated[float, Field(ge=0)]
    negative_prompts: bool
    augment: bool
    cache_activations: bool
    cached_views: Positive
    num_threads: Positive
    crop_scale_jitter: Annotated[list[Annotated[float, Field(ge=0.1, le=4)]], Field(min_length=2, max_length=2)] = [
        1.0,
        1.0,
    ]
    crop_foreground_prob: Fraction = 0.5
    augment_scale: Annotated[list[Annotated[float, Field(ge=0.25, le=4)]], Field(min_length=2, max_length=2)] = [
        0.9,
        1.1,
    ]
    augment_color: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    cldice_weight: Annotated[float, Field(ge=0)] = 0.0
    cldice_datasets: list[str] = ["cracks"]
    sample_prompts: bool = False
    seed: Seed | None = None  # None: the top-level seed; another value retrains on the same split
    deep_supervision: Annotated[float, Field(ge=0)] = 0.0  # > 0: needs model.skip_decoder (TrainConfig checks)

    @model_validator(mode="after")
    def ranges_are_ordered(self) -> TrainParams:
        if self.bce_weight + self.dice_weight == 0:
            raise ValueError("bce_weight and dice_weight must not both be 0")
        low, high = self.crop_scale_jitter
        if low > high:
            raise ValueError(f"crop_scale_jitter must be [low, high] with low <= high, got {self.crop_scale_jitter}")
        low, high = self.augment_scale
        if not low <= 1 <= high:
            raise ValueError(f"augment_scale must be [low, high] with low <= 1 <= high, got {self.augment_scale}")
        return self


class EvaluateParams(_Section):
    thresholds: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(min_length=1)]
    batch_size: Positive
    zero_shot: bool
    timing_images: NonNegative
    box_snapping: list[Literal["boxes", "arms"]]  # the snaps val may choose per prompt (contracts.mask_rule)


class VisualizeParams(_Section):
    examples_per_prompt: Positive
    worst_k: NonNegative


class GateParams(_Section):
    metrics_file: str
    baseline_file: str | None = None  # the committed record the registry's gate compares with (None: metrics_file)
    keys: list[str]
    tolerance: Annotated[float, Field(ge=0)]


class MlflowParams(_Section):
    experiment: str
    registered_model: str | None


class Params(_Section):
    seed: Seed
    lr: LearningRate
    cpu_numerics: Literal["portable", "native"]
    data: DataParams
    prompts: dict[str, Annotated[list[str], Field(min_length=1)]]
    split: SplitParams
    model: ModelParams
    inference: InferenceParams = InferenceParams()
    train: TrainParams
    evaluate: EvaluateParams
    visualize: VisualizeParams
    gate: GateParams
    mlflow: MlflowParams


_KINDS = {
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "missing": "is missing",
    "extra_forbidden": "is not a known parameter",
}


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "params.yaml"
    kind = error["type"]
    if kind in ("missing", "extra_forbidden"):
        return f"{key} {_KINDS[kind]}"
    if kind == "value_error":  # a check across keys (split fractions): its own message says it all
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    text = _KINDS.get(kind) or error["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return f"{key} {text}, got {error['input']!r}"


def check_params(raw: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Raw params (as YAML loaded them) -> checked plain dict; ParamsError naming every bad key."""
    return validated(Params, raw, source).model_dump(mode="python")


def validated(schema: type[SchemaT], raw: Any, source: str = "params.yaml") -> SchemaT:
    """`raw` checked against `schema` (Params or a view of some of its sections, like the training
    config); ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of parameters, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(item) for item in error.errors())
        raise ParamsError(f"{source}: {problems}") from None


def load_params_text(text: str, source: str = "params.yaml") -> dict[str, Any]:
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as error:
        raise ParamsError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None
    return check_params(raw if raw is not None else {}, source)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml, read with YAML 1.2 and checked (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ParamsError(f"cannot read {path}: {error.strerror}") from None
    return load_params_text(text, str(path))


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, for logging to MLflow."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
