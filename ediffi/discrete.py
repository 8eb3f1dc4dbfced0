"""Discrete-time (DDPM-trained) diffusers checkpoints as EDM denoisers.

A UNet trained on the variance-preserving schedule alpha_bar_t (t = 0..T-1)
sees x_t = sqrt(alpha_bar_t) (x0 + sigma_t eps) with sigma_t =
sqrt((1 - alpha_bar_t) / alpha_bar_t). In the variance-exploding form this
project samples in (x = x0 + sigma eps), one evaluation is

    D(x; sigma) = c_skip x + c_out F(c_in x; t(sigma))      (EDM eq. 7)

with c_in = 1 / sqrt(sigma^2 + 1) (back to the VP scale the UNet was trained
on) and t(sigma) the fractional training timestep found by interpolating
log sigma over the training schedule (k-diffusion's
`DiscreteSchedule.sigma_to_t`). The prediction type fixes c_skip / c_out:
epsilon: D = x - sigma eps; v: D = x / (sigma^2+1) - sigma / sqrt(sigma^2+1) v
(Salimans & Ho 2022, eq. 6 rewritten in sigma); sample: D = F.

`inference_sigmas` reproduces the sigmas of diffusers'
`EulerDiscreteScheduler(use_karras_sigmas=True)` for the checkpoint's
scheduler config, `initial_noise_scale` its `init_noise_sigma` and
`unet_timesteps` the timesteps its UNet calls get, so a seed gives the
picture diffusers gives; for the `dpmpp_2m` sampler (and IF) those of
`DPMSolverMultistepScheduler(use_karras_sigmas=True)` instead
(`request_schedule`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from ediffi.config import ConditioningConfig, DynamicThresholdingConfig, LatentConfig, TrainingScheduleConfig
from ediffi.failure import InputError
from ediffi.samplers import ScheduledSteps

KARRAS_RHO = 7.0
DPM_SOLVER = "DPMSolverMultistepScheduler"
UNIPC = "UniPCMultistepScheduler"
# The schedulers that space their timesteps, span their Karras schedule and scale their initial noise as
# DPMSolverMultistepScheduler does (UniPC's set_timesteps is DPM-Solver's, but for rounding IF's timesteps).
_DPM_LIKE = (DPM_SOLVER, UNIPC)
#: The sampler whose diffusers scheduler sets a request's conventions, where it is not the checkpoint's own.
_SAMPLER_SCHEDULERS = {"dpmpp_2m": DPM_SOLVER, "unipc": UNIPC}


def training_alphas_cumprod(schedule: TrainingScheduleConfig) -> torch.Tensor:
    """alpha_bar_t of the training schedule, float32 as diffusers builds it."""
    n = schedule.num_train_timesteps
    if schedule.trained_betas is not None:
        betas = torch.tensor(schedule.trained_betas, dtype=torch.float32)
    elif schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    elif schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. 17)
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def training_sigmas(schedule: TrainingScheduleConfig) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t (float32)."""
    acp = training_alphas_cumprod(schedule)
    return ((1 - acp) / acp) ** 0.5


def _log_sigmas(schedule: TrainingScheduleConfig) -> torch.Tensor:
    """log sigma_t as diffusers' DPM-Solver takes it: numpy's float32 log of
    the float32 sigmas, as float64 for its float64 interpolation."""
    return torch.from_numpy(np.log(training_sigmas(schedule).numpy())).double()


def log_sigma_table(schedule: TrainingScheduleConfig) -> torch.Tensor:
    """The log sigma_t table `sigma_to_t` interpolates for the scheduler
    reproduced: float32 as Euler's arithmetic; DPM-Solver's float64 (its
    truncated IF timesteps depend on the last bit)."""
    return _log_sigmas(schedule) if schedule.karras_scheduler in _DPM_LIKE else training_sigmas(schedule).log()


def timestep_at(schedule: TrainingScheduleConfig, sigma: float, log_sigmas: torch.Tensor | None = None) -> float:
    """The UNet timestep of a call at `sigma` under `schedule`'s diffusers
    scheduler (`unet_timesteps` on its `log_sigma_table`; pass the table when
    calling often: it is built from the whole training schedule)."""
    table = log_sigma_table(schedule) if log_sigmas is None else log_sigmas
    return float(unet_timesteps(torch.tensor([sigma], dtype=torch.float32), table, schedule))


def request_schedule(
    schedule: TrainingScheduleConfig, sampler: str, use_karras_sigmas: bool = True
) -> TrainingScheduleConfig:
    """The schedule whose diffusers scheduler a request's sampler reproduces.
    `dpmpp_2m` is "DPM++ 2M Karras", diffusers' DPMSolverMultistepScheduler
    (use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2),
    whose conventions on the same checkpoint are not EulerDiscreteScheduler's
    (its set_timesteps): the Karras schedule spans the whole trained sigma
    range whatever the timestep_spacing, init_noise_sigma is 1 (it samples
    the VP x), and the timesteps it feeds the UNet are `_sigma_to_t(...)`
    rounded to integers, where Euler's stay fractional; `unipc`, diffusers'
    UniPCMultistepScheduler, the same conventions. Euler and Heun keep
    the checkpoint's own (Euler's for SD/SDXL, DPM-Solver's for IF).
    ``use_karras_sigmas=False`` (Euler and DPM++ 2M, checked by the request): the
    scheduler's own spaced sigmas, as diffusers' schedulers by default."""
    scheduler = _SAMPLER_SCHEDULERS.get(sampler)
    if scheduler is not None and schedule.karras_scheduler != scheduler:
        schedule = schedule.model_copy(update={"karras_scheduler": scheduler})
    if schedule.use_karras_sigmas != use_karras_sigmas:
        schedule = schedule.model_copy(update={"use_karras_sigmas": use_karras_sigmas})
    return schedule


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma: linear interpolation of
    log sigma between the two neighbouring training sigmas, clamped to the
    trained range (k-diffusion `DiscreteSchedule.sigma_to_t`)."""
    # In the table's dtype: float32 as diffusers' Euler computes it (the
    # timestep embedding is sensitive to the last bits of t at t ~ 1000);
    # float64 as DPM-Solver does (its truncated timesteps, see unet_timesteps).
    log_sigma = sigma.to(log_sigmas.dtype).clamp_min(1e-10).log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w).double() * low_idx + w.double() * high_idx).to(log_sigmas.dtype)


def inference_timesteps(schedule: TrainingScheduleConfig, steps: int) -> np.ndarray:
    """diffusers' inference timesteps for `timestep_spacing` (Lin et al. 2023, Table 2), float32:
    without Karras sigmas, the timesteps the scheduler feeds the UNet, one per sigma.
    DPMSolverMultistepScheduler spaces steps + 1 points and drops the last, in integers."""
    n = schedule.num_train_timesteps
    if schedule.karras_scheduler in _DPM_LIKE:
        if schedule.timestep_spacing == "linspace":
            spaced = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif schedule.timestep_spacing == "leading":
            spaced = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1].astype(np.int64)
            spaced += schedule.steps_offset
        else:  # trailing
            spaced = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        return spaced.astype(np.float32)
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if schedule.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32) + schedule.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1


def scheduled_steps(
    schedule: TrainingScheduleConfig, sampler: str, steps: int, v_prediction: bool,
    thresholding: DynamicThresholdingConfig | None = None, learned_variance: bool = False,
) -> ScheduledSteps:
    """The timesteps of diffusers' DDIMScheduler, PNDMScheduler or DDPMScheduler built from the
    checkpoint's scheduler config, as its `set_timesteps(steps)` makes them: integer timesteps spaced
    by the config's `timestep_spacing` (the class default "leading" where the config names none),
    PNDM's with its second timestep repeated (plms_timesteps), its alpha_bar past t = 0 and DDIM's and
    DDPM's correction of x0: the stage's dynamic `thresholding` if any, else clip_sample (each None in
    the schedule: the class default, as `from_config` gives it). PNDMScheduler corrects nothing. DDPM
    steps to the next listed timestep (the last to alpha_bar 1) with its variance_type's noise."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    n = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing if schedule.timestep_spacing_given else "leading"
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round().astype(np.int64) + schedule.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(n, 0, -n / steps))[::-1].astype(np.int64) - 1
    prk_evaluations = 0
    if sampler == "pndm" and schedule.skip_prk_steps:
        timesteps = np.concatenate([timesteps[:-1], timesteps[-2:-1], timesteps[-1:]])
    elif sampler == "pndm":  # PNDMScheduler.set_timesteps' Runge-Kutta timesteps, then the multistep ones
        pndm_order, half = 4, n // steps // 2
        if steps < pndm_order:
            raise InputError("steps", f"pndm with this checkpoint's scheduler (Runge-Kutta start) needs steps >= {pndm_order}")
        prk = timesteps[-pndm_order:].repeat(2) + np.tile(np.array([0, half]), pndm_order)
        prk = prk[:-1].repeat(2)[1:-1]
        prk_evaluations = len(prk)
        timesteps = np.concatenate([timesteps[:-3], prk])  # ascending here; reversed below
    elif sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler {sampler!r} does not step by timestep (ddim, pndm, ddpm do)")
    # DDPMScheduler's alpha_bar past t = 0 is always 1 (its `one`)
    set_alpha_to_one = schedule.set_alpha_to_one if schedule.set_alpha_to_one is not None else sampler == "ddim"
    alphas_cumprod = training_alphas_cumprod(schedule)
    correct_x0 = None
    corrects = sampler in ("ddim", "ddpm")
    if corrects and thresholding is not None:
        correct_x0 = functools.partial(dynamic_threshold, ratio=thresholding.ratio, max_value=thresholding.max_value)
    elif corrects and (schedule.clip_sample if schedule.clip_sample is not None else True):
        correct_x0 = functools.partial(torch.clamp, min=-schedule.clip_sample_range, max=schedule.clip_sample_range)
    return ScheduledSteps(
        timesteps=tuple(int(t) for t in timesteps[::-1]),
        step_ratio=n // steps,
        alphas_cumprod=alphas_cumprod,
        final_alpha_cumprod=1.0 if set_alpha_to_one or sampler == "ddpm" else float(alphas_cumprod[0]),
        v_prediction=v_prediction,
        correct_x0=correct_x0,
        prk_evaluations=prk_evaluations,
        to_next_timestep=sampler == "ddpm",
        variance_type=schedule.ddpm_variance_type(learned_variance) if sampler == "ddpm" else None,
    )


def inference_sigmas(schedule: TrainingScheduleConfig, steps: int) -> torch.Tensor:
    """The Karras schedule (EDM eq. 5, rho = 7) diffusers' scheduler with
    use_karras_sigmas uses, then 0, within the checkpoint's trained sigma
    range. Euler's end points are the training sigmas at the first and last
    spaced timestep (interpolated linearly in t); DPM-Solver's are the ends
    of the whole training schedule."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigmas = training_sigmas(schedule).numpy()
    if not schedule.use_karras_sigmas:
        # The scheduler's own (EulerDiscreteScheduler's, DPMSolverMultistepScheduler's): the
        # training sigmas at its spaced timesteps (linear interpolation in t), then 0.
        spaced = np.interp(inference_timesteps(schedule, steps), np.arange(0, len(sigmas)), sigmas)
        return torch.from_numpy(np.concatenate([spaced, [0.0]]).astype(np.float32)).double()
    if schedule.karras_scheduler in _DPM_LIKE:
        sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
    else:
        spaced = np.interp(inference_timesteps(schedule, steps), np.arange(0, len(sigmas)), sigmas)
        sigma_min, sigma_max = float(spaced[-1]), float(spaced[0])
    ramp = np.linspace(0, 1, steps)
    karras = (sigma_max ** (1 / KARRAS_RHO) + ramp * (sigma_min ** (1 / KARRAS_RHO) - sigma_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    # diffusers rounds its schedule to float32; so do we, for the same steps.
    return torch.from_numpy(np.concatenate([karras, [0.0]]).astype(np.float32)).double()


def initial_noise_scale(schedule: TrainingScheduleConfig, sigma_max: float) -> float:
    """diffusers' `init_noise_sigma`: sigma_max for Euler with linspace/trailing
    spacing, but sqrt(sigma_max^2 + 1) for "leading" (SDXL), and for
    DPM-Solver, which samples the variance-preserving x (init_noise_sigma 1,
    i.e. sqrt(sigma_max^2 + 1) here) -- diffusers conventions we reproduce so
    that seeds give the same pictures."""
    if schedule.timestep_spacing == "leading" or schedule.karras_scheduler in _DPM_LIKE:
        return math.sqrt(sigma_max**2 + 1)
    return sigma_max


def unet_timesteps(sigma: torch.Tensor, log_sigmas: torch.Tensor, schedule: TrainingScheduleConfig) -> torch.Tensor:
    """The timestep a UNet call at sigma gets from the scheduler reproduced
    (`log_sigmas`: its `log_sigma_table`). Euler: the fractional t.
    DPM-Solver stores its timesteps as int64: rounded, except for the cosine
    schedule (IF), where it skips the rounding and the cast truncates
    (diffusers' DPMSolverMultistepScheduler.set_timesteps); UniPC always rounds."""
    t = sigma_to_t(sigma, log_sigmas)
    if schedule.karras_scheduler == "EulerDiscreteScheduler":
        return t
    truncated = schedule.beta_schedule == "squaredcos_cap_v2" and schedule.karras_scheduler == DPM_SOLVER
    return t.trunc() if truncated else t.round()


def boundary_sigma(schedule: TrainingScheduleConfig, high_noise_frac: float) -> float:
    """The sigma where diffusers' `denoising_end=F` stops the base and
    `denoising_start=F` starts the refiner: steps with timestep t >=
    round(T - F T) belong to the base, i.e. sigma >= sigma_train[cutoff]."""
    if not 0.0 < high_noise_frac < 1.0:
        raise ValueError(f"high_noise_frac must be within (0, 1), got {high_noise_frac}")
    n = schedule.num_train_timesteps
    cutoff = int(round(n - high_noise_frac * n))
    return float(training_sigmas(schedule)[cutoff])


class DiscreteUNetDenoiser(nn.Module):
    """D(x; sigma, cond) around a diffusers UNet2DConditionModel with the
    docs/architecture.md §3 call contract. The expert reads its own block of the context
    columns and of the pooled vector (`context_columns`, `pooled_columns`);
    SDXL experts split their pooled block into text_embeds and add_time_ids.
    The paint-with-words inputs go to the attention processors (paint.py)."""

    def __init__(
        self,
        unet: nn.Module,
        prediction_type: str,
        schedule: TrainingScheduleConfig,
        conditioning: ConditioningConfig,
        context_columns: tuple[int, int],
        pooled_columns: tuple[int, int],
        learned_variance: bool = False,
        noise_level_schedule: TrainingScheduleConfig | None = None,
        mask_channels: int = 0,
    ):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.schedule = schedule
        self.conditioning = conditioning
        self.context_columns = context_columns
        self.pooled_columns = pooled_columns
        # IF predicts [epsilon | variance]: the output is then [D | variance] (ddpm steps with it).
        self.learned_variance = learned_variance
        # An inpainting UNet: `low_res` carries the mask and the masked image's latents, concatenated as is.
        self.mask_channels = mask_channels
        # Not buffers, so .to(dtype) keeps them.
        self.log_sigmas = log_sigma_table(schedule)
        self.noise_level_log_sigmas = None if noise_level_schedule is None else _log_sigmas(noise_level_schedule)

    @property
    def is_super_resolution(self) -> bool:
        return self.noise_level_log_sigmas is not None

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The checkpoint's own convention (Euler's for SD/SDXL, DPM-Solver's
        for IF), for calls that do not bring their request's `timestep`."""
        return unet_timesteps(sigma.cpu(), self.log_sigmas, self.schedule)

    def noise_levels(self, low_res_sigma: torch.Tensor) -> torch.Tensor:
        """The class label of an SR UNet (IF stage II): the image-noising
        timestep whose sigma the low-res image was noised with (an integer,
        as diffusers' `noise_level`)."""
        return sigma_to_t(low_res_sigma.cpu(), self.noise_level_log_sigmas).round().to(low_res_sigma.device)

    def added_conditions(self, pooled: torch.Tensor) -> dict | None:
        if self.conditioning.micro_conditioning == "none":
            return None
        start, stop = self.pooled_columns
        split = stop - self.conditioning.time_ids_width
        return {"text_embeds": pooled[:, start:split], "time_ids": pooled[:, split:stop]}

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        pooled: torch.Tensor,
        pww_mask: torch.Tensor,
        pww_strength: torch.Tensor,
        low_res: torch.Tensor | None = None,
        low_res_sigma: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`timestep [B]`: each row's UNet timestep as its request's sampler
        computes it (ediffi.pipeline: `request_schedule`, `unet_timesteps`);
        None: `self.timesteps(sigma)`."""
        dtype = x.dtype
        # The arithmetic of diffusers' Euler scheduler (scale_model_input,
        # step), in the model's dtype, so a call matches it to rounding.
        s = sigma.to(dtype)[:, None, None, None]
        variance = s**2 + 1
        start, stop = self.context_columns
        # SD does not mask the padded prompt tokens: neither do we, so the
        # context mask is not passed on (diffusers' pipelines pass none).
        attention_kwargs = {"pww": (pww_mask, pww_strength, sigma)} if pww_strength.abs().max() > 0 else None
        model_input, class_labels = x / variance**0.5, None
        if self.is_super_resolution:
            # low_res = up + sigma_aug * noise; the UNet was trained on
            # DDPM's add_noise, sqrt(abar) up + sqrt(1 - abar) noise, which is
            # the same image scaled by 1 / sqrt(sigma_aug^2 + 1).
            aug = low_res_sigma.to(dtype)[:, None, None, None]
            model_input = torch.cat([model_input, low_res.to(dtype) / (aug**2 + 1) ** 0.5], dim=1)
            class_labels = self.noise_levels(low_res_sigma)
        elif self.mask_channels:
            # diffusers' inpaint pipeline: cat([scale_model_input(latents), mask, masked_image_latents])
            model_input = torch.cat([model_input, low_res.to(dtype)], dim=1)
        out = self.unet(
            model_input,
            (self.timesteps(sigma) if timestep is None else timestep).to(x.device, torch.float32),
            encoder_hidden_states=context[:, :, start:stop],
            class_labels=class_labels,
            added_cond_kwargs=self.added_conditions(pooled),
            cross_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        channels = x.shape[1]
        predicted_variance = out[:, channels:].to(dtype) if self.learned_variance else None
        out = out[:, :channels].to(dtype)
        if self.prediction_type == "epsilon":
            denoised = x - s * out
        elif self.prediction_type == "v_prediction":
            denoised = out * (-s / variance**0.5) + x / variance
        else:
            denoised = out
        # A learned variance (IF) travels behind D, [D | variance], for ddpm's step (the ODE samplers drop it).
        return denoised if predicted_variance is None else torch.cat([denoised, predicted_variance], dim=1)


class LatentDecoder(nn.Module):
    """The VAE decoder as a batched step: latents [B,C,h,w] -> pixels in
    [-1, 1] [B,3,H,W]. Undoes the latent normalisation diffusers applies
    (scaling factor, and latents_mean/std or shift_factor where set)."""

    def __init__(self, vae: nn.Module, cfg: LatentConfig):
        super().__init__()
        self.vae = vae
        self.cfg = cfg

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """img2img's start: pixels [1,3,H,W] in [-1, 1], encoded once -> one normalised latent sample per
        generator [n,C,h,w], each drawn from the VAE's posterior with its generator (on the CPU, as
        diffusers' randn_tensor draws for a CPU generator), then the inverse of :meth:`forward`'s
        normalisation."""
        cfg = self.cfg
        parameter = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist
        draws = torch.cat([torch.randn(posterior.mean.shape, generator=g, dtype=posterior.mean.dtype) for g in generators])
        latents = posterior.mean + posterior.std * draws.to(posterior.mean.device)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            return (latents - mean) * cfg.scaling_factor / std
        if cfg.shift_factor is not None:
            latents = latents - cfg.shift_factor
        return cfg.scaling_factor * latents

    def forward(self, x: torch.Tensor, **_unused) -> torch.Tensor:
        cfg = self.cfg
        latents = x.to(next(self.vae.parameters()).dtype)
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = torch.tensor(cfg.latents_mean, device=x.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=x.device, dtype=latents.dtype).view(1, -1, 1, 1)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
            if cfg.shift_factor is not None:
                latents = latents + cfg.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3), as diffusers'
    schedulers apply it to their predicted x0: per sample, s = the `ratio`
    quantile of |x0| clamped to [1, max_value]; x0 <- clamp(x0, -s, s) / s.
    With s = 1 this is plain clipping to [-1, 1]."""
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def noise_level_sigma(schedule: TrainingScheduleConfig, level: int) -> float:
    """The sigma of timestep `level` of an image-noising schedule: DDPM's
    add_noise at that level is sqrt(abar) (x + sigma noise)."""
    if not 0 <= level < schedule.num_train_timesteps:
        raise ValueError(f"noise level must be within [0, {schedule.num_train_timesteps}), got {level}")
    return float(training_sigmas(schedule)[level])
