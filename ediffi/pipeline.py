"""One request end to end: encode -> sample every cascade stage -> images.

The request's work is a state machine (`RequestRun`) that asks for one
denoiser evaluation at a time: `pending()` returns the stage, the expert and
the rows (conditional and unconditional rows of classifier-free guidance
together); `advance()` takes the denoised rows. The reference pipeline
(`generate`) runs one such machine alone; the serving engine interleaves
many, batching their evaluations per expert. Both share this code, so the
engine's image equals the reference pipeline's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ediffi.capabilities import model_capabilities
from ediffi.config import ModelConfig, StageConfig
from ediffi.discrete import (
    dynamic_threshold, inference_sigmas, inference_timesteps, initial_noise_scale, log_sigma_table, noise_level_sigma,
    request_schedule, scheduled_steps, timestep_at,
)
from ediffi.encoders import ENCODER_NAMES
from ediffi.failure import InputError
from ediffi.model import DECODER, EDiffIModel
from ediffi.paint import build_pww_inputs
from ediffi.samplers import Evaluation, Sampler, ScheduledSteps, classifier_free_guidance, karras_sigmas, make_sampler
from ediffi.spec import (
    DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SEED, DEFAULT_STEPS, SAMPLERS, SCHEDULER_ONLY_SAMPLERS, Region,
    check_mask_size, check_mask_to_crop, check_seed, check_style_image_shape, guidance_enabled, init_image_steps,
)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = DEFAULT_SEED
    sampler: str = DEFAULT_SAMPLER
    n: int = 1
    style_image: Image.Image | None = None
    color_map: Image.Image | None = None
    regions: list[Region] = field(default_factory=list)
    # Which conditioning embeddings are used (any subset works, as trained
    # with embedding dropout).
    encoders: frozenset[str] = frozenset(ENCODER_NAMES)
    # Output size in pixels; None: the model's native (default) size.
    width: int | None = None
    height: int | None = None
    # Imported SR stages (IF stage II): the noise level of the upsampled
    # low-res image, in timesteps of the image-noising schedule (diffusers'
    # `noise_level`); None: the pipeline's default.
    sr_noise_level: int | None = None
    # Imported checkpoints with euler or dpmpp_2m: False samples on the scheduler's own
    # sigmas (diffusers' schedulers' default) instead of Karras's.
    use_karras_sigmas: bool = True
    # img2img (imported latent models): the image to start from, encoded by the VAE and noised to the
    # level where int(steps x strength) steps remain (diffusers' img2img pipelines' `image`, `strength`).
    init_image: Image.Image | None = None
    # None: the model's default, its diffusers pipeline's (init_strength: 0.8; with a mask 1, SDXL's 0.9999).
    strength: float | None = None
    # Inpainting (with an init image of the same size): white (>= 50% grey) repaints, black keeps the
    # init image, as diffusers' inpaint pipelines' `mask_image` (and A1111's mask).
    mask: Image.Image | None = None
    # Inpainting around the mask only (diffusers' `padding_mask_crop`, A1111's "only masked"): the region
    # holding the mask's pixels, padded by this many and grown to width:height, is cropped, resized to
    # width x height and inpainted, then pasted back into the init image (whose size the images take).
    padding_mask_crop: int | None = None

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise InputError("sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise InputError("steps", "must be >= 1")
        if self.n < 1:
            raise InputError("n", "must be >= 1")
        check_seed(self.seed, self.n)
        if bool(self.regions) != (self.color_map is not None):
            raise InputError("paint_with_words", "a colour map and at least one region go together")
        unknown = set(self.encoders) - set(ENCODER_NAMES)
        if unknown:
            raise InputError("encoders", f"unknown {sorted(unknown)}; choose from {ENCODER_NAMES}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(name, "must be >= 1")
        if self.sr_noise_level is not None and self.sr_noise_level < 0:
            raise InputError("sr_noise_level", "must be >= 0")
        if self.style_image is not None:
            check_style_image_shape(*self.style_image.size)
        if self.mask is not None:
            if self.init_image is None:
                raise InputError("mask", "goes with an init_image: the mask says which of its pixels to repaint")
            check_mask_size(self.mask.size, self.init_image.size)
        if self.padding_mask_crop is not None:
            if self.mask is None:
                raise InputError("padding_mask_crop", "goes with a mask (it crops the region around it)")
            if self.padding_mask_crop < 0:
                raise InputError("padding_mask_crop", "must be >= 0")
            check_mask_to_crop(self.mask)
        if self.init_image is not None and self.strength is not None:  # the model's default: validate_for_model
            init_image_steps(self.steps, self.strength)

    @property
    def image_seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]


def init_strength(config: ModelConfig, request: GenerationRequest) -> float:
    """The strength a request's init image runs with: its own, else the model's default for it
    (GenerationDefaults.strength_for: its diffusers pipelines')."""
    return config.request_defaults.strength_for(request.mask is not None) if request.strength is None else request.strength


def output_size(config: ModelConfig, request: GenerationRequest) -> tuple[int, int]:
    """(height, width) of the request's images. The project's own models make
    their native square size only; an imported latent model any size that is
    a multiple of what its UNet accepts (the default: diffusers' default).
    The server also bounds the side (settings); the model has no limit."""
    rule = model_capabilities(config).sizes
    for name, message in rule.errors(request.width, request.height, max_side=None).items():
        raise InputError(name, message)
    # img2img: the init image's size where none was sent (rounded to the multiple), as diffusers
    image_size = request.init_image.size if request.init_image is not None else None
    width, height = rule.from_init_image(request.width, request.height, image_size)
    if width == 0 or height == 0:
        raise InputError("init_image", f"is smaller than {rule.multiple_of} pixels on a side: send width and height")
    return height or rule.default_height, width or rule.default_width


def stage_shape(stage: StageConfig, height: int, width: int) -> tuple[int, int, int]:
    """[C, H, W] the stage samples in (latents are 1/scale_factor the pixels)."""
    if stage.latent is None:
        return stage.channels, stage.image_size, stage.image_size
    f = stage.latent.scale_factor
    return stage.channels, height // f, width // f


def low_res_sigma(stage: StageConfig, request: GenerationRequest) -> float:
    """The noise augmentation of an SR stage's low-res image: the request's
    `sr_noise_level` on the stage's image-noising schedule, else the stage's
    default."""
    if request.sr_noise_level is None or stage.noise_level_schedule is None:
        return stage.low_res_aug_sigma
    return noise_level_sigma(stage.noise_level_schedule, request.sr_noise_level)


def validate_for_model(config: ModelConfig, request: GenerationRequest) -> None:
    """The rules `GET /v1/models` publishes and the API checks (ModelCapabilities.request_errors):
    `sr_noise_level` within the model's range, a sampler the model serves (with its fewest steps),
    `use_karras_sigmas` false only where it applies."""
    errors = model_capabilities(config).request_errors(
        sampler=request.sampler, steps=request.steps, use_karras_sigmas=request.use_karras_sigmas,
        sr_noise_level=request.sr_noise_level, init_image=request.init_image is not None,
        strength=request.strength if request.init_image is not None else None, mask=request.mask is not None,
    )
    for name, message in errors.items():
        raise InputError(name, message)


def stage_sigmas(
    stage: StageConfig, steps: int, sampler: str = DEFAULT_SAMPLER, use_karras_sigmas: bool = True
) -> torch.Tensor:
    """The sampler's sigma schedule: EDM's Karras schedule over the stage's
    range, or for a discrete-time checkpoint the one diffusers' scheduler
    with Karras sigmas uses (within its trained range): Euler's, or
    DPM-Solver's for `dpmpp_2m` (ediffi.discrete.request_schedule); without
    Karras sigmas, that scheduler's own spaced ones; for ddim, pndm and ddpm, those of their timesteps."""
    if sampler in SCHEDULER_ONLY_SAMPLERS:  # ddim, pndm, ddpm: the sigmas of their timesteps
        return stage_scheduled_steps(stage, steps, sampler).sigmas
    if stage.schedule is not None:
        return inference_sigmas(request_schedule(stage.schedule, sampler, use_karras_sigmas), steps)
    return karras_sigmas(steps, stage.sigma_min, stage.sigma_max, stage.rho)


def stage_scheduled_steps(stage: StageConfig, steps: int, sampler: str) -> ScheduledSteps | None:
    """For ddim, pndm and ddpm (imported stages only: validate_for_model), the timesteps of the diffusers
    scheduler they reproduce on the stage's training schedule; None for the sigma samplers."""
    if sampler not in SCHEDULER_ONLY_SAMPLERS:
        return None
    if stage.schedule is None:
        raise InputError("sampler", f"{sampler!r} is for imported diffusers checkpoints; stage {stage.name!r} is not one")
    v_prediction = any(e.is_discrete and e.network.prediction_type == "v_prediction" for e in stage.experts)
    return scheduled_steps(stage.schedule, sampler, steps, v_prediction, stage.dynamic_thresholding, stage.learned_variance)


@dataclass
class DenoiserInputs:
    """Rows of one denoiser call (docs/architecture.md §3). SR stages fill low_res* (the upsampled image
    and its noise level); an inpainting checkpoint's stage fills low_res with its mask and masked-image
    latents (no noise level)."""

    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    context_mask: torch.Tensor
    pooled: torch.Tensor
    pww_mask: torch.Tensor
    pww_strength: torch.Tensor
    low_res: torch.Tensor | None = None
    low_res_sigma: torch.Tensor | None = None
    # Discrete-time stages (imported UNets): each row's UNet timestep as its
    # request's sampler computes it (DPM++ 2M rounds it, as diffusers'
    # DPMSolverMultistepScheduler; Euler keeps it fractional:
    # ediffi.discrete.request_schedule), so rows of requests with different
    # samplers share a call, and a captured CUDA graph takes it as an input
    # (t(sigma) needs the host). None: EDM stages, or the expert's own t(sigma).
    timestep: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {k: getattr(self, k) for k in ("x", "sigma", "context", "context_mask", "pooled", "pww_mask", "pww_strength")}
        if self.low_res is not None:
            kwargs["low_res"], kwargs["low_res_sigma"] = self.low_res, self.low_res_sigma
        if self.timestep is not None:
            kwargs["timestep"] = self.timestep
        return kwargs

    @staticmethod
    def cat(parts: list[DenoiserInputs]) -> DenoiserInputs:
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return DenoiserInputs(**{name: join(name) for name in DenoiserInputs.__dataclass_fields__})


@dataclass
class Conditioning:
    """Per-request conditioning rows: `cond` for the prompt (n rows), and
    `uncond` for the negative/empty prompt when guidance needs it."""

    context: torch.Tensor  # [R, L, D] R = n (cond) [+ n (uncond)]
    context_mask: torch.Tensor
    pooled: torch.Tensor
    pww_masks: dict[str, torch.Tensor]  # per stage: [R, L, H, W]
    pww_strength: torch.Tensor  # [R]
    guidance_scale: torch.Tensor  # [n]
    guided: bool
    height: int = 0
    width: int = 0


def encode_request(model: EDiffIModel, request: GenerationRequest, text_cache: Callable | None = None) -> Conditioning:
    """Text, style and paint-with-words conditioning for one request.

    Unconditional rows (classifier-free guidance) use the negative prompt if
    one is given, else all-null embeddings; they never get a style embedding
    or paint-with-words (A = 0 for unconditional rows, docs/architecture.md §1).
    """
    request.validate()
    enc = model.encoders
    if request.style_image is not None and not enc.has_image_encoder:
        raise InputError("style_image", "this model has no image encoder, so it takes no style image")
    height, width = output_size(model.config, request)
    validate_for_model(model.config, request)
    encode_text = text_cache or enc.encode_text
    use_t5, use_clip = "t5" in request.encoders, "clip_text" in request.encoders
    text = encode_text([request.prompt], use_t5, use_clip)
    pooled_image = torch.zeros(1, enc.pooled_image_dim, device=enc.device)
    if request.style_image is not None and "clip_image" in request.encoders:
        pooled_image = enc.encode_image([request.style_image])
    cond_pooled = torch.cat([text.pooled_text, pooled_image], dim=1)
    # Size conditioning (SDXL's add_time_ids) goes into the pooled vector.
    cond_pooled = enc.add_micro_conditioning(cond_pooled, height, width, negative=False)

    n = request.n
    # Guidance <= 1 is off (spec.guidance_enabled, as diffusers): the conditional rows alone.
    guided = guidance_enabled(request.guidance_scale)
    contexts, masks, pooled = [text.context], [text.context_mask], [cond_pooled]
    if guided:
        if request.negative_prompt:
            neg = encode_text([request.negative_prompt], use_t5, use_clip)
        else:
            neg = enc.empty_negative(encode_text)
        contexts.append(neg.context)
        masks.append(neg.context_mask)
        neg_pooled = torch.cat([neg.pooled_text, torch.zeros_like(pooled_image)], dim=1)
        pooled.append(enc.add_micro_conditioning(neg_pooled, height, width, negative=True))
    rows = lambda parts: torch.cat([p.expand(n, *p.shape[1:]) for p in parts])  # noqa: E731

    pww_masks: dict[str, torch.Tensor] = {}
    strength = 0.0
    length = enc.context_length
    for stage in model.config.stages:
        _, mask_h, mask_w = stage_shape(stage, height, width)
        if request.regions:
            mask, strength = build_pww_inputs(
                request.prompt, request.regions, request.color_map,
                text.t5_offsets[0], text.clip_offsets[0], mask_h, mask_w,
            )
            if not use_t5:
                mask[: enc.t5_length] = 0
            if not use_clip:
                mask[enc.t5_length :] = 0
            mask = mask.to(enc.device)[None]
        else:
            mask = torch.zeros(1, length, mask_h, mask_w, device=enc.device)
        parts = [mask] + ([torch.zeros_like(mask)] if guided else [])
        pww_masks[stage.name] = rows(parts)
    strengths = [torch.full((n,), strength)] + ([torch.zeros(n)] if guided else [])
    return Conditioning(
        context=rows(contexts), context_mask=rows(masks), pooled=rows(pooled), pww_masks=pww_masks,
        pww_strength=torch.cat(strengths).to(enc.device),
        guidance_scale=torch.full((n,), float(request.guidance_scale), device=enc.device), guided=guided,
        height=height, width=width,
    )


@dataclass(frozen=True)
class PendingEvaluation:
    stage: str
    expert: str
    inputs: DenoiserInputs


class RequestRun:
    """The sampling state machine of one request across all cascade stages.

    Randomness is per image: image k uses its own `torch.Generator` seeded
    with seed + k, drawn on the CPU, so an image never depends on the other
    rows of its batch or on the device.
    """

    def __init__(self, model: EDiffIModel, request: GenerationRequest, conditioning: Conditioning):
        self.model = model
        self.request = request
        self.cond = conditioning
        self.generators = [torch.Generator().manual_seed(s) for s in request.image_seeds]
        self.strength = init_strength(model.config, request)
        self._pixels = InpaintingPixels.of(model.config, request, conditioning.width, conditioning.height)
        self.stage_index = 0
        self.evaluations_done = 0
        # Each stage's sigmas (and ddim's / pndm's timesteps), computed once: counted here, run later.
        self._schedules = [self._stage_schedule(stage) for stage in model.config.stages]
        self.evaluations_total = sum(
            self._new_sampler(k, torch.zeros(1)).total_evaluations + (stage.latent is not None)  # the decoder step
            for k, stage in enumerate(model.config.stages)
        )
        self._decoding = False
        self._low_res: torch.Tensor | None = None
        self._low_res_sigma: torch.Tensor | None = None
        self._images: torch.Tensor | None = None
        # Inpainting: (latent mask, the init image's latents, the initial noise) of the first stage
        self._known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.sampler: Sampler = self._start_stage()

    def _stage_schedule(self, stage: StageConfig) -> tuple[torch.Tensor, ScheduledSteps | None]:
        """The stage's sigmas (and ddim's timesteps); from an init image (the first stage), the last
        int(steps x strength) of them only, as diffusers' img2img `get_timesteps`."""
        request = self.request
        scheduled = stage_scheduled_steps(stage, request.steps, request.sampler)
        if scheduled is not None:
            sigmas = scheduled.sigmas
        else:
            sigmas = stage_sigmas(stage, request.steps, request.sampler, request.use_karras_sigmas)
        if request.init_image is not None and stage is self.model.config.stages[0]:
            start = request.steps - init_image_steps(request.steps, self.strength)
            sigmas = sigmas[start:]
            if scheduled is not None:
                scheduled = dataclasses.replace(scheduled, timesteps=scheduled.timesteps[start:])
        return sigmas, scheduled

    def _new_sampler(self, stage_index: int, x: torch.Tensor, restart_below=()) -> Sampler:
        sigmas, scheduled = self._schedules[stage_index]
        return make_sampler(self.request.sampler, x, sigmas, restart_below, noise=self._noise, steps=scheduled)

    def _timesteps(self, evaluation: Evaluation, rows: int, device: torch.device) -> torch.Tensor | None:
        """The UNet timestep of an evaluation for `rows` rows (float32 holds it
        exactly) in the conventions of the request's sampler
        (DenoiserInputs.timestep; None for EDM stages); computed on the CPU here."""
        if self._schedule is None:
            return None
        t = evaluation.timestep
        if t is None:
            t = self._scheduler_timesteps.get(evaluation.sigma)
        if t is None:
            t = timestep_at(self._schedule, evaluation.sigma, self._log_sigmas)
        return torch.full((rows,), t, device=device, dtype=torch.float32)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators])

    @property
    def stage(self):
        return self.model.config.stages[self.stage_index]

    def _start_stage(self) -> Sampler:
        stage = self.stage
        device, dtype = self.model.device, self.model.dtype
        sigmas, scheduled = self._schedules[self.stage_index]
        # Imported checkpoints: the conventions of the diffusers scheduler the
        # request's sampler reproduces (discrete.request_schedule; one training
        # schedule per stage): its sigmas, init_noise_sigma and UNet timesteps.
        # The rows always carry their timesteps: they depend on the sampler
        # (SD/SDXL), and a captured CUDA graph cannot compute them on the host.
        self._schedule = None if stage.schedule is None else request_schedule(
            stage.schedule, self.request.sampler, self.request.use_karras_sigmas
        )
        self._log_sigmas = None if self._schedule is None else log_sigma_table(self._schedule)  # once per stage
        # On the scheduler's own sigmas, each call gets exactly the spaced timestep diffusers
        # feeds its UNet (sigma -> t by log interpolation would be close, not equal, between steps).
        self._scheduler_timesteps: dict[float, float] = {}
        if self._schedule is not None and not self._schedule.use_karras_sigmas and scheduled is None:
            spaced = inference_timesteps(self._schedule, self.request.steps)[-(len(sigmas) - 1):]
            self._scheduler_timesteps = dict(zip(sigmas[:-1].tolist(), spaced.tolist()))
        shape = stage_shape(stage, self.cond.height, self.cond.width)
        # The noise diffusers draws for the same seed (CPU generator, [1, C, H/f, W/f]) times its
        # init_noise_sigma; DDIM and PNDM step the variance-preserving sample itself (1).
        if scheduled is not None:
            scale = 1.0
        elif self._schedule is None:
            scale = sigmas[0]
        else:
            scale = initial_noise_scale(self._schedule, float(sigmas[0]))
        request = self.request
        if request.init_image is not None and self.stage_index == 0 and stage.mask_channels:
            x = self._start_inpainting_unet(stage, shape, scale)
        elif request.init_image is not None and self.stage_index == 0:
            # img2img: the VAE's sample of the init image (each image's generator first draws its
            # latent), then that generator's noise added at the first sigma run: scheduler.add_noise.
            init = self._init_latents(stage)
            noise = self._noise(shape).to(init)
            if request.mask is not None:
                self._known = (self._latent_mask(shape).to(init), init, noise)
                # The inpaint pipeline then encodes the masked image with the same generators (its
                # latents feed 9-channel UNets only): the same draws keep euler_a's later noise diffusers'.
                self._noise(shape)
            if request.mask is not None and self.strength == 1.0:
                x = noise * scale  # the inpaint pipeline's strength 1: pure noise, the image kept outside the mask
            else:
                x = self._noised_init(init, noise)
        else:
            x = self._noise(shape) * scale
        if stage.is_super_resolution:
            # Cascaded diffusion: condition on the upsampled previous image,
            # noise-augmented at a level the network is told about.
            # Drawn after the stage's initial noise, as diffusers' IF stage II.
            up = F.interpolate(
                self._images, size=(stage.image_size,) * 2, mode="bilinear", align_corners=stage.low_res_align_corners
            )
            aug = low_res_sigma(stage, self.request)
            noise = self._noise(tuple(up.shape[1:])).to(up)
            self._low_res = (up + aug * noise).to(device, dtype)
            # Noise levels stay float32 at any model dtype (ediffi/unet.py FourierEmbedding).
            self._low_res_sigma = torch.full((up.shape[0],), aug, device=device, dtype=torch.float32)
        # Imported experts are separate diffusers pipelines (SDXL base, refiner), each starting its own
        # scheduler: a multistep solver's history restarts where the next expert takes over.
        restarts = [expert.sigma_lo for expert in stage.experts if expert.sigma_lo > 0] if self._schedule else []
        return self._new_sampler(self.stage_index, x.to(device, dtype), restart_below=restarts)

    def _noised_init(self, init: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The init image's latents at the first step run: the scheduler's add_noise (ddim, pndm, ddpm: the
        variance-preserving sample at its first timestep; else x0 + sigma noise)."""
        sigmas, scheduled = self._schedules[self.stage_index]
        if scheduled is not None:
            a = scheduled.alpha(scheduled.timesteps[0])
            return a**0.5 * init + (1 - a) ** 0.5 * noise
        return init + float(sigmas[0]) * noise

    def _start_inpainting_unet(self, stage: StageConfig, shape: tuple[int, int, int], scale: float) -> torch.Tensor:
        """An inpainting checkpoint, as StableDiffusionInpaintPipeline with its 9-channel UNet: at strength
        1 pure noise (the image is not encoded for it), below it the image's latent sample noised to the
        first step run; then the masked image (its pixels under the mask zeroed) encoded with the same
        generators. The mask and those latents go to every call (``low_res``); no latents are replaced."""
        request = self.request
        if self.strength == 1.0:
            x = self._noise(shape) * scale
        else:
            init = self._init_latents(stage)
            x = self._noised_init(init, self._noise(shape).to(init))
        pixel_mask = self._pixels.mask()
        masked = self._pixels.image() * (pixel_mask < 0.5)
        decoder = self.model.stages[stage.name].experts[DECODER]
        masked_latents = decoder.encode(masked, self.generators)
        latent_mask = F.interpolate(pixel_mask, size=shape[1:]).to(masked_latents).expand(len(self.generators), -1, -1, -1)
        self._low_res = torch.cat([latent_mask, masked_latents], dim=1).to(self.model.device, self.model.dtype)
        return x

    def _init_latents(self, stage: StageConfig) -> torch.Tensor:
        """[n, C, h, w]: the init image at the output size, encoded by the stage's VAE, one latent
        sample per image from its own generator (diffusers' img2img with a list of generators)."""
        decoder = self.model.stages[stage.name].experts[DECODER]
        return decoder.encode(self._pixels.image(), self.generators)

    def _latent_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """[1, 1, h, w] of 0 (keep) and 1 (repaint): the mask as diffusers' mask processor makes it
        (resized like the init image, grey, binarised at 0.5), then nearest-resized to the latents."""
        return F.interpolate(self._pixels.mask(), size=shape[1:])

    @property
    def done(self) -> bool:
        return self.stage_index >= len(self.model.config.stages)

    def pending(self) -> PendingEvaluation | None:
        if self.done:
            return None
        stage = self.stage
        if self._decoding:
            return self._decoder_evaluation()
        evaluation = self.sampler.pending()
        ensemble = self.model.stages[stage.name]
        cond = self.cond
        reps = 2 if cond.guided else 1
        x = evaluation.x.repeat(reps, 1, 1, 1)
        rows = x.shape[0]
        dtype = x.dtype
        inputs = DenoiserInputs(
            x=x,
            sigma=torch.full((rows,), evaluation.sigma, device=x.device, dtype=torch.float32),
            context=cond.context.to(dtype),
            context_mask=cond.context_mask,
            pooled=cond.pooled.to(dtype),
            pww_mask=cond.pww_masks[stage.name].to(dtype),
            pww_strength=cond.pww_strength.to(dtype),
            low_res=None if self._low_res is None else self._low_res.repeat(reps, 1, 1, 1),
            low_res_sigma=None if self._low_res_sigma is None else self._low_res_sigma.repeat(reps),
            timestep=self._timesteps(evaluation, rows, x.device),
        )
        return PendingEvaluation(stage.name, ensemble.route(evaluation.sigma), inputs)

    def _decoder_evaluation(self) -> PendingEvaluation:
        """The latent stage's final step: decode the n final latents. The
        conditioning inputs are empty (zero-width) tensors of the right rows."""
        x = self.sampler.x
        n = x.shape[0]
        empty = x.new_zeros(n, 0)
        inputs = DenoiserInputs(
            x=x, sigma=x.new_zeros(n), context=x.new_zeros(n, 0, 0), context_mask=empty.bool(), pooled=empty,
            pww_mask=x.new_zeros(n, 0, *x.shape[2:]), pww_strength=x.new_zeros(n),
        )
        return PendingEvaluation(self.stage.name, DECODER, inputs)

    def _finish_stage(self, images: torch.Tensor) -> None:
        self._images = images.float().cpu()
        self._decoding = False
        self.stage_index += 1
        if not self.done:
            self.sampler = self._start_stage()

    def advance(self, denoised: torch.Tensor) -> None:
        if self._decoding:
            self.evaluations_done += 1
            self._finish_stage(denoised)
            return
        n = self.request.n
        variance = None
        if self.stage.learned_variance:
            # A UNet that learns its variance (IF) returns [D | predicted variance]; the variance of the
            # conditional rows, as IF's pipelines keep the text branch's.
            channels = self.sampler.x.shape[1]
            denoised, variance = denoised[:, :channels], denoised[:n, channels:]
        if self.cond.guided:
            denoised = classifier_free_guidance(denoised[:n], denoised[n:], self.cond.guidance_scale.to(denoised))
        thresholding = self.stage.dynamic_thresholding
        # (ddim thresholds its own x0 and keeps its eps, as DDIMScheduler; PNDMScheduler never does)
        if thresholding is not None and self.request.sampler not in SCHEDULER_ONLY_SAMPLERS:
            # After guidance, on the x0 the sampler steps with: where
            # diffusers' scheduler thresholds its (guided) predicted x0.
            denoised = dynamic_threshold(denoised, thresholding.ratio, thresholding.max_value)
        self.sampler.advance(denoised, variance)
        if self._known is not None and self.stage_index == 0:
            self.sampler.keep_unmasked(*self._known)
        self.evaluations_done += 1
        if self.sampler.done:
            if self.stage.latent is not None:
                self._decoding = True
            else:
                self._finish_stage(self.sampler.x)

    def images(self) -> list[Image.Image]:
        if not self.done:
            raise RuntimeError("the request has not finished sampling")
        return [self._pixels.overlay(image) for image in tensor_to_images(self._images)]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float [B,3,H,W] -> 8-bit RGB images."""
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def image_to_model_input(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An init image as diffusers' VaeImageProcessor.preprocess makes it: RGB, resized (Lanczos)
    to width x height where it differs, x / 255 then 2x - 1, float32 [1, 3, H, W]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0).contiguous()


@dataclass
class InpaintingPixels:
    """The init image and mask of a request as the model takes them, at width x height; with
    ``padding_mask_crop`` the region around the mask, as diffusers' inpaint pipelines make it with
    their own image processors (VaeImageProcessor: get_crop_region, resize_mode "fill",
    apply_overlay), whose arithmetic this reuses rather than restates."""

    request: GenerationRequest
    width: int
    height: int
    crop: tuple[int, int, int, int] | None = None
    scale_factor: int = 8

    @classmethod
    def of(cls, config: ModelConfig, request: GenerationRequest, width: int, height: int) -> InpaintingPixels:
        latent = config.stages[0].latent
        pixels = cls(request, width, height, scale_factor=latent.scale_factor if latent is not None else 1)
        if request.padding_mask_crop is not None and request.mask is not None:
            from diffusers.image_processor import VaeImageProcessor

            pixels.crop = VaeImageProcessor.get_crop_region(request.mask, width, height, pad=request.padding_mask_crop)
        return pixels

    def _processor(self, **options):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.scale_factor, **options)

    def image(self) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] (image_to_model_input; cropped and filled to the size with a crop)."""
        if self.crop is None:
            return image_to_model_input(self.request.init_image, self.width, self.height)
        return self._processor().preprocess(
            self.request.init_image.convert("RGB"), height=self.height, width=self.width, crops_coords=self.crop,
            resize_mode="fill",
        ).float()

    def mask(self) -> torch.Tensor:
        """[1, 1, H, W] of 0 (keep) and 1 (repaint), as diffusers' inpaint pipelines' mask processor makes
        it: resized (Lanczos) to width x height in its own mode, grey, binarised at 0.5 (with a crop, of
        the region only, filled to the size)."""
        processor = self._processor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        return processor.preprocess(
            self.request.mask, height=self.height, width=self.width, crops_coords=self.crop,
            resize_mode="default" if self.crop is None else "fill",
        ).float()

    def overlay(self, image: Image.Image) -> Image.Image:
        """An output image; with a crop, pasted back into the init image through the mask (its size)."""
        if self.crop is None:
            return image
        return self._processor().apply_overlay(self.request.mask, self.request.init_image, image, self.crop)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> [-1, 1] float [3,H,W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def evaluate(model: EDiffIModel, pending: PendingEvaluation) -> torch.Tensor:
    """One call of the expert (or decoder) a pending evaluation names."""
    expert = model.stages[pending.stage].experts[pending.expert]
    return expert(**pending.inputs.as_kwargs())


@torch.no_grad()
def generate(
    model: EDiffIModel,
    request: GenerationRequest,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """The reference pipeline: one request, alone, start to finish."""
    run = RequestRun(model, request, encode_request(model, request))
    while (pending := run.pending()) is not None:
        run.advance(evaluate(model, pending))
        if progress is not None:
            progress(run.evaluations_done, run.evaluations_total)
    return run.images()




@torch.no_grad()
def generate_batch(model: EDiffIModel, requests: list[GenerationRequest]) -> list[list[Image.Image]]:
    """Several requests at once: each round, the pending evaluations of all
    unfinished requests are grouped by (stage, expert) and run as one call
    per group. Used for offline evaluation; the serving engine (engines/)
    adds scheduling policy, admission and cancellation on top of the same
    `RequestRun` machines."""
    runs = [RequestRun(model, r, encode_request(model, r)) for r in requests]
    while True:
        groups: dict[tuple[str, str], list[tuple[RequestRun, PendingEvaluation]]] = {}
        for run in runs:
            if (pending := run.pending()) is not None:
                groups.setdefault((pending.stage, pending.expert), []).append((run, pending))
        if not groups:
            return [run.images() for run in runs]
        for (stage, expert), members in groups.items():
            inputs = DenoiserInputs.cat([p.inputs for _, p in members])
            denoised = model.stages[stage].experts[expert](**inputs.as_kwargs())
            for (run, pending), rows in zip(members, denoised.split([len(p.inputs) for _, p in members])):
                run.advance(rows)
