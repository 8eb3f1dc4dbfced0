"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4

Training loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2
and ln(sigma) ~ N(P_mean, P_std^2) (Table 1, "EDM" column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ediffi.config import UNetConfig
from ediffi.unet import UNet

P_MEAN = -1.2
P_STD = 1.2
# Noise labels use ln(sigma); clamp so a zero augmentation level stays finite.
_MIN_LABEL_SIGMA = 1e-4


@dataclass(frozen=True)
class Preconditioning:
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> Preconditioning:
    """The four coefficients of EDM Table 1 for per-row sigma [B]."""
    sigma = sigma.to(torch.float64)
    variance = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=(sigma_data**2 / variance).float(),
        c_out=(sigma * sigma_data / variance.sqrt()).float(),
        c_in=(1.0 / variance.sqrt()).float(),
        c_noise=(sigma.clamp_min(_MIN_LABEL_SIGMA).log() / 4).float(),
    )


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) of EDM Table 1: makes the effective loss weight uniform."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMDenoiser(nn.Module):
    """D(x; sigma, cond): one expert with the docs/architecture.md §3 denoiser-call contract.

    Inputs: x [B,C,H,W], sigma [B], context [B,L,D], context_mask [B,L],
    pooled [B,P], pww_mask [B,L,H,W], pww_strength [B]; SR experts also take
    low_res [B,C,H,W] (upsampled, noise-augmented) and low_res_sigma [B] (its
    augmentation level). Output: denoised [B,C,H,W].
    """

    def __init__(self, cfg: UNetConfig, image_size: int, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.net = UNet(cfg, image_size)

    @property
    def is_super_resolution(self) -> bool:
        return self.net.cfg.low_res_channels > 0

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
        pre = edm_preconditioning(sigma, self.sigma_data)
        low_res_label = None
        if low_res_sigma is not None:
            low_res_label = low_res_sigma.float().clamp_min(_MIN_LABEL_SIGMA).log() / 4
        # The noise labels stay float32: the Fourier embedding multiplies them
        # by frequencies of up to ~100 (see ediffi/unet.py FourierEmbedding).
        expand = lambda t: t.to(dtype)[:, None, None, None]  # noqa: E731
        f = self.net(
            expand(pre.c_in) * x,
            pre.c_noise,
            sigma.to(dtype),
            context,
            context_mask,
            pooled,
            pww_mask,
            pww_strength.to(dtype),
            low_res,
            low_res_label,
        )
        return expand(pre.c_skip) * x + expand(pre.c_out) * f.to(dtype)
