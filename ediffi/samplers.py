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


def euler_ancestral_step(x, denoised, sigma, sigma_next, noise):
    """k-diffusion's `sample_euler_ancestral` step (eta 1), diffusers' EulerAncestralDiscreteScheduler:
    an Euler step down to sigma_down, then fresh noise of std sigma_up, where sigma_up^2 + sigma_down^2
    = sigma_next^2 and sigma_up = sigma_next sqrt(1 - sigma_next^2 / sigma^2) (DDPM's posterior noise)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return euler_step(x, denoised, sigma, sigma_down) + noise * sigma_up


@dataclass(frozen=True)
class Evaluation:
    """A request for one denoiser evaluation D(x; sigma); ``timestep``: the UNet timestep a
    diffusers scheduler reproduced feeds at this call (None: the one sigma maps to)."""

    x: torch.Tensor
    sigma: float
    timestep: float | None = None


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

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        """Take the evaluation asked for: D(x; sigma), and ``variance``, the UNet's predicted variance
        channels where it learns them (IF; the conditional rows'), which only ddpm steps with."""
        raise NotImplementedError

    @property
    def total_evaluations(self) -> int:
        return self.steps

    def keep_unmasked(self, mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor) -> None:
        """Inpainting with a UNet that takes no mask (diffusers' inpaint pipelines with a 4-channel UNet),
        after each step: where ``mask`` is 0 the state becomes ``known`` (the init image's latents)
        noised with ``noise`` (the initial noise) to the level of the next evaluation, clean after the
        last step; where it is 1 the sampled state stays. diffusers: (1 - m) add_noise(known, noise,
        t_next) + m latents, with the scheduler's add_noise (VE here: known + sigma noise)."""
        state, sigma = self._state()
        noised = known if sigma == 0.0 else known + sigma * noise
        self._set_state((1 - mask) * noised + mask * state)

    def _state(self) -> tuple[torch.Tensor, float]:
        """The sample the next evaluation starts from, and its sigma (0 when done)."""
        return self.x, self.sigmas[self.step]

    def _set_state(self, x: torch.Tensor) -> None:
        self.x = x


class EulerSampler(Sampler):
    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
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

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
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

    def _state(self) -> tuple[torch.Tensor, float]:
        # Between its two evaluations the state is the Euler prediction at sigma_{i+1}: diffusers'
        # HeunDiscreteScheduler returns it from its first-order step, and the inpaint pipeline blends it.
        if self._predicted is not None:
            return self._predicted, self.sigmas[self.step + 1]
        return super()._state()

    def _set_state(self, x: torch.Tensor) -> None:
        if self._predicted is not None:
            self._predicted = x
        else:
            self.x = x


class DPMPP2MSampler(Sampler):
    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()):
        super().__init__(x, sigmas, restart_below)
        self._old_denoised: torch.Tensor | None = None

    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        i = self.step
        sigma_prev = self.sigmas[i - 1] if i > 0 else None
        old_denoised = self._old_denoised
        if sigma_prev is not None and any(sigma_prev >= r > self.sigmas[i] for r in self.restart_below):
            old_denoised = None
        self.x = dpmpp_2m_step(self.x, denoised, old_denoised, self.sigmas[i], self.sigmas[i + 1], sigma_prev)
        self._old_denoised = denoised
        self.step += 1


def _unipc_lambda(sigma: float) -> torch.Tensor:
    """lambda = log(alpha_t) - log(sigma_t) of a VE sigma, in float32 as UniPCMultistepScheduler computes it
    (alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t): -log sigma, inf at sigma = 0."""
    s = torch.tensor(sigma, dtype=torch.float32)
    alpha = 1 / (s**2 + 1) ** 0.5
    return torch.log(alpha) - torch.log(s * alpha)


class UniPCSampler(Sampler):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler runs it by default: data prediction
    (predict_x0), the B(h) = e^h - 1 variant (bh2), order 2, lower order at the first and last steps. Each
    step first corrects the state with the evaluation just made (UniC, eq. 8: the corrector reuses the
    predictor's next evaluation, so it costs none), then predicts the next state (UniP, eq. 5), written
    here for the variance-exploding x = x_vp / alpha_t, where the exponential integrator's factor
    sigma_t / sigma_s of x_vp becomes sigma_next / sigma. A history that restarts (an expert boundary:
    another diffusers pipeline, a fresh scheduler) drops the corrector and the order with it."""

    order = 2

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, restart_below: Sequence[float] = ()):
        super().__init__(x, sigmas, restart_below)
        self._outputs: list[tuple[float, torch.Tensor]] = []  # (sigma, D) of the last `order` evaluations
        self._last_sample: torch.Tensor | None = None  # the state the last prediction started from
        self._last_order = 0  # that prediction's order (the corrector's)

    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        i, sigma = self.step, self.sigmas[self.step]
        if i > 0 and any(self.sigmas[i - 1] >= r > sigma for r in self.restart_below):
            self._outputs, self._last_sample = [], None
        x = self.x
        if self._last_sample is not None:
            x = self._corrected(denoised, sigma)
        self._outputs = (self._outputs + [(sigma, denoised)])[-self.order:]
        # lower_order_final: order 1 on the last step; warm-up: at most one more than the history behind it
        order = min(self.order, self.steps - i, len(self._outputs))
        self._last_sample, self._last_order = x, order
        self.x = self._predicted(x, sigma, self.sigmas[i + 1], order)
        self.step = i + 1

    @staticmethod
    def _phi(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h phi_1(-h) = e^-h - 1, B(-h) (bh2: the same), b_1, b_2): the right-hand sides of UniPC's
        order conditions, divided by B(h), as the scheduler builds them for data prediction."""
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_1 = h_phi_k / h_phi_1
        h_phi_k = h_phi_k / hh - 1 / 2
        return h_phi_1, h_phi_1, b_1, h_phi_k * 2 / h_phi_1

    def _predicted(self, x: torch.Tensor, sigma: float, sigma_next: float, order: int) -> torch.Tensor:
        """UniP-2 (bh2) from sigma to sigma_next: x_next = (sigma_next / sigma) x - (e^-h - 1) m0 -
        B(h) rho (m1 - m0) / r1, rho = 1/2 for order 2."""
        m0 = self._outputs[-1][1]
        lam, lam_next = _unipc_lambda(sigma), _unipc_lambda(sigma_next)
        h = lam_next - lam
        h_phi_1, b_h, _, _ = self._phi(h)
        x_next = (sigma_next / sigma) * x - h_phi_1 * m0
        if order == 2:
            sigma_prev, m1 = self._outputs[-2]
            r1 = (_unipc_lambda(sigma_prev) - lam) / h
            x_next = x_next - b_h * 0.5 * ((m1 - m0) / r1)
        return x_next

    def _corrected(self, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """UniC (bh2) of the last step, from its start (``_last_sample`` at sigma_prev) to ``sigma`` with the
        evaluation made there (``denoised``) as one more point: the order conditions R rho = b solved
        for the last prediction's order (rho = 1/2 at order 1)."""
        (sigma_prev, m0), x = self._outputs[-1], self._last_sample
        lam, lam_prev = _unipc_lambda(sigma), _unipc_lambda(sigma_prev)
        h = lam - lam_prev
        h_phi_1, b_h, b_1, b_2 = self._phi(h)
        corrected = (sigma / sigma_prev) * x - h_phi_1 * m0
        if self._last_order == 1:
            return corrected - b_h * 0.5 * (denoised - m0)
        sigma_before, m1 = self._outputs[-2]
        r1 = (_unipc_lambda(sigma_before) - lam_prev) / h
        one = torch.ones(())
        rho = torch.linalg.solve(torch.stack([torch.stack([one, one]), torch.stack([r1, one])]), torch.stack([b_1, b_2]))
        return corrected - b_h * (rho[0] * ((m1 - m0) / r1) + rho[1] * (denoised - m0))


class EulerAncestralSampler(Sampler):
    """Euler ancestral: each step's fresh noise comes from ``noise(shape)`` (the request's per-image
    generators, continued after the initial noise, so a seed fixes the image, as diffusers' one
    generator does). The noise is drawn on the last step too (where its scale is 0), as diffusers does."""

    def __init__(self, x, sigmas, restart_below=(), noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None):
        super().__init__(x, sigmas, restart_below)
        self._noise = noise  # None: a sampler only counted (total_evaluations), never advanced

    def pending(self) -> Evaluation | None:
        return None if self.done else Evaluation(self.x, self.sigmas[self.step])

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        i = self.step
        if self._noise is None:
            raise ValueError("euler_a needs a noise source to step")
        noise = self._noise(tuple(self.x.shape[1:])).to(self.x)
        self.x = euler_ancestral_step(self.x, denoised, self.sigmas[i], self.sigmas[i + 1], noise)
        self.step += 1


@dataclass(frozen=True)
class ScheduledSteps:
    """The timesteps of a discrete-time diffusers scheduler that steps by timestep (DDIM, PNDM), as its
    `set_timesteps` makes them (ediffi.discrete.scheduled_steps builds this): the UNet call timesteps in
    order, the stride `T // steps` its step takes back from each, the training alpha_bar table (float32,
    the scheduler's) and alpha_bar past t = 0 (1, or alpha_bar_0 where the config says
    set_alpha_to_one false: the last step then keeps alpha_bar_0's little noise, as diffusers' does)."""

    timesteps: tuple[int, ...]
    step_ratio: int
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    v_prediction: bool = False
    # PNDM without skip_prk_steps: its first evaluations are Runge-Kutta's (12; none with skip_prk_steps)
    prk_evaluations: int = 0
    # DDIM's and DDPM's correction of its predicted x0 (dynamic thresholding, else clip_sample's clamp
    # to [-range, range]); DDIM's eps stays as predicted, as DDIMScheduler.step keeps pred_epsilon
    correct_x0: Callable[[torch.Tensor], torch.Tensor] | None = None
    # DDPM: each step goes to the next timestep of the list (the last to t = -1, alpha_bar 1), not
    # back by the stride; its ancestral noise has DDPMScheduler's variance_type (resolved: see
    # ediffi.discrete.ddpm_variance_type)
    to_next_timestep: bool = False
    variance_type: str | None = None

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def previous(self, index: int) -> int:
        """The timestep the step at ``timesteps[index]`` goes to (diffusers' prev_timestep)."""
        if self.to_next_timestep:
            return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1
        return self.timesteps[index] - self.step_ratio

    @property
    def sigmas(self) -> torch.Tensor:
        """Each call's sigma = sqrt((1 - abar_t) / abar_t), then the last step's target (0 when abar = 1)."""
        alphas = [self.alpha(t) for t in self.timesteps] + [self.alpha(self.previous(len(self.timesteps) - 1))]
        return torch.tensor([((1 - a) / a) ** 0.5 for a in alphas], dtype=torch.float64)


class _VariancePreservingSampler(Sampler):
    """A diffusers scheduler that steps the variance-preserving sample x_vp = sqrt(abar) (x0 + sigma eps)
    by timestep, reproduced in its own arithmetic: ``x`` is the VP sample (the initial noise unscaled:
    init_noise_sigma 1), each evaluation is at x_vp sqrt(sigma^2 + 1), the VE point the denoiser takes,
    and its D gives back the model output the scheduler combines (eps, or v for v-prediction)."""

    def __init__(self, x: torch.Tensor, steps: ScheduledSteps):
        super().__init__(x, steps.sigmas)
        self.plan = steps
        self._evaluated: torch.Tensor | None = None

    def pending(self) -> Evaluation | None:
        if self.done:
            return None
        sigma = self.sigmas[self.step]
        self._evaluated = self.x * (sigma**2 + 1) ** 0.5
        return Evaluation(self._evaluated, sigma, float(self.plan.timesteps[self.step]))

    def keep_unmasked(self, mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor) -> None:
        """As :meth:`Sampler.keep_unmasked` on the variance-preserving sample: the scheduler's add_noise,
        sqrt(abar) known + sqrt(1 - abar) noise at the next call's timestep (diffusers' timesteps[i + 1],
        in float32 as its alphas_cumprod)."""
        if self.done:
            noised = known
        else:
            a = self.plan.alphas_cumprod[self.plan.timesteps[self.step]].to(known.device, known.dtype)
            noised = a**0.5 * known + (1 - a) ** 0.5 * noise
        self.x = (1 - mask) * noised + mask * self.x

    def _model_output(self, denoised: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet output diffusers' scheduler saw: eps = (x - D) / sigma (VE), or
        v = (abar x_ve - D) / sqrt(1 - abar) (Salimans & Ho 2022, x0 = sqrt(abar) x_vp - sqrt(1 - abar) v)."""
        a = self.plan.alpha(t)
        if self.plan.v_prediction:
            return (a * self._evaluated - denoised) / (1 - a) ** 0.5
        return (self._evaluated - denoised) / self.sigmas[self.step]

    def _transfer(self, sample: torch.Tensor, t: int, t_prev: int, model_output: torch.Tensor) -> torch.Tensor:
        """PNDM eq. 9 (= DDIM's step with eta 0) from abar_t to abar_prev, as PNDMScheduler._get_prev_sample."""
        a, a_prev = self.plan.alpha(t), self.plan.alpha(t_prev)
        if self.plan.v_prediction:
            model_output = a**0.5 * model_output + (1 - a) ** 0.5 * sample
        denominator = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * sample - (a_prev - a) * model_output / denominator


class DDIMSampler(_VariancePreservingSampler):
    """diffusers' DDIMScheduler with eta 0 (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev) eps, from t to t - T // steps (not to the next timestep where the spacing
    is not "leading"; diffusers' convention, kept)."""

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        t = self.plan.timesteps[self.step]
        model_output = self._model_output(denoised, t)
        a_prev = self.plan.alpha(t - self.plan.step_ratio)
        if self.plan.v_prediction:
            a = self.plan.alpha(t)
            eps = a**0.5 * model_output + (1 - a) ** 0.5 * self.x
        else:
            eps = model_output
        x0 = denoised if self.plan.correct_x0 is None else self.plan.correct_x0(denoised)
        self.x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        self.step += 1


class PNDMSampler(_VariancePreservingSampler):
    """diffusers' PNDMScheduler (Liu et al. 2022, Alg. 2), each step's output transferred by eq. 9.
    With skip_prk_steps (PLMS, as SD 1.x ships it) the first step is taken twice (the mean of the
    outputs at t and at its prediction, from the same sample: ``plan.timesteps`` repeats the second
    timestep), then Adams-Bashforth of order up to 4 over the model outputs. Without it (the class
    default) the first three steps are Runge-Kutta, four evaluations each at t, t - T/2N, t - T/2N,
    t - T/N (``plan.prk_evaluations`` of them), and the multistep part starts at order 4."""

    def __init__(self, x: torch.Tensor, steps: ScheduledSteps):
        super().__init__(x, steps)
        self._outputs: list[torch.Tensor] = []  # diffusers' `ets`
        self._first_sample: torch.Tensor | None = None  # its `cur_sample`
        self._runge_kutta_sum: torch.Tensor | float = 0.0  # its `cur_model_output`

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        counter = self.step
        output = self._model_output(denoised, self.plan.timesteps[counter])
        if counter < self.plan.prk_evaluations:
            self._runge_kutta(output)
        else:
            self._linear_multistep(output)
        self.step += 1

    def _runge_kutta(self, output: torch.Tensor) -> None:
        """PNDMScheduler.step_prk: RK4 from the sample at the start of each group of four."""
        counter = self.step
        t = self.plan.timesteps[counter // 4 * 4]
        t_prev = self.plan.timesteps[counter] - (0 if counter % 2 else self.plan.step_ratio // 2)
        phase = counter % 4
        if phase == 0:
            self._runge_kutta_sum = self._runge_kutta_sum + output / 6
            self._outputs.append(output)
            self._first_sample = self.x
        elif phase in (1, 2):
            self._runge_kutta_sum = self._runge_kutta_sum + output / 3
        else:
            output, self._runge_kutta_sum = self._runge_kutta_sum + output / 6, 0.0
        self.x = self._transfer(self._first_sample, t, t_prev, output)

    def _linear_multistep(self, output: torch.Tensor) -> None:
        """PNDMScheduler.step_plms."""
        counter, ratio = self.step, self.plan.step_ratio
        t = self.plan.timesteps[counter]
        t_prev, sample = t - ratio, self.x
        if counter != 1:
            self._outputs = self._outputs[-3:] + [output]
        else:  # the repeated timestep: redo the first step with the mean output
            t_prev, t = t, t + ratio
        history = self._outputs
        if len(history) == 1 and counter == 0:
            self._first_sample = sample
        elif len(history) == 1 and counter == 1:
            output = (output + history[-1]) / 2
            sample, self._first_sample = self._first_sample, None
        elif len(history) == 2:
            output = (3 * history[-1] - history[-2]) / 2
        elif len(history) == 3:
            output = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
        else:
            output = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        self.x = self._transfer(sample, t, t_prev, output)


class DDPMSampler(_VariancePreservingSampler):
    """diffusers' DDPMScheduler (Ho et al. 2020): the posterior mean of eq. 7 from the corrected x0
    (IF's dynamic thresholding, else clip_sample), then, where t > 0, fresh noise from the image's
    generator (diffusers' one generator, continued) scaled by the variance_type's standard deviation:
    beta~_t (eq. 7's, "fixed_small"), beta_t ("fixed_large"), or the UNet's own prediction,
    "learned_range" interpolating log beta~_t and log beta_t (Nichol & Dhariwal 2021, eq. 15), as IF.
    In float32, as the scheduler's alphas_cumprod."""

    def __init__(self, x: torch.Tensor, steps: ScheduledSteps, noise: Callable[[tuple[int, ...]], torch.Tensor] | None):
        super().__init__(x, steps)
        self._noise = noise  # None: a sampler only counted (total_evaluations), never advanced

    def advance(self, denoised: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        if self._noise is None:
            raise ValueError("ddpm needs a noise source to step")
        plan, sample = self.plan, self.x
        t, t_prev = plan.timesteps[self.step], plan.previous(self.step)
        output = self._model_output(denoised, t)
        a = plan.alphas_cumprod[t]
        a_prev = plan.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        alpha_t, beta_t = a / a_prev, 1 - a / a_prev
        if plan.v_prediction:
            x0 = a**0.5 * sample - (1 - a) ** 0.5 * output
        else:
            x0 = (sample - (1 - a) ** 0.5 * output) / a**0.5
        if plan.correct_x0 is not None:
            x0 = plan.correct_x0(x0)
        mean = (a_prev**0.5 * beta_t / (1 - a)) * x0 + (alpha_t**0.5 * (1 - a_prev) / (1 - a)) * sample
        if t > 0:
            noise = self._noise(tuple(sample.shape[1:])).to(sample)
            mean = mean + self._standard_deviation(beta_t, (1 - a_prev) / (1 - a) * beta_t, variance) * noise
        self.x = mean
        self.step += 1

    def _standard_deviation(self, beta: torch.Tensor, posterior: torch.Tensor, predicted: torch.Tensor | None):
        kind = self.plan.variance_type
        posterior = posterior.clamp(min=1e-20)  # diffusers' clamp: it takes the log
        if kind in ("learned", "learned_range") and predicted is None:
            raise ValueError(f"ddpm with variance_type {kind!r} needs the UNet's predicted variance")
        if kind == "learned_range":
            frac = (predicted + 1) / 2
            return torch.exp(0.5 * (frac * beta.log() + (1 - frac) * posterior.log()))
        if kind == "learned":
            return predicted**0.5
        if kind == "fixed_large":
            return beta**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * posterior.log())
        return posterior**0.5  # fixed_small


_SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "heun": HeunSampler,
    "dpmpp_2m": DPMPP2MSampler,
    "unipc": UniPCSampler,
}
_SCHEDULED_SAMPLER_CLASSES: dict[str, type[_VariancePreservingSampler]] = {"ddim": DDIMSampler, "pndm": PNDMSampler}


def make_sampler(
    name: str,
    x: torch.Tensor,
    sigmas: torch.Tensor | None,
    restart_below: Sequence[float] = (),
    *,
    noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    steps: ScheduledSteps | None = None,
) -> Sampler:
    """``sigmas`` for the sigma samplers (euler_a also takes ``noise``); ``steps`` for ddim, pndm and
    ddpm (which also takes ``noise``)."""
    if name in _SCHEDULED_SAMPLER_CLASSES:
        if steps is None:
            raise ValueError(f"sampler {name!r} steps a diffusers scheduler's timesteps: it needs them (steps=)")
        return _SCHEDULED_SAMPLER_CLASSES[name](x, steps)
    if name == "ddpm":
        if steps is None:
            raise ValueError("sampler 'ddpm' steps a diffusers scheduler's timesteps: it needs them (steps=)")
        return DDPMSampler(x, steps, noise)
    if name == "euler_a":
        return EulerAncestralSampler(x, sigmas, restart_below, noise=noise)
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
    noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Solve the ODE (or, with euler_a and ``noise``, the SDE) from x (already scaled by sigmas[0])
    along `sigmas`."""
    state = make_sampler(sampler, x, sigmas, noise=noise)
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

