"""Samplers against a closed-form denoiser: Gaussian data N(mu, s^2), for
which D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) exactly and the ODE
solution from sigma_max to 0 is x(0) = mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu)."""

import math

import pytest
import torch

from ediffi.samplers import (
    classifier_free_guidance,
    karras_sigmas,
    make_sampler,
    sample,
)

MU, S = 0.7, 0.3
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_solution(x_t):
    return MU + S / math.sqrt(S**2 + SIGMA_MAX**2) * (x_t - MU)


def _start(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(S**2 + SIGMA_MAX**2) * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)


def test_karras_schedule_endpoints_and_monotone():
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX) and sigmas[-2].item() == pytest.approx(SIGMA_MIN)
    assert torch.all(sigmas[:-1] > sigmas[1:])


# Euler is first order: it needs more steps for the same accuracy.
@pytest.mark.parametrize("sampler, steps", [("euler", 128), ("heun", 32), ("dpmpp_2m", 32)])
def test_samples_reach_the_data_distribution(sampler, steps):
    x_t = _start()
    out = sample(gaussian_denoiser, x_t, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), sampler)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.05)


def _error(sampler, steps):
    x_t = _start(256)
    out = sample(gaussian_denoiser, x_t, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), sampler)
    return (out - exact_solution(x_t)).abs().max().item()


# From 16 steps on. At 8 Karras steps the first Heun step (sigma 80 -> ~30)
# overshoots on this problem and Euler happens to be closer.
@pytest.mark.parametrize("steps", [16, 32, 64])
def test_heun_error_is_below_euler_at_equal_steps(steps):
    assert _error("heun", steps) < _error("euler", steps)


def test_errors_shrink_with_steps():
    for sampler in ("euler", "heun", "dpmpp_2m"):
        assert _error(sampler, 32) < _error(sampler, 8)


def test_heun_asks_twice_per_step_except_the_last():
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    state = make_sampler("heun", torch.zeros(1, 1, 1, 1), sigmas)
    asked = []
    while (ev := state.pending()) is not None:
        asked.append(ev.sigma)
        state.advance(gaussian_denoiser(ev.x, ev.sigma))
    assert len(asked) == state.total_evaluations == 2 * 5 - 1
    # The correction is evaluated at sigma_{i+1}: it may land in another expert.
    assert asked[1] == pytest.approx(sigmas[1].item())


def test_step_functions_take_per_row_sigmas():
    from ediffi.samplers import euler_step

    x = torch.ones(2, 1, 2, 2)
    d = torch.zeros(2, 1, 2, 2)
    out = euler_step(x, d, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(out[0], torch.full((1, 2, 2), 0.5))
    assert torch.allclose(out[1], torch.full((1, 2, 2), 0.25))


def test_cfg_per_row_scale_and_scale_at_most_one_is_conditional():
    """Scale <= 1 is guidance off, as diffusers' pipelines (guidance_scale > 1 only):
    the conditional prediction exactly, never an extrapolation towards uncond."""
    cond, uncond = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    out = classifier_free_guidance(cond, uncond, torch.tensor([1.0, 0.0, 2.0, 0.5]))
    assert torch.equal(out[0], cond[0])
    assert torch.equal(out[1], cond[1])
    assert torch.allclose(out[2], uncond[2] + 2 * (cond[2] - uncond[2]))
    assert torch.equal(out[3], cond[3])


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("lms", torch.zeros(1), karras_sigmas(2, SIGMA_MIN, SIGMA_MAX))
    with pytest.raises(ValueError, match="needs them"):  # ddim steps a diffusers scheduler's timesteps
        make_sampler("ddim", torch.zeros(1), karras_sigmas(2, SIGMA_MIN, SIGMA_MAX))


def _run(state, denoiser=gaussian_denoiser):
    while (evaluation := state.pending()) is not None:
        state.advance(denoiser(evaluation.x, evaluation.sigma))
    return state.x


def test_dpmpp_2m_restarting_below_a_sigma_equals_a_fresh_solver_started_there():
    """Two solvers in sequence (diffusers' SDXL base, then the refiner pipeline's fresh scheduler
    from the first sigma below the boundary) equal one that restarts its history there."""
    sigmas = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    boundary = float(sigmas[5] + sigmas[6]) / 2  # steps 0..5 above it, 6.. below
    x_t = _start(64)
    restarted = _run(make_sampler("dpmpp_2m", x_t.clone(), sigmas, restart_below=[boundary]))
    first = make_sampler("dpmpp_2m", x_t.clone(), sigmas[:7])
    second = make_sampler("dpmpp_2m", _run(first), sigmas[6:])
    assert torch.equal(restarted, _run(second))
    kept = _run(make_sampler("dpmpp_2m", x_t.clone(), sigmas))
    assert not torch.equal(restarted, kept)  # the restart changes the trajectory
    # Single-step samplers have no history: the same image with or without the restart.
    for name in ("euler", "heun"):
        assert torch.equal(
            _run(make_sampler(name, x_t.clone(), sigmas, restart_below=[boundary])),
            _run(make_sampler(name, x_t.clone(), sigmas)),
        )
