"""Samplers for the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

The math lives in pure step functions of tensors whose sigmas are per row
([B], broadcast over C,H,W), as k-diffusion's `sampling.py`. A `Sampler` is a
small per-request state machine around them: it says which denoiser
evaluation it needs next (`pending`) and takes the result (`advance`). A Heun
step simply asks twice; the second evaluation, at sigma_{i+1}, may be routed
to another expert. The engine interleaves many such machines in one batch;
`sample()` drives one alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ediffi.spec import DEFAULT_SAMPLER, GUIDANCE_OFF_AT_OR_BELOW, SAMPLERS


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _rows(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-row sigma [B] (or a scalar) shaped to broadcast over [B,C,H,W]."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def euler_step(x, denoised, sigma, sigma_next):
    """One Euler step of the ODE: x + (sigma_next - sigma) * (x - D) / sigma."""
    s, s_next = _rows(sigma, x), _rows(sigma_next, x)
    return x + (s_next - s) * (x - denoised) / s


def heun_correction(x, denoised, x_next, denoised_next, sigma, sigma_next):
    """EDM Algorithm 1, line 7-8: average the slopes at sigma_i and sigma_{i+1}."""
    s, s_next = _rows(sigma, x), _rows(sigma_next, x)
    d = (x - denoised) / s
    d_next = (x_next - denoised_next) / s_next
    return x + (s_next - s) * 0.5 * (d + d_next)


def dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the sigma parametrisation,
    t = -ln(sigma). The first step (no history) and the last (sigma_next = 0)
    are first order."""
    s, s_next = _rows(sigma, x), _rows(sigma_next, x)
    if old_denoised is None or float(torch.as_tensor(sigma_next).max()) == 0.0:
        if float(torch.as_tensor(sigma_next).max()) == 0.0:
            return denoised
        h = s.log() - s_next.log()
        return (s_next / s) * x - torch.expm1(-h) * denoised
    s_prev = _rows(sigma_prev, x)
    h = s.log() - s_next.log()
    h_last = s_prev.log() - s.log()
    r = h_last / h
    blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (s_next / s) * x - torch.expm1(-h) * blended


@dataclass(frozen=True)
class Evaluation:
    """A request for one denoiser evaluation D(x; sigma)."""

    x: torch.Tensor
    sigma: float


class Sampler:
    """Per-request sampler state: ask for an evaluation, take its result.

    ``restart_below``: sigmas where a multistep sampler drops its history, so
    its first step below each is first order, as a solver started afresh
    there (single-step samplers have no history to drop)."""

    evaluations_per_step = 1

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()):
        self.x = x
        self.sigmas = [float(s) for s in sigmas]
        self.step = 0
        self.restart_below = tuple(restart_below)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def pending(self) -> Evaluation | None:
        raise NotImplementedError

    def advance(self, denoised: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def total_evaluations(self) -> int:
        return self.steps


class EulerSampler(Sampler):
    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor) -> None:
        i = self.step
        self.x = euler_step(self.x, denoised, self.sigmas[i], self.sigmas[i + 1])
        self.step += 1


class HeunSampler(Sampler):
    """EDM Algorithm 1 (deterministic, S_churn = 0): Euler predictor, then a
    trapezoidal corrector except on the last step to sigma = 0."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()):
        super().__init__(x, sigmas, restart_below)
        self._predicted: torch.Tensor | None = None
        self._denoised: torch.Tensor | None = None

    def pending(self) -> Evaluation | None:
        if self.done:
            return None
        if self._predicted is None:
            return Evaluation(self.x, self.sigmas[self.step])
        return Evaluation(self._predicted, self.sigmas[self.step + 1])

    def advance(self, denoised: torch.Tensor) -> None:
        i = self.step
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self._predicted is None:
            predicted = euler_step(self.x, denoised, sigma, sigma_next)
            if sigma_next == 0.0:
                self.x, self.step = predicted, i + 1
            else:
                self._predicted, self._denoised = predicted, denoised
            return
        self.x = heun_correction(self.x, self._denoised, self._predicted, denoised, sigma, sigma_next)
        self._predicted = self._denoised = None
        self.step = i + 1

    @property
    def total_evaluations(self) -> int:
        return 2 * self.steps - 1


class DPMPP2MSampler(Sampler):
    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()):
        super().__init__(x, sigmas, restart_below)
        self._old_denoised: torch.Tensor | None = None

    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor) -> None:
        i = self.step
        sigma_prev = self.sigmas[i - 1] if i > 0 else None
        old_denoised = self._old_denoised
        if sigma_prev is not None and any(sigma_prev >= r > self.sigmas[i] for r in self.restart_below):
            old_denoised = None
        self.x = dpmpp_2m_step(self.x, denoised, old_denoised, self.sigmas[i], self.sigmas[i + 1], sigma_prev)
        self._old_denoised = denoised
        self.step += 1


_SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "heun": HeunSampler,
    "dpmpp_2m": DPMPP2MSampler,
}


def make_sampler(name: str, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()) -> Sampler:
    try:
        sampler_class = _SAMPLER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    return sampler_class(x, sigmas, restart_below)


def sample(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = DEFAULT_SAMPLER,
) -> torch.Tensor:
    """Solve the ODE from x (already scaled by sigmas[0]) along `sigmas`."""
    state = make_sampler(sampler, x, sigmas)
    while (evaluation := state.pending()) is not None:
        state.advance(denoise(evaluation.x, evaluation.sigma))
    return state.x


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + s (cond - uncond) with a per-row scale s [B] (Ho & Salimans 2022)
    where s > 1; at s <= 1 guidance is off: exactly the conditional prediction."""
    s = _rows(scale, cond)
    # s <= 1 is "off" as in diffusers' pipelines (spec.GUIDANCE_OFF_AT_OR_BELOW), and
    # exactly cond, not cond up to rounding (uncond + (cond - uncond)).
    return torch.where(s <= GUIDANCE_OFF_AT_OR_BELOW, cond, uncond + s * (cond - uncond))

