"""The training config: the params that shape a run (`seed`, `lr`, `model`, `train`, `inference`),
typed by params.yaml's own schema (`drywall_qa.params`), so a parameter is declared once, there.

Nothing here imports torch: the report reads the same typed config to describe the run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from drywall_qa.errors import DrywallQAError
from drywall_qa.params import InferenceParams, LearningRate, ModelParams, Seed, TrainParams, validated


class TrainConfigError(DrywallQAError, ValueError):
    """Parameters that cannot train on this manifest (e.g. a clDice dataset it lacks)."""


class TrainConfig(BaseModel):
    """Every parameter that shapes a training run, grouped as in params.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: Seed
    lr: LearningRate
    model: ModelParams
    train: TrainParams
    inference: InferenceParams = InferenceParams()

    @model_validator(mode="after")
    def deep_supervision_has_side_heads(self) -> TrainConfig:
        if self.train.deep_supervision > 0 and not self.model.skip_decoder:
            raise ValueError(
                "train.deep_supervision scores the skip decoder's coarser levels: set model.skip_decoder "
                "(and model.conv_stem), or train.deep_supervision: 0"
            )
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.yaml") -> TrainConfig:
        """The config from a stage's params (other sections are ignored); ParamsError naming a bad key."""
        return validated(cls, {key: params[key] for key in cls.model_fields if key in params}, source)

    def changed(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some keys of some sections changed, checked again: `config.changed(train={"epochs": 2})`."""
        raw = self.model_dump()
        for name, values in sections.items():
            raw[name] = {**raw[name], **values} if isinstance(raw[name], dict) else values
        return validated(TrainConfig, raw, "changed config")

    @property
    def training_seed(self) -> int:
        """The seed of the weights' init, the augmentation and the shuffle: `train.seed`, else the top-level
        seed (which also drew the split, so a second training seed keeps val and test the same)."""
        return self.seed if self.train.seed is None else self.train.seed

    @property
    def weights_init(self) -> str:
        """Where the weights start: a Hub id or folder, or `scratch:<preset>[+conv_stem][+skip_decoder]`."""
        if self.model.weights:
            return str(self.model.weights)
        parts = [f"scratch:{self.model.preset}"]
        if self.model.conv_stem:
            parts.append("conv_stem")
        if self.model.skip_decoder:
            parts.append("skip_decoder")
        return "+".join(parts)

    @property
    def uses_cache(self) -> bool:
        return self.model.freeze_backbone and self.train.cache_activations
