"""Half precision on CPU: the noise embedding stays float32 under
`.to(dtype)`, and the whole denoiser in bfloat16 (and float16, where this
torch has the CPU kernels) stays close to float32 on varied per-row inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from ediffi.unet import FourierEmbedding
from export.onnx_export import random_denoiser_inputs

HALF = (torch.bfloat16, torch.float16)


def _labels() -> torch.Tensor:
    """EDM noise labels c_noise = ln(sigma)/4 over sigma in [0.002, 80]."""
    sigma = torch.logspace(-2.7, 1.9, 64)
    return sigma.log() / 4


@pytest.mark.parametrize("dtype", HALF)
def test_fourier_embedding_keeps_float32_frequencies_under_to_dtype(dtype):
    torch.manual_seed(0)
    reference = FourierEmbedding(128, scale=16.0)
    half = copy.deepcopy(reference).to(dtype)
    assert half.freqs.dtype == torch.float32 and torch.equal(half.freqs, reference.freqs)
    assert copy.deepcopy(reference).half().freqs.dtype == torch.float32
    labels = _labels()
    with torch.no_grad():
        expected, got = reference(labels), half(labels.to(dtype))
    assert got.dtype == torch.float32
    # The label itself arrives rounded to `dtype` here (the denoiser passes it
    # in float32, see the next test); at float32 labels the features match.
    assert (half(labels) - expected).abs().max() <= 1e-3
    state = half.state_dict()
    assert state["freqs"].dtype == torch.float32  # what a half-precision checkpoint saves


def test_denoiser_hands_the_noise_embedding_float32_labels(tiny_model):
    stage = tiny_model.config.stage("sr")
    expert = stage.experts[0]
    net = copy.deepcopy(tiny_model.stages["sr"].experts[expert.name]).to(torch.bfloat16)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
             for m in (net.net.noise_embed, net.net.aug_embed)]
    inputs = random_denoiser_inputs(tiny_model.config, stage, expert, 3, seed=1)
    with torch.no_grad():
        net(**_cast(inputs, torch.bfloat16).as_kwargs())
    for h in hooks:
        h.remove()
    assert seen == [(torch.float32, torch.float32)] * 2


def _cast(inputs, dtype):
    """The inputs as a half-precision backend sends them: noise levels stay float32."""
    keep = {"sigma", "low_res_sigma", "context_mask"}
    return type(inputs)(**{
        name: v if (v := getattr(inputs, name)) is None or name in keep else v.to(dtype)
        for name in inputs.__dataclass_fields__
    })


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


# Measured on torch 2.13 CPU (max |error| / max |reference| over every expert
# of the tiny model, 5 rows of varied sigma, masks and paint strengths):
# bfloat16 0.0150, float16 0.0017. Tolerances: 2x that, rounded up.
HALF_MAX_REL = {torch.bfloat16: 0.03, torch.float16: 0.004}


@pytest.mark.parametrize("dtype", HALF)
def test_whole_denoiser_in_half_precision_stays_close_to_float32(tiny_model, dtype):
    worst = 0.0
    for stage in tiny_model.config.stages:
        for expert in stage.experts:
            reference = tiny_model.stages[stage.name].experts[expert.name]
            half = copy.deepcopy(reference).to(dtype)
            inputs = random_denoiser_inputs(tiny_model.config, stage, expert, 5, seed=3)
            with torch.no_grad():
                ref = reference(**inputs.as_kwargs())
                try:
                    got = half(**_cast(inputs, dtype).as_kwargs())
                except (RuntimeError, NotImplementedError) as exc:  # a CPU kernel this torch lacks
                    pytest.skip(f"torch {torch.__version__} has no CPU {dtype} kernel here: {exc}")
            assert got.dtype == dtype and torch.isfinite(got.float()).all()
            worst = max(worst, _relative_error(got, ref))
    print(f"{dtype}: max relative error {worst:.5f}")
    assert worst <= HALF_MAX_REL[dtype]
