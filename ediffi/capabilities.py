"""What a model directory can do, read from its model.json alone (no weights,
no torch): the API's `GET /v1/models` and request validation use it, so
clients and the web UI offer only the controls that work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ediffi.config import ModelConfig


@dataclass(frozen=True)
class SizeRule:
    """Output sizes a model makes: its default, and either that size only
    (`fixed`) or any multiple of `multiple_of` pixels up to a side limit."""

    default_width: int
    default_height: int
    fixed: bool
    multiple_of: int

    def errors(self, width: int | None, height: int | None, max_side: int) -> dict[str, str]:
        """{field: message} for a requested width/height this model cannot make."""
        problems = {}
        for name, value in (("width", width), ("height", height)):
            if value is None:
                continue
            default = self.default_width if name == "width" else self.default_height
            if self.fixed and value != default:
                problems[name] = f"this model makes {self.default_width}x{self.default_height} images only, got {value}"
            elif not self.fixed and (value % self.multiple_of or not self.multiple_of <= value <= max_side):
                problems[name] = f"must be a multiple of {self.multiple_of} within [{self.multiple_of}, {max_side}], got {value}"
        return problems


@dataclass(frozen=True)
class ModelCapabilities:
    id: str
    sizes: SizeRule
    stages: list[dict] = field(default_factory=list)
    paint_with_words: bool = True
    style_image: bool = True
    source: str = "ediffi"

    def as_json(self) -> dict:
        return asdict(self)


def model_capabilities(config: ModelConfig) -> ModelCapabilities:
    last = config.stages[-1]
    if last.latent is not None:
        sizes = SizeRule(last.image_size, last.image_size, fixed=False, multiple_of=last.latent.size_multiple)
    else:
        sizes = SizeRule(last.image_size, last.image_size, fixed=True, multiple_of=last.image_size)
    stages = [
        {
            "name": stage.name,
            "space": "latent" if stage.latent is not None else "pixel",
            "experts": [
                {
                    "name": e.name, "sigma_lo": e.sigma_lo, "sigma_hi": e.sigma_hi,
                    "kind": "diffusers_unet" if e.is_discrete else "ediffi_unet",
                }
                for e in sorted(stage.experts, key=lambda e: -e.sigma_lo)
            ],
        }
        for stage in config.stages
    ]
    return ModelCapabilities(
        id=config.name, sizes=sizes, stages=stages, paint_with_words=True,
        style_image=not config.is_imported, source=str(config.training.get("pipeline", "ediffi")),
    )
