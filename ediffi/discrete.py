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
scheduler config, and `initial_noise_scale` its `init_noise_sigma`, so a seed
gives the picture diffusers gives.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ediffi.config import ConditioningConfig, LatentConfig, TrainingScheduleConfig

KARRAS_RHO = 7.0


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


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma: linear interpolation of
    log sigma between the two neighbouring training sigmas, clamped to the
    trained range (k-diffusion `DiscreteSchedule.sigma_to_t`)."""
    # float32 throughout, as diffusers computes it: the timestep embedding
    # is sensitive to the last bits of t at t ~ 1000.
    log_sigma = sigma.float().clamp_min(1e-10).log()
    log_sigmas = log_sigmas.float()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w).double() * low_idx + w.double() * high_idx).float()


def _spaced_timesteps(schedule: TrainingScheduleConfig, steps: int) -> np.ndarray:
    """diffusers' inference timesteps for `timestep_spacing` (Lin et al. 2023, Table 2)."""
    n = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if schedule.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32) + schedule.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1


def inference_sigmas(schedule: TrainingScheduleConfig, steps: int) -> torch.Tensor:
    """The Karras schedule (EDM eq. 5, rho = 7) diffusers' Euler scheduler
    with use_karras_sigmas uses, then 0. Its end points are the training
    sigmas at the first and last spaced timestep (interpolated linearly in
    t), so it stays within the checkpoint's trained sigma range."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigmas = training_sigmas(schedule).numpy()
    spaced = np.interp(_spaced_timesteps(schedule, steps), np.arange(0, len(sigmas)), sigmas)
    sigma_min, sigma_max = float(spaced[-1]), float(spaced[0])
    ramp = np.linspace(0, 1, steps)
    karras = (sigma_max ** (1 / KARRAS_RHO) + ramp * (sigma_min ** (1 / KARRAS_RHO) - sigma_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    # diffusers rounds its schedule to float32; so do we, for the same steps.
    return torch.from_numpy(np.concatenate([karras, [0.0]]).astype(np.float32)).double()


def initial_noise_scale(schedule: TrainingScheduleConfig, sigma_max: float) -> float:
    """diffusers' `init_noise_sigma`: sigma_max for linspace/trailing spacing,
    but sqrt(sigma_max^2 + 1) for "leading" (SDXL) -- a diffusers convention
    we reproduce so that seeds give the same pictures."""
    if schedule.timestep_spacing == "leading":
        return math.sqrt(sigma_max**2 + 1)
    return sigma_max


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
    DESIGN §3 call contract. The expert reads its own block of the context
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
    ):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.conditioning = conditioning
        self.context_columns = context_columns
        self.pooled_columns = pooled_columns
        self.log_sigmas = training_sigmas(schedule).log()  # float32; not a buffer, so .to(dtype) keeps it

    @property
    def is_super_resolution(self) -> bool:
        return False

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma.cpu(), self.log_sigmas)

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
    ) -> torch.Tensor:
        dtype = x.dtype
        # The arithmetic of diffusers' Euler scheduler (scale_model_input,
        # step), in the model's dtype, so a call matches it to rounding.
        s = sigma.to(dtype)[:, None, None, None]
        variance = s**2 + 1
        start, stop = self.context_columns
        # SD does not mask the padded prompt tokens: neither do we, so the
        # context mask is not passed on (diffusers' pipelines pass none).
        attention_kwargs = {"pww": (pww_mask, pww_strength, sigma)} if pww_strength.abs().max() > 0 else None
        out = self.unet(
            x / variance**0.5,
            self.timesteps(sigma).to(x.device),
            encoder_hidden_states=context[:, :, start:stop],
            added_cond_kwargs=self.added_conditions(pooled),
            cross_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0].to(dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return out * (-s / variance**0.5) + x / variance
        return out


class LatentDecoder(nn.Module):
    """The VAE decoder as a batched step: latents [B,C,h,w] -> pixels in
    [-1, 1] [B,3,H,W]. Undoes the latent normalisation diffusers applies
    (scaling factor, and latents_mean/std or shift_factor where set)."""

    def __init__(self, vae: nn.Module, cfg: LatentConfig):
        super().__init__()
        self.vae = vae
        self.cfg = cfg

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
