"""The model directory's `model.json`, validated with pydantic.

A model directory holds one cascade: a base stage followed by zero or more
super-resolution (SR) stages. Each stage is an ensemble of expert denoisers,
each owning a half-open noise interval [sigma_lo, sigma_hi). Experts are
routed by sigma, never by step index (DESIGN §1).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_JSON = "model.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UNetConfig(_Strict):
    """Architecture of one expert denoiser network F (EDM eq. 7)."""

    in_channels: int = 3
    out_channels: int = 3
    # Channels of the (upsampled, noise-augmented) low-res image concatenated
    # to the input; 0 for the base stage.
    low_res_channels: int = 0
    model_channels: int = 32
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    # Feature-map resolutions (in pixels) that get self- and cross-attention.
    attention_resolutions: list[int] = Field(default_factory=lambda: [16])
    num_heads: int = 2
    # Width of the cross-attention context: T5 and CLIP token embeddings are
    # placed in disjoint column blocks of one [L, t5_dim + clip_dim] tensor.
    context_dim: int = 64
    # Width of the pooled vector: pooled CLIP text + CLIP image embedding.
    pooled_dim: int = 32
    embedding_dim: int = 128
    fourier_scale: float = 16.0
    dropout: float = 0.0
    groups: int = 8
    # Two extra input channels holding each pixel's (x, y) in [-1, 1]
    # (CoordConv, Liu et al. 2018): the cross-attention queries then know
    # where they are, so a small model learns "top left" and paint-with-words
    # placement from far fewer updates than from zero padding alone.
    coord_channels: bool = False

    @field_validator("channel_mult")
    @classmethod
    def _non_empty(cls, v: list[int]) -> list[int]:
        if not v or any(m <= 0 for m in v):
            raise ValueError("channel_mult must be a non-empty list of positive ints")
        return v


class ExpertConfig(_Strict):
    """One expert: its noise interval and its network.

    The interval is half-open, [sigma_lo, sigma_hi): a boundary sigma belongs
    to the expert whose `sigma_lo` equals it, i.e. to the higher-noise expert.
    `sigma_hi` may be null (infinity) for the highest-noise expert.
    """

    name: str
    sigma_lo: float = Field(ge=0.0)
    sigma_hi: float | None = None
    weights: str
    network: UNetConfig

    @property
    def sigma_hi_value(self) -> float:
        return math.inf if self.sigma_hi is None else self.sigma_hi

    def owns(self, sigma: float) -> bool:
        return self.sigma_lo <= sigma < self.sigma_hi_value


class StageConfig(_Strict):
    name: str
    image_size: int = Field(gt=0)
    channels: int = 3
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = 7.0
    # Noise augmentation level applied to the low-res conditioning image at
    # inference (cascaded diffusion, Ho et al. 2021); SR stages only.
    low_res_aug_sigma: float = 0.0
    experts: list[ExpertConfig]

    @model_validator(mode="after")
    def _experts_cover_range(self) -> StageConfig:
        validate_expert_coverage(self.name, self.experts)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"stage {self.name!r}: sigma_min must be < sigma_max")
        return self

    @property
    def is_super_resolution(self) -> bool:
        return self.experts[0].network.low_res_channels > 0


def validate_expert_coverage(stage: str, experts: list[ExpertConfig]) -> None:
    """Experts must tile [0, inf) with half-open intervals: no gaps, no overlaps.

    Tiling all of [0, inf) (not just [sigma_min, sigma_max]) means any sigma a
    sampler can produce, including a Heun correction at sigma_{i+1} or a user
    who asks for a larger sigma_max, has exactly one owner.
    """
    if not experts:
        raise ValueError(f"stage {stage!r}: at least one expert is required")
    ordered = sorted(experts, key=lambda e: e.sigma_lo)
    if ordered[0].sigma_lo != 0.0:
        raise ValueError(
            f"stage {stage!r}: gap in expert coverage: [0, {ordered[0].sigma_lo}) has no expert "
            f"(the lowest-noise expert must start at sigma_lo = 0)"
        )
    for lower, upper in zip(ordered, ordered[1:]):
        if lower.sigma_hi is None or lower.sigma_hi_value > upper.sigma_lo:
            raise ValueError(
                f"stage {stage!r}: experts {lower.name!r} [{lower.sigma_lo}, {lower.sigma_hi_value}) and "
                f"{upper.name!r} [{upper.sigma_lo}, {upper.sigma_hi_value}) overlap"
            )
        if lower.sigma_hi_value < upper.sigma_lo:
            raise ValueError(
                f"stage {stage!r}: gap in expert coverage: [{lower.sigma_hi_value}, {upper.sigma_lo}) "
                f"between {lower.name!r} and {upper.name!r}"
            )
    if ordered[-1].sigma_hi is not None:
        raise ValueError(
            f"stage {stage!r}: gap in expert coverage above sigma={ordered[-1].sigma_hi}: "
            f"the highest-noise expert {ordered[-1].name!r} must have sigma_hi = null (infinity)"
        )
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"stage {stage!r}: expert names must be unique, got {names}")


class TextEncoderConfig(_Strict):
    """A transformers text tower in a local folder (config, weights, tokenizer)."""

    path: str
    max_length: int = Field(32, gt=1)


class VisionEncoderConfig(_Strict):
    path: str


class EncodersConfig(_Strict):
    t5: TextEncoderConfig
    clip_text: TextEncoderConfig
    clip_vision: VisionEncoderConfig


class ModelConfig(_Strict):
    format_version: int = 1
    name: str = "ediffi"
    sigma_data: float = 0.5
    encoders: EncodersConfig
    stages: list[StageConfig]
    # Free-form provenance (training command, steps, wall time).
    training: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cascade_is_consistent(self) -> ModelConfig:
        if not self.stages:
            raise ValueError("a model needs at least one stage")
        if self.stages[0].is_super_resolution:
            raise ValueError(f"the first stage {self.stages[0].name!r} must be a base stage (low_res_channels = 0)")
        for previous, stage in zip(self.stages, self.stages[1:]):
            if not stage.is_super_resolution:
                raise ValueError(f"stage {stage.name!r} follows another stage, so it must be super-resolution")
            if stage.image_size < previous.image_size:
                raise ValueError(f"stage {stage.name!r} is smaller than the stage before it")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    @property
    def image_size(self) -> int:
        return self.stages[-1].image_size

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / MODEL_JSON
        if not path.is_file():
            raise FileNotFoundError(f"model directory {Path(model_dir)} has no {MODEL_JSON} (looked for {path})")
        return cls.model_validate_json(path.read_text())

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / MODEL_JSON).write_text(self.model_dump_json(indent=2) + "\n")
