"""What a model directory can do, read from its model.json alone (no weights,
no torch): the API's `GET /v1/models` and request validation use it, so
clients and the web UI offer only the controls that work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ediffi import spec
from ediffi.config import GenerationDefaults, ModelConfig


@dataclass(frozen=True)
class SizeRule:
    """Output sizes a model makes: its default, and either that size only
    (`fixed`) or any multiple of `multiple_of` pixels up to a side limit."""

    default_width: int
    default_height: int
    fixed: bool
    multiple_of: int

    def errors(self, width: int | None, height: int | None, max_side: int | None) -> dict[str, str]:
        """{field: message} for a requested width/height this model cannot make
        (``max_side``: the server's limit; None: none)."""
        problems = {}
        for name, value in (("width", width), ("height", height)):
            if value is None:
                continue
            default = self.default_width if name == "width" else self.default_height
            if self.fixed and value != default:
                problems[name] = f"this model makes {self.default_width}x{self.default_height} images only, got {value}"
            elif not self.fixed and max_side is None and (value % self.multiple_of or value < self.multiple_of):
                problems[name] = f"must be a positive multiple of {self.multiple_of}, got {value}"
            elif not self.fixed and max_side is not None and (value % self.multiple_of or not self.multiple_of <= value <= max_side):
                problems[name] = f"must be a multiple of {self.multiple_of} within [{self.multiple_of}, {max_side}], got {value}"
        return problems

    def from_init_image(
        self, width: int | None, height: int | None, image_size: tuple[int, int] | None
    ) -> tuple[int | None, int | None]:
        """A request's width/height where an init image gives those it left out: the image's size
        rounded down to the model's multiple, as diffusers' image processor does (a fixed-size
        model: its size); without an init image, as sent."""
        if image_size is None:
            return width, height
        if self.fixed:
            made = (self.default_width, self.default_height)
        else:
            made = tuple(side - side % self.multiple_of for side in image_size)
        return width or made[0], height or made[1]


@dataclass(frozen=True)
class NoiseLevelRule:
    """The `sr_noise_level` a noise-level SR stage (IF stage II) takes: timesteps
    of its image-noising schedule in [min, max], `default` when absent."""

    default: int | None  # None: a model.json without it (the importer always writes it)
    min: int
    max: int


@dataclass(frozen=True)
class ModelCapabilities:
    id: str
    sizes: SizeRule
    stages: list[dict] = field(default_factory=list)
    paint_with_words: bool = True
    style_image: bool = True
    source: str = "ediffi"
    sr_noise_level: NoiseLevelRule | None = None  # None: the request field does not apply
    created: int = 0  # OpenAI's `created`: the model.json's modification time (epoch s); 0: unknown
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # of the sampling fields
    # Whether `use_karras_sigmas: false` applies: every stage an imported (discrete-time)
    # checkpoint, whose scheduler samples on its own spaced sigmas.
    scheduler_sigmas: bool = False
    # The fewest steps pndm takes: 4 where a stage's PNDMScheduler starts with Runge-Kutta steps.
    pndm_min_steps: int = 1
    # img2img: an init image (and its strength) is taken: an imported latent model of one stage
    # (SD, SDXL), whose VAE encodes it, as diffusers' img2img pipelines; and with it a mask (inpainting).
    init_image: bool = False
    # An inpainting checkpoint (its UNet takes the mask): every request sends an init image and a mask.
    mask_required: bool = False
    # Why ddpm cannot reproduce this checkpoint's DDPMScheduler (its variance_type), else None.
    ddpm_error: str | None = None

    def max_side(self, max_image_side: int) -> int:
        """The largest width/height a request may ask for: the server's limit, or
        a fixed-size model's own size (it makes nothing else)."""
        if self.sizes.fixed:
            return max(self.sizes.default_width, self.sizes.default_height)
        return max_image_side

    def sr_noise_level_error(self, value: int | None) -> str | None:
        """Why a requested `sr_noise_level` cannot be honoured, else None."""
        rule = self.sr_noise_level
        if value is None:
            return None
        if rule is None:
            return "this model has no super-resolution stage with noise levels"
        if not rule.min <= value <= rule.max:
            return f"must be within [{rule.min}, {rule.max}], got {value}"
        return None

    def request_errors(
        self, *, sampler: str | None, steps: int | None, use_karras_sigmas: bool | None, sr_noise_level: int | None,
        init_image: bool = False, strength: float | None = None, mask: bool = False,
    ) -> dict[str, str]:
        """field -> why this model cannot honour it, for the sampling fields of a request (its left-out
        fields filled from the defaults first); empty when it can. The API, the command line and the
        pipeline all ask this."""
        errors: dict[str, str] = {}
        if (message := self.sr_noise_level_error(sr_noise_level)) is not None:
            errors["sr_noise_level"] = message
        if init_image and not self.init_image:
            errors["init_image"] = (
                "this model takes no init image: img2img is for imported latent models (Stable Diffusion, SDXL)"
            )
        elif init_image and steps is not None:
            try:
                spec.init_image_steps(steps, self.defaults.strength_for(mask) if strength is None else strength)
            except spec.InputError as exc:
                errors[exc.field] = exc.message
            if sampler == "pndm" and self.pndm_min_steps > 1:
                errors["sampler"] = (
                    "pndm with a Runge-Kutta start (this checkpoint's skip_prk_steps false) from an init image is not "
                    "served; choose another sampler"
                )
        elif strength is not None and not init_image:
            errors["strength"] = "goes with an init_image (img2img)"
        if mask and not init_image:
            errors["mask"] = "goes with an init_image: the mask says which of its pixels to repaint (white) and keep (black)"
        elif self.mask_required and not (init_image and mask):
            errors["mask"] = "this is an inpainting checkpoint (its UNet takes the mask): send an init_image and a mask"
        if "sampler" in errors:
            return errors
        if (message := self.sampler_error(sampler)) is not None:
            errors["sampler"] = message
            return errors  # its steps and sigmas are no second problem
        if sampler == "pndm" and steps is not None and steps < self.pndm_min_steps:
            errors["steps"] = (
                f"pndm with this checkpoint's scheduler starts with Runge-Kutta steps (skip_prk_steps false): "
                f"at least {self.pndm_min_steps}, got {steps}"
            )
        if (message := self.karras_sigmas_error(use_karras_sigmas, sampler)) is not None:
            errors["use_karras_sigmas"] = message
        return errors

    def sampler_error(self, sampler: str | None) -> str | None:
        """Why this model cannot sample with ``sampler``, else None: ddim, pndm and ddpm are diffusers
        schedulers' timesteps, which only an imported checkpoint has."""
        if sampler in spec.SCHEDULER_ONLY_SAMPLERS and not self.scheduler_sigmas:
            return (
                f"{sampler!r} reproduces a diffusers scheduler on an imported checkpoint's own timesteps; "
                f"this model samples on the Karras schedule: choose one of {', '.join(self.samplers)}"
            )
        if sampler == "ddpm" and self.ddpm_error is not None:
            return f"{self.ddpm_error}; choose one of {', '.join(self.samplers)}"
        return None

    @property
    def samplers(self) -> list[str]:
        """The samplers this model serves."""
        served = spec.SAMPLERS if self.scheduler_sigmas else spec.ANY_MODEL_SAMPLERS
        return [s for s in served if not (s == "ddpm" and self.ddpm_error is not None)]

    def karras_sigmas_error(self, use_karras_sigmas: bool | None, sampler: str | None) -> str | None:
        """Why a request's ``use_karras_sigmas`` cannot be honoured (with its ``sampler``), else None."""
        if use_karras_sigmas is None:
            return None
        if use_karras_sigmas:
            if sampler in spec.SCHEDULER_ONLY_SAMPLERS:
                return f"{sampler} steps its diffusers scheduler's own timesteps: send false or leave it out"
            return None
        if not self.scheduler_sigmas:
            return "this model samples on the Karras schedule only; false is for imported diffusers checkpoints"
        if sampler not in spec.SCHEDULER_SIGMA_SAMPLERS + spec.SCHEDULER_ONLY_SAMPLERS:
            return (
                f"false goes with sampler {', '.join(spec.SCHEDULER_SIGMA_SAMPLERS + spec.SCHEDULER_ONLY_SAMPLERS)} "
                f"(diffusers' schedulers on their own sigmas), got {sampler!r}"
            )
        return None

    def as_json(self, *, max_image_side: int, max_n: int, max_steps: int) -> dict:
        """`GET /v1/models`' capabilities: the model's fields as they always were
        (clients rely on them), then what a client may send with the server's
        limits (settings, passed in: this layer reads none)."""
        described = asdict(self)
        # under "request", with the other request fields
        del described["sr_noise_level"], described["defaults"], described["scheduler_sigmas"], described["pndm_min_steps"]
        del described["ddpm_error"]
        # (init_image stays: a feature flag like style_image; its strength is under "request")
        described["mask"] = self.init_image  # inpainting: wherever an init image is taken
        described["max_side"] = self.max_side(max_image_side)
        described["samplers"] = self.samplers
        described["request"] = {
            "n": {"default": 1, "min": 1, "max": max_n},
            "steps": {"default": self.defaults.steps_within(max_steps), "min": 1, "max": max_steps},
            "guidance_scale": {
                "default": self.defaults.guidance_scale, "min": 0.0, "max": spec.MAX_GUIDANCE,
                "off_at_or_below": spec.GUIDANCE_OFF_AT_OR_BELOW,
            },
            # image k uses seed + k: seed + n - 1 <= max; -1 (A1111's) or absent: the server picks one
            "seed": {"min": 0, "max": spec.MAX_SEED, "random": spec.RANDOM_SEED},
            "sampler": {"default": self.defaults.sampler},
            "sr_noise_level": None if self.sr_noise_level is None else asdict(self.sr_noise_level),
            # false: the scheduler's own sigmas (euler, dpmpp_2m, euler_a, unipc; ddim, pndm and ddpm always); null where only Karras's apply
            "use_karras_sigmas": {"default": self.defaults.use_karras_sigmas} if self.scheduler_sigmas else None,
            # with an init_image (img2img): int(steps x strength) steps run; null where none is taken
            # (default_with_mask: inpainting's, diffusers' inpaint pipelines')
            "strength": {
                "default": spec.DEFAULT_INIT_STRENGTH, "default_with_mask": self.defaults.inpaint_strength,
                "min": 0.0, "max": 1.0, "exclusive_min": True,
            } if self.init_image else None,
        }
        return described


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
        sr_noise_level=noise_level_rule(config), defaults=config.request_defaults,
        scheduler_sigmas=all(stage.schedule is not None for stage in config.stages),
        pndm_min_steps=4 if any(s.schedule is not None and not s.schedule.skip_prk_steps for s in config.stages) else 1,
        init_image=config.is_imported and len(config.stages) == 1 and config.stages[0].latent is not None,
        mask_required=any(stage.mask_channels for stage in config.stages),
        ddpm_error=ddpm_error(config),
    )


def ddpm_error(config: ModelConfig) -> str | None:
    """Why ddpm cannot reproduce a stage's DDPMScheduler (TrainingScheduleConfig.ddpm_variance_type), else None."""
    for stage in config.stages:
        if stage.schedule is None:
            continue
        try:
            stage.schedule.ddpm_variance_type(stage.learned_variance)
        except spec.InputError as exc:
            return exc.message
    return None


def noise_level_rule(config: ModelConfig) -> NoiseLevelRule | None:
    """`sr_noise_level` of a model with noise-level SR stages: below the shortest
    image-noising schedule (one level is used for every such stage), default
    the first such stage's (diffusers' pipeline default, 250 for IF)."""
    stages = [s for s in config.stages if s.noise_level_schedule is not None]
    if not stages:
        return None
    limit = min(s.noise_level_schedule.num_train_timesteps for s in stages)
    return NoiseLevelRule(default=stages[0].low_res_noise_level, min=0, max=limit - 1)
