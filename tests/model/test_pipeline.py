"""The reference pipeline and its per-request state machine `RequestRun`,
with the tiny random cascade (base 16 px with experts split at sigma 1,
SR 32 px): determinism and per-image seeds, classifier-free guidance,
style, encoder subsets, every sampler through the cascade, evaluation
counts, routing of Heun corrections by sigma, and per-row routing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.encoders import ENCODER_NAMES
from ediffi.failure import InputError
from ediffi.pipeline import (
    GenerationRequest,
    RequestRun,
    encode_request,
    evaluate,
    generate,
)
from ediffi.samplers import classifier_free_guidance, karras_sigmas, make_sampler
from ediffi.spec import ANY_MODEL_SAMPLERS

PROMPT = "a red circle on the left and a blue square"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _generate(model, prompt: str = PROMPT, **kwargs) -> list[np.ndarray]:
    kwargs.setdefault("steps", 2)
    kwargs.setdefault("sampler", "euler")
    return [_array(im) for im in generate(model, GenerationRequest(prompt, **kwargs))]


@torch.no_grad()
def drive(model, request, cond=None):
    """Run a request's state machine alone, recording every evaluation;
    every denoiser output must be finite."""
    run = RequestRun(model, request, cond if cond is not None else encode_request(model, request))
    log = []
    while (pending := run.pending()) is not None:
        out = evaluate(model, pending)
        assert out.shape == pending.inputs.x.shape
        assert torch.isfinite(out).all(), f"non-finite denoiser output at {pending.stage}/{pending.expert}"
        log.append(pending)
        run.advance(out)
    return run, log


def _sigma(pending) -> float:
    sigmas = pending.inputs.sigma
    assert torch.all(sigmas == sigmas[0])
    return float(sigmas[0])


# --------------------------------------------------------------------------
# Determinism and seeds
# --------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_image(tiny_model):
    request = dict(steps=3, sampler="heun", seed=11)
    first = generate(tiny_model, GenerationRequest(PROMPT, **request))[0]
    second = generate(tiny_model, GenerationRequest(PROMPT, **request))[0]
    other = generate(tiny_model, GenerationRequest(PROMPT, **{**request, "seed": 12}))[0]
    assert first.tobytes() == second.tobytes()
    assert np.abs(_array(first) - _array(other)).max() > 8


def test_n_images_use_seeds_seed_plus_k(tiny_model):
    request = GenerationRequest(PROMPT, n=2, seed=7, steps=3, sampler="heun")
    assert request.image_seeds == [7, 8]
    batch = [_array(im) for im in generate(tiny_model, request)]
    assert len(batch) == 2
    for k, image in enumerate(batch):
        (single,) = _generate(tiny_model, n=1, seed=7 + k, steps=3, sampler="heun")
        assert np.abs(image - single).max() <= 2, f"image {k} != the n=1 image with seed {7 + k}"
    assert np.abs(batch[0] - batch[1]).max() > 8


# --------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------


def test_guidance_one_uses_no_unconditional_rows(tiny_model):
    unguided = GenerationRequest(PROMPT, n=2, guidance_scale=1.0, steps=2)
    cond = encode_request(tiny_model, unguided)
    assert cond.guided is False
    assert cond.context.shape[0] == cond.pooled.shape[0] == cond.pww_strength.shape[0] == 2
    run = RequestRun(tiny_model, unguided, cond)
    assert len(run.pending().inputs) == 2

    guided = GenerationRequest(PROMPT, n=2, guidance_scale=3.0, steps=2)
    cond = encode_request(tiny_model, guided)
    assert cond.guided is True
    assert len(RequestRun(tiny_model, guided, cond).pending().inputs) == 4
    # Without a negative prompt the unconditional rows are all-null.
    assert not cond.context_mask[2:].any() and torch.all(cond.pooled[2:] == 0)


def test_guidance_scale_one_returns_the_conditional_prediction_exactly():
    cond = torch.randn(2, 3, 4, 4)
    uncond = torch.full_like(cond, float("inf"))  # would poison any arithmetic
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, torch.ones(2)), cond)
    uncond = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_guided_rows_at_scale_one_give_the_unguided_image(tiny_model):
    """Unconditional rows evaluated alongside but weighted out (per-row scale
    1) must not leak into the image."""
    request = GenerationRequest(PROMPT, steps=3, seed=4, sampler="heun", guidance_scale=3.0)
    cond = encode_request(tiny_model, request)
    cond.guidance_scale = torch.ones_like(cond.guidance_scale)
    run, log = drive(tiny_model, request, cond)
    assert all(len(p.inputs) == 2 for p in log)
    (unguided,) = _generate(tiny_model, steps=3, seed=4, sampler="heun", guidance_scale=1.0)
    assert np.abs(_array(run.images()[0]) - unguided).max() <= 2
    (guided,) = _generate(tiny_model, steps=3, seed=4, sampler="heun", guidance_scale=3.0)
    assert np.abs(guided - unguided).max() > 8


# --------------------------------------------------------------------------
# Style (CLIP image embedding) and encoder subsets
# --------------------------------------------------------------------------


def _style(color):
    image = Image.new("RGB", (24, 20), color)
    image.paste((255, 255, 255), (4, 4, 12, 12))
    return image


@pytest.mark.parametrize("size", [(2048, 1), (1, 90), (90, 10)])
def test_a_style_image_of_extreme_shape_is_refused_before_the_image_processor(tiny_model, size):
    """CLIP's processor scales the shorter side up to its input size: a 2048x1 strip would become a
    65536x32 image (a 1048576x1 one, gigabytes) on the device thread; the CLI and the worker refuse it."""
    with pytest.raises(InputError, match="style_image") as error:
        encode_request(tiny_model, GenerationRequest(PROMPT, style_image=Image.new("RGB", size)))
    assert error.value.field == "style_image"
    encode_request(tiny_model, GenerationRequest(PROMPT, style_image=Image.new("RGB", (80, 10))))  # 8:1 is fine


def test_style_image_changes_the_output(tiny_model):
    red_style, blue_style = _style((220, 20, 20)), _style((20, 20, 220))
    pt = tiny_model.encoders.pooled_text_dim
    red_pooled = encode_request(tiny_model, GenerationRequest(PROMPT, style_image=red_style)).pooled
    blue_pooled = encode_request(tiny_model, GenerationRequest(PROMPT, style_image=blue_style)).pooled
    assert not torch.allclose(red_pooled[0, pt:], blue_pooled[0, pt:])
    assert torch.all(red_pooled[1] == 0), "the unconditional row gets no style"

    run = dict(seed=2, steps=3, sampler="heun")
    (none,) = _generate(tiny_model, **run)
    (red,) = _generate(tiny_model, style_image=red_style, **run)
    (blue,) = _generate(tiny_model, style_image=blue_style, **run)
    assert np.abs(red - none).max() > 8
    assert np.abs(red - blue).max() > 8
    # A style image is ignored when the image embedding is not among the encoders.
    text_only = frozenset({"t5", "clip_text"})
    (ignored,) = _generate(tiny_model, style_image=red_style, encoders=text_only, **run)
    (plain,) = _generate(tiny_model, encoders=text_only, **run)
    assert np.array_equal(ignored, plain)


SUBSETS = [frozenset(c) for r in range(len(ENCODER_NAMES) + 1) for c in itertools.combinations(ENCODER_NAMES, r)]


@pytest.mark.parametrize("encoders", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_any_encoder_subset_works(tiny_model, encoders):
    enc = tiny_model.encoders
    request = GenerationRequest(PROMPT, steps=2, sampler="euler", style_image=_style((0, 200, 0)), encoders=encoders)
    cond = encode_request(tiny_model, request)
    lt5, pt = enc.t5_length, enc.pooled_text_dim
    cond_row = slice(0, 1)  # row 1 is the (all-null) unconditional row
    parts = {
        "t5": (cond.context[cond_row, :lt5], cond.context_mask[cond_row, :lt5]),
        "clip_text": (cond.context[cond_row, lt5:], cond.context_mask[cond_row, lt5:]),
    }
    for name, (context, mask) in parts.items():
        if name in encoders:
            assert mask.any() and context.abs().sum() > 0
        else:
            assert not mask.any() and torch.all(context == 0)
    assert (cond.pooled[cond_row, :pt].abs().sum() > 0) == ("clip_text" in encoders)
    assert (cond.pooled[cond_row, pt:].abs().sum() > 0) == ("clip_image" in encoders)

    run, _ = drive(tiny_model, request, cond)  # asserts every evaluation is finite
    (image,) = run.images()
    assert image.size == (tiny_model.config.image_size,) * 2


def test_unknown_encoder_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="encoders"):
        encode_request(tiny_model, GenerationRequest(PROMPT, encoders=frozenset({"t5", "bert"})))


# --------------------------------------------------------------------------
# Samplers through the cascade; evaluation counts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ANY_MODEL_SAMPLERS)
def test_every_sampler_runs_the_whole_cascade(tiny_model, sampler):
    steps = 3
    request = GenerationRequest(PROMPT, steps=steps, sampler=sampler, n=2)
    run, log = drive(tiny_model, request)
    stages = tiny_model.config.stages
    assert len(stages) >= 2, "the tiny model is a cascade"

    expected = [
        make_sampler(sampler, torch.zeros(1), karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)).total_evaluations
        for s in stages
    ]
    # Stage order: all base evaluations, then each SR stage in turn.
    assert [p.stage for p in log] == [s.name for s, k in zip(stages, expected) for _ in range(k)]
    assert len(log) == run.evaluations_total == run.evaluations_done == sum(expected)
    for pending in log:
        stage = tiny_model.config.stage(pending.stage)
        rows = pending.inputs
        assert rows.x.shape == (4, stage.channels, stage.image_size, stage.image_size)
        assert pending.expert == tiny_model.stages[stage.name].route(_sigma(pending))
        if stage.is_super_resolution:
            assert rows.low_res.shape == rows.x.shape
            assert torch.all(rows.low_res_sigma == stage.low_res_aug_sigma)
        else:
            assert rows.low_res is None
    images = run.images()
    assert len(images) == 2
    assert all(im.size == (stages[-1].image_size,) * 2 and im.mode == "RGB" for im in images)


@pytest.mark.parametrize("sampler", ANY_MODEL_SAMPLERS)
def test_progress_reports_the_evaluations_performed(tiny_model, sampler):
    calls = []
    request = GenerationRequest(PROMPT, steps=2, sampler=sampler, guidance_scale=1.0)
    evaluations_total = RequestRun(tiny_model, request, encode_request(tiny_model, request)).evaluations_total
    generate(tiny_model, request, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, evaluations_total) for k in range(1, evaluations_total + 1)]


def test_images_before_the_end_is_an_error(tiny_model):
    request = GenerationRequest(PROMPT, steps=2)
    run = RequestRun(tiny_model, request, encode_request(tiny_model, request))
    with pytest.raises(RuntimeError):
        run.images()


# --------------------------------------------------------------------------
# Routing by sigma
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_fixture, stage_name",
    [("tiny_model", "base"), ("shipped_shape_model", "base"), ("shipped_shape_model", "sr")],
)
def test_heun_correction_across_a_boundary_goes_to_the_other_expert(request, model_fixture, stage_name):
    """At every expert boundary of the stage (the shipped-shape model has two
    in the base stage and one in SR), a Heun step that crosses it evaluates
    its predictor on the expert above and its corrector on the one below."""
    model = request.getfixturevalue(model_fixture)
    stage = model.config.stage(stage_name)
    ensemble = model.stages[stage_name]
    boundaries = sorted(e.sigma_lo for e in stage.experts if e.sigma_lo > 0)
    assert boundaries, f"stage {stage_name} has one expert"
    for boundary in boundaries:
        owner_above = ensemble.route(boundary)
        owner_below = ensemble.route(boundary * 0.999)
        assert owner_above != owner_below
        above_hi = next(e.sigma_hi for e in stage.experts if e.name == owner_above) or float("inf")
        below_lo = next(e.sigma_lo for e in stage.experts if e.name == owner_below)

        # The fewest steps from 3 on with a Heun step (not the last, which
        # has no corrector) from the expert above this boundary to the one below.
        for steps in range(3, 16):
            sigmas = karras_sigmas(steps, stage.sigma_min, stage.sigma_max, stage.rho).tolist()
            crossing = [i for i in range(steps - 1) if above_hi > sigmas[i] >= boundary > sigmas[i + 1] >= below_lo and sigmas[i + 1] > 0]
            if crossing:
                break
        assert crossing, f"no Heun step crosses sigma {boundary} in {sigmas}"
        i = crossing[0]

        _, log = drive(model, GenerationRequest(PROMPT, steps=steps, sampler="heun"))
        evaluations = [p for p in log if p.stage == stage_name]
        # Heun asks twice per step but the last: step i's predictor is evaluation
        # 2i (at sigma_i), its corrector 2i + 1 (at sigma_{i+1}).
        predictor, corrector = evaluations[2 * i], evaluations[2 * i + 1]
        assert _sigma(predictor) == pytest.approx(sigmas[i])
        assert _sigma(corrector) == pytest.approx(sigmas[i + 1])
        assert predictor.expert == owner_above
        assert corrector.expert == owner_below
        assert {p.expert for p in evaluations} == {ensemble.route(s) for s in sigmas[:-1]}


@torch.no_grad()
def test_ensemble_forward_routes_each_row_by_its_own_sigma(tiny_model):
    ensemble = tiny_model.stages["base"]
    request = GenerationRequest("a red circle", n=4, guidance_scale=1.0)
    cond = encode_request(tiny_model, request)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    sigma = torch.tensor([5.0, 0.3, 1.0, 0.01])  # 1.0 is the boundary: the higher-noise expert owns it
    kwargs = dict(
        context=cond.context, context_mask=cond.context_mask, pooled=cond.pooled,
        pww_mask=cond.pww_masks["base"], pww_strength=cond.pww_strength,
    )
    names = [ensemble.route(float(s)) for s in sigma]
    assert len(set(names)) == 2 and names[0] == names[2] != names[1] == names[3]

    mixed = ensemble(x, sigma, **kwargs)
    for i, name in enumerate(names):
        alone = ensemble.experts[name](x[i : i + 1], sigma[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()})
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)
    # The test can fail: the other expert gives a different answer.
    other = next(n for n in ensemble.experts if n != names[1])
    wrong = ensemble.experts[other](x[1:2], sigma[1:2], **{k: v[1:2] for k, v in kwargs.items()})
    assert (wrong - mixed[1:2]).abs().max() > 1e-3
