"""The model directory's `model.json`, validated with pydantic.

A model directory holds one cascade: a base stage followed by zero or more
super-resolution (SR) stages. Each stage is an ensemble of expert denoisers,
each owning a half-open noise interval [sigma_lo, sigma_hi). Experts are
routed by sigma, never by step index (docs/architecture.md §1).
"""

from __future__ import annotations

import math
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ediffi import spec

MODEL_JSON = "model.json"

#: The shipped model: models/default in a checkout (and at /app/models/default in the images).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


def resolve_model_dir(cli_value: str | Path | None, configured: str | Path | None) -> Path:
    """--model-dir, else the configured EDIFFI_MODEL_DIR, else the shipped model."""
    if cli_value:
        return Path(cli_value)
    if configured:
        return Path(configured)
    return DEFAULT_MODEL_DIR


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


#: DDPMScheduler's variance_type values.
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]


class TrainingScheduleConfig(_Strict):
    """A discrete-time checkpoint's training noise schedule (the diffusers
    scheduler config fields that fix its sigmas and its inference timesteps)."""

    num_train_timesteps: int = Field(1000, gt=1)
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    trained_betas: list[float] | None = None
    # How diffusers spaces the inference timesteps; it fixes the end points of
    # its Karras schedule and how it scales the initial noise (see discrete.py).
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace"
    # False where the folder's scheduler config names no spacing: each diffusers scheduler class then
    # takes its own default (Euler: linspace, the one above; DDIM and PNDM: leading, as SD 1.x runs).
    timestep_spacing_given: bool = True
    steps_offset: int = 0
    # DDIM / PNDM: alpha_bar past t = 0 is 1 (true) or alpha_bar_0 (false, SD's config); None: the
    # config names none, each class's default (DDIM true, PNDM false).
    set_alpha_to_one: bool | None = None
    # DDIM: clip its predicted x0 to [-range, range]; None: the config names none, DDIMScheduler's
    # default (true). The other samplers never clip (their diffusers schedulers have no such option).
    clip_sample: bool | None = None
    # PNDM: skip its Runge-Kutta start (PLMS, SD's config); None: the config names none, PNDM's default (false)
    skip_prk_steps: bool | None = None
    clip_sample_range: float = Field(1.0, gt=0.0)
    # DDPM: the variance of its ancestral step (DDPMScheduler's variance_type); None: the config names
    # none, the class default fixed_small (learned_range for a UNet that predicts its variance: a model
    # directory imported before the field was written).
    variance_type: VarianceType | None = None

    # The diffusers scheduler (with use_karras_sigmas) whose conventions the
    # sampler reproduces: its Karras end points, the timesteps its UNet calls
    # see and its initial noise scale (discrete.py). IF uses DPM-Solver++:
    # diffusers' Euler cannot take a learned-variance output.
    karras_scheduler: Literal[
        "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"
    ] = "EulerDiscreteScheduler"
    # False: the scheduler's own spaced sigmas instead of Karras's, as diffusers'
    # default EulerDiscreteScheduler (use_karras_sigmas=False); a request's choice
    # (discrete.request_schedule), with Euler or DPM++ 2M.
    use_karras_sigmas: bool = True

    def ddpm_variance_type(self, learned_variance: bool) -> str:
        """The variance_type DDPMScheduler.from_config(the checkpoint's config) steps with: the config's,
        else the class default fixed_small; for a UNet that predicts its variance in a model directory
        written before the field was (the importer refuses a learned UNet with a fixed variance_type),
        learned_range, IF's. Raises InputError (``sampler``) where diffusers' step cannot run:
        fixed_large_log (the square root of a log), a learned one without the UNet's prediction."""
        kind = self.variance_type or ("learned_range" if learned_variance else "fixed_small")
        if kind == "fixed_large_log":
            raise spec.InputError("sampler", "ddpm with this checkpoint's variance_type fixed_large_log is not served "
                                             "(diffusers' DDPMScheduler takes the square root of a log there)")
        if kind in ("learned", "learned_range") and not learned_variance:
            raise spec.InputError("sampler", f"ddpm: this checkpoint's variance_type {kind!r} needs a UNet that "
                                             "predicts its variance, and this one does not")
        return kind


class DynamicThresholdingConfig(_Strict):
    """Imagen's dynamic thresholding of the predicted x0 (Saharia et al. 2022,
    §2.3) as a diffusers scheduler config turns it on (`thresholding`):
    s = clamp(quantile(|x0|, ratio), 1, max_value) per sample, x0 <- clamp(x0, -s, s) / s."""

    ratio: float = Field(0.995, gt=0.0, le=1.0)
    max_value: float = Field(1.0, ge=1.0)


class DiffusersUNetConfig(_Strict):
    """An expert that is a diffusers `UNet2DConditionModel` trained in discrete
    time, wrapped into the EDM denoiser contract (ediffi/discrete.py)."""

    kind: Literal["diffusers_unet"]
    # Folder (relative to the model directory) with config.json + safetensors.
    path: str
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    schedule: TrainingScheduleConfig
    # Which conditioning block of the encoders this expert reads (its context
    # columns and its pooled columns), by name.
    conditioning: str
    # The UNet also predicts its variance (IF: out_channels = 2 x channels);
    # the sampler keeps the first half, as diffusers' IF pipelines do.
    learned_variance: bool = False
    # Super-resolution (IF stage II): channels of the upsampled low-res image
    # concatenated to the input, and the image-noising schedule whose timestep
    # (the noise level) is the UNet's class label.
    low_res_channels: int = Field(0, ge=0)
    noise_level_schedule: TrainingScheduleConfig | None = None
    # Inpainting UNets (stable-diffusion-inpainting: 9 = 4 + 1 + 4 input channels): channels of the
    # mask (1) and the masked image's latents concatenated to the latents, as diffusers' inpaint pipelines.
    mask_channels: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _super_resolution_has_noise_levels(self) -> DiffusersUNetConfig:
        if (self.low_res_channels > 0) != (self.noise_level_schedule is not None):
            raise ValueError("a super-resolution diffusers UNet needs low_res_channels and its noise_level_schedule together")
        return self


class ExpertConfig(_Strict):
    """One expert: its noise interval and its network.

    The interval is half-open, [sigma_lo, sigma_hi): a boundary sigma belongs
    to the expert whose `sigma_lo` equals it, i.e. to the higher-noise expert.
    `sigma_hi` may be null (infinity) for the highest-noise expert.
    """

    name: str
    sigma_lo: float = Field(ge=0.0)
    sigma_hi: float | None = None
    # The project's own experts: a safetensors file; diffusers experts name
    # their folder in `network.path` instead.
    weights: str | None = None
    network: UNetConfig | DiffusersUNetConfig

    @model_validator(mode="after")
    def _weights_given(self) -> ExpertConfig:
        if isinstance(self.network, UNetConfig) and not self.weights:
            raise ValueError(f"expert {self.name!r}: weights (a safetensors file) is required")
        return self

    @property
    def is_discrete(self) -> bool:
        return isinstance(self.network, DiffusersUNetConfig)

    @property
    def sigma_hi_value(self) -> float:
        return math.inf if self.sigma_hi is None else self.sigma_hi

    def owns(self, sigma: float) -> bool:
        return self.sigma_lo <= sigma < self.sigma_hi_value


class LatentConfig(_Strict):
    """A stage that samples in a VAE's latent space; the decoder turns its
    final latents into pixels (a final step the engine batches)."""

    vae_path: str
    # diffusers' 2 ** (len(vae.block_out_channels) - 1): pixels per latent.
    scale_factor: int = Field(8, gt=0)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    # Request sizes must be multiples of this many pixels (what the UNet's
    # down/up-sampling accepts) and within [min_size, max_size].
    size_multiple: int = Field(8, gt=0)


class StageConfig(_Strict):
    name: str
    # Pixels per side of the stage's output (for a latent stage: the default
    # size, the one diffusers' pipeline would choose for the checkpoint).
    image_size: int = Field(gt=0)
    channels: int = 3
    latent: LatentConfig | None = None
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = 7.0
    # Noise augmentation level applied to the low-res conditioning image at
    # inference (cascaded diffusion, Ho et al. 2021); SR stages only.
    low_res_aug_sigma: float = 0.0
    # Imported SR stages (IF stage II): the default noise level of the low-res
    # image in timesteps of the image-noising schedule (diffusers'
    # `noise_level`; low_res_aug_sigma is its sigma), and the upsampling of
    # the previous stage's image (IF: bilinear with align_corners=True).
    low_res_noise_level: int | None = Field(None, ge=0)
    low_res_align_corners: bool = False
    # Applied to the (guided) denoised image before each sampler step, where
    # diffusers' scheduler applies it to its predicted x0.
    dynamic_thresholding: DynamicThresholdingConfig | None = None
    experts: list[ExpertConfig]

    @model_validator(mode="after")
    def _experts_cover_range(self) -> StageConfig:
        validate_expert_coverage(self.name, self.experts)
        kinds = {e.is_discrete for e in self.experts}
        if len(kinds) > 1:
            raise ValueError(f"stage {self.name!r}: diffusers and eDiff-I experts cannot share a stage")
        if True in kinds and len({e.network.schedule.model_dump_json() for e in self.experts}) > 1:
            raise ValueError(f"stage {self.name!r}: the discrete-time experts of a stage must share one training schedule")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"stage {self.name!r}: sigma_min must be < sigma_max")
        return self

    @property
    def is_super_resolution(self) -> bool:
        return self.experts[0].network.low_res_channels > 0

    @property
    def mask_channels(self) -> int:
        """Channels of the mask and masked-image latents its UNets take (an inpainting checkpoint), else 0."""
        return getattr(self.experts[0].network, "mask_channels", 0)

    @property
    def is_discrete(self) -> bool:
        """Its experts are discrete-time (diffusers) checkpoints."""
        return self.experts[0].is_discrete

    @property
    def learned_variance(self) -> bool:
        """Its UNets predict their variance too (IF), which ddpm steps with."""
        return any(e.is_discrete and e.network.learned_variance for e in self.experts)

    @property
    def schedule(self) -> TrainingScheduleConfig | None:
        network = self.experts[0].network
        return network.schedule if isinstance(network, DiffusersUNetConfig) else None

    @property
    def noise_level_schedule(self) -> TrainingScheduleConfig | None:
        """The image-noising schedule of an imported SR stage (IF stage II)."""
        network = self.experts[0].network
        return network.noise_level_schedule if isinstance(network, DiffusersUNetConfig) else None


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


class ClipTextEncoderConfig(_Strict):
    """One transformers CLIP text tower of an imported checkpoint."""

    name: str
    path: str
    tokenizer_path: str
    max_length: int = Field(77, gt=1)
    # CLIPTextModel, or CLIPTextModelWithProjection (SDXL's second encoder).
    with_projection: bool = False


class T5TextEncoderConfig(_Strict):
    """The transformers T5 encoder of an imported DeepFloyd IF checkpoint. IF's
    pipelines encode max_length (77) tokens with the attention mask given to
    T5, after lower-casing and stripping the prompt (their text
    preprocessing without the optional caption cleaning)."""

    kind: Literal["t5"]
    name: str
    path: str
    tokenizer_path: str
    max_length: int = Field(77, gt=1)


class ConditioningConfig(_Strict):
    """The conditioning one expert reads, as its checkpoint expects it.

    The context of a model with several conditionings is their context
    blocks side by side (columns), the pooled vector their pooled blocks side
    by side; each expert reads its own block."""

    name: str
    # Encoders whose token embeddings are concatenated along the feature axis.
    encoders: list[str]
    # "last": the final hidden state after the final layer norm (SD 1.x/2.x);
    # "penultimate": hidden_states[-2] (SDXL).
    hidden_state: Literal["last", "penultimate"] = "last"
    # The encoder whose projected text_embeds is the pooled vector (SDXL).
    pooled_from: str | None = None
    # An empty negative prompt: zeros (SDXL's force_zeros_for_empty_prompt)
    # or the encoding of "".
    empty_negative: Literal["zeros", "encode"] = "encode"
    # SDXL's add_time_ids: "size" = original size, crop, target size;
    # "aesthetic" = original size, crop, aesthetic score (the refiner).
    micro_conditioning: Literal["none", "size", "aesthetic"] = "none"
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @property
    def time_ids_width(self) -> int:
        return {"none": 0, "size": 6, "aesthetic": 5}[self.micro_conditioning]


class DiffusersEncodersConfig(_Strict):
    kind: Literal["diffusers_clip"]
    text_encoders: list[ClipTextEncoderConfig | T5TextEncoderConfig]
    conditionings: list[ConditioningConfig]

    @model_validator(mode="after")
    def _names_resolve(self) -> DiffusersEncodersConfig:
        known = {e.name for e in self.text_encoders}
        for cond in self.conditionings:
            for name in [*cond.encoders, *([cond.pooled_from] if cond.pooled_from else [])]:
                if name not in known:
                    raise ValueError(f"conditioning {cond.name!r} names unknown text encoder {name!r}")
        return self

    def conditioning(self, name: str) -> ConditioningConfig:
        for cond in self.conditionings:
            if cond.name == name:
                return cond
        raise KeyError(f"no conditioning named {name!r}; there are {[c.name for c in self.conditionings]}")


class GenerationDefaults(_Strict):
    """What a request that leaves ``steps``, ``guidance_scale``, ``sampler`` or
    ``use_karras_sigmas`` out gets (:meth:`fill`: the one rule the API and the CLI apply)."""

    steps: int = Field(spec.DEFAULT_STEPS, ge=1)
    guidance_scale: float = Field(spec.DEFAULT_GUIDANCE, ge=0.0, le=spec.MAX_GUIDANCE, allow_inf_nan=False)
    sampler: spec.SamplerName = spec.DEFAULT_SAMPLER
    # Imported models: False samples on the scheduler's own sigmas (the importer's default
    # where the folder loads a plain EulerDiscreteScheduler or DPM-Solver++ 2M).
    use_karras_sigmas: bool = True
    # The strength of an inpainting request that sends none (its diffusers inpaint pipeline's default).
    inpaint_strength: float = Field(spec.DEFAULT_INPAINT_STRENGTH, gt=0.0, le=1.0)

    def strength_for(self, masked: bool) -> float:
        """The strength of a request with an init image that sends none: img2img's (diffusers' 0.8),
        or with a mask this model's inpainting default."""
        return self.inpaint_strength if masked else spec.DEFAULT_INIT_STRENGTH

    def steps_within(self, max_steps: int | None) -> int:
        """The default steps within a server's limit (None: none)."""
        return self.steps if max_steps is None else min(self.steps, max_steps)

    def _karras_for(self, sampler: str | None) -> bool:
        if sampler is None:
            return self.use_karras_sigmas
        # ddim, pndm and ddpm have no Karras variant; a sigma sampler named means Karras's, as it always did
        return sampler not in spec.SCHEDULER_ONLY_SAMPLERS

    def fill(
        self, *, steps: int | None, guidance_scale: float | None, sampler: str | None,
        use_karras_sigmas: bool | None, max_steps: int | None = None,
    ) -> dict:
        """The four sampling fields of a request, those it left out (None) from these defaults.
        ``use_karras_sigmas`` left out is the model's only when ``sampler`` is left out too (the
        model's one default configuration, e.g. SDXL's Euler as loaded); with a sampler named it
        is Karras's, as ``sampler`` always meant (ddim, pndm, ddpm: their own timesteps, never Karras's)."""
        return {
            "steps": self.steps_within(max_steps) if steps is None else steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "sampler": self.sampler if sampler is None else sampler,
            "use_karras_sigmas": use_karras_sigmas if use_karras_sigmas is not None else self._karras_for(sampler),
        }


#: An imported model's defaults: its diffusers pipeline's own (``__call__``'s
#: ``num_inference_steps`` and ``guidance_scale``), with the sampler whose
#: images equal that pipeline's on the Karras schedule (README). DeepFloyd IF
#: runs one ``steps`` for both stages: 50, stage II's default (stage I's 100 is
#: for its DDPM scheduler; DPM++ 2M needs fewer), and stage I's guidance.
PIPELINE_DEFAULTS: dict[str, GenerationDefaults] = {
    "StableDiffusionPipeline": GenerationDefaults(steps=50, guidance_scale=7.5, sampler="euler"),
    "StableDiffusionInpaintPipeline": GenerationDefaults(steps=50, guidance_scale=7.5, sampler="euler"),
    # StableDiffusionXLInpaintPipeline's strength 0.9999: the first of its steps is skipped, the rest
    # start from the image noised, not from pure noise
    "StableDiffusionXLPipeline": GenerationDefaults(steps=50, guidance_scale=5.0, sampler="euler", inpaint_strength=0.9999),
    "StableDiffusionXLInpaintPipeline": GenerationDefaults(
        steps=50, guidance_scale=7.5, sampler="euler", inpaint_strength=0.9999
    ),
    "IFPipeline": GenerationDefaults(steps=50, guidance_scale=7.0, sampler="dpmpp_2m"),
}


class ModelConfig(_Strict):
    format_version: int = 1
    name: str = "ediffi"
    sigma_data: float = 0.5
    encoders: EncodersConfig | DiffusersEncodersConfig
    stages: list[StageConfig]
    # Free-form provenance (training command, steps, wall time).
    training: dict = Field(default_factory=dict)
    # Absent: an imported model's pipeline defaults (PIPELINE_DEFAULTS, for
    # directories imported before the importer wrote them), else the shipped family's.
    defaults: GenerationDefaults | None = None

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
        discrete = [e for s in self.stages for e in s.experts if e.is_discrete]
        if discrete and not isinstance(self.encoders, DiffusersEncodersConfig):
            raise ValueError("diffusers experts need diffusers_clip encoders")
        for expert in discrete:
            self.encoders.conditioning(expert.network.conditioning)  # names an existing block
        if self.defaults is not None:
            imported = all(s.schedule is not None for s in self.stages)
            own_sigmas = spec.SCHEDULER_SIGMA_SAMPLERS + spec.SCHEDULER_ONLY_SAMPLERS
            if not self.defaults.use_karras_sigmas and (not imported or self.defaults.sampler not in own_sigmas):
                raise ValueError(
                    f"defaults.use_karras_sigmas false is for imported diffusers checkpoints with sampler {', '.join(own_sigmas)}"
                )
            if self.defaults.sampler in spec.SCHEDULER_ONLY_SAMPLERS and (not imported or self.defaults.use_karras_sigmas):
                raise ValueError(f"defaults.sampler {self.defaults.sampler} is for imported checkpoints, with use_karras_sigmas false")
        return self

    @property
    def request_defaults(self) -> GenerationDefaults:
        """The steps, guidance scale and sampler of a request that leaves them out."""
        if self.defaults is not None:
            return self.defaults
        return PIPELINE_DEFAULTS.get(str(self.training.get("pipeline")), GenerationDefaults())

    @property
    def is_imported(self) -> bool:
        """Imported from a diffusers pipeline (discrete-time experts)."""
        return isinstance(self.encoders, DiffusersEncodersConfig)

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
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        path = Path(model_dir) / MODEL_JSON
        if not path.is_file():
            hint = ""
            if (Path(model_dir) / "model_index.json").is_file():
                hint = f"; it is a diffusers pipeline folder: import it first with `ediffi import diffusers {model_dir} --out DIR`"
            raise FileNotFoundError(f"model directory {Path(model_dir)} has no {MODEL_JSON} (looked for {path}){hint}")
        return cls.model_validate_json(path.read_text())

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / MODEL_JSON).write_text(self.model_dump_json(indent=2) + "\n")
