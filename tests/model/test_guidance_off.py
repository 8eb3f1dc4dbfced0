"""guidance_scale <= 1 is "guidance off", as in diffusers' pipelines
(`do_classifier_free_guidance = guidance_scale > 1`): the conditional
prediction alone, no unconditional rows, for every model. Checked against
diffusers itself on the tiny random SD, SDXL (base + refiner) and IF
checkpoints (tests/support/), and on the shipped model's family.

Before the fix, 0 gave `uncond + 0 (cond - uncond)`: an unconditional image
that ignored the prompt (and 0.5 a blend), with 2n rows per evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ediffi.pipeline import GenerationRequest, RequestRun, encode_request, evaluate, generate
from engines import Engine, EngineConfig, TorchBackend
from engines.request import text_keys
from tests.support.diffusers import karras_euler, psnr, sdxl_reference

PARITY_DB = 35.0  # as the Euler parity tests (tests/model/test_diffusers_import.py)
PROMPT = "a red cat on the house"
OFF = [0.0, 0.5]  # both "off": 0 (SDXL-Turbo-style clients) and a scale between 0 and 1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _ours(model, guidance: float, **extra):
    (image,) = generate(model, GenerationRequest(PROMPT, steps=8, guidance_scale=guidance, seed=7, sampler="euler", **extra))
    return image


def _rows_per_evaluation(model, request: GenerationRequest) -> set[int]:
    """Rows of every evaluation of a request run alone (decoder steps included)."""
    run = RequestRun(model, request, encode_request(model, request))
    rows = set()
    while (pending := run.pending()) is not None:
        rows.add(len(pending.inputs))
        run.advance(evaluate(model, pending))
    return rows


@pytest.fixture(scope="module")
def imported_sd(imported_sd_dir):
    from ediffi.model import load_model

    return load_model(imported_sd_dir)


@pytest.mark.parametrize("guidance", OFF)
def test_sd_guidance_off_equals_stable_diffusion_pipeline(tiny_diffusers_dir, imported_sd, guidance):
    """StableDiffusionPipeline at the same setting (its negative prompt unused
    without guidance, so ours is ignored too), and our own guidance=1 image."""
    from diffusers import StableDiffusionPipeline

    ours = _ours(imported_sd, guidance, negative_prompt="blue sky")
    pipe = karras_euler(StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / "sd", use_safetensors=True))
    ref = pipe(PROMPT, negative_prompt="blue sky", num_inference_steps=8, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(7)).images[0]
    print(f"SD guidance {guidance}: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB
    assert np.array_equal(_pixels(ours), _pixels(_ours(imported_sd, 1.0)))
    # The bar can fail: the guided image (same seed) is far from it.
    assert psnr(_ours(imported_sd, 5.0), ref) < PARITY_DB - 5


@pytest.mark.parametrize("guidance", OFF)
def test_sdxl_guidance_off_equals_diffusers(tiny_diffusers_dir, imported_sdxl, guidance):
    """StableDiffusionXLPipeline + StableDiffusionXLImg2ImgPipeline (refiner) at
    the same setting, non-square, and our own guidance=1 image."""
    ours = _ours(imported_sdxl, guidance, width=48, height=32)
    ref = sdxl_reference(tiny_diffusers_dir, PROMPT, seed=7, steps=8, guidance=guidance, width=48, height=32)
    print(f"SDXL guidance {guidance}: PSNR {psnr(ours, ref):.2f} dB")
    assert psnr(ours, ref) >= PARITY_DB
    assert np.array_equal(_pixels(ours), _pixels(_ours(imported_sdxl, 1.0, width=48, height=32)))


def test_if_guidance_off_equals_diffusers_at_both_stages(tiny_if, tmp_path_factory):
    """IFPipeline then IFSuperResolutionPipeline at guidance 0 (both skip
    guidance at <= 1): stage I's and stage II's images."""
    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model
    from tests.support.deepfloyd_if import diffusers_if_images

    root = tmp_path_factory.mktemp("if-guidance-off")
    import_diffusers(tiny_if.stage_1, root / "stage-1")
    import_diffusers(tiny_if.stage_1, root / "cascade", sr_dir=tiny_if.stage_2)
    low_ref, high_ref = diffusers_if_images(tiny_if, PROMPT, seed=3, steps=6, guidance=0.0)
    request = dict(prompt=PROMPT, steps=6, seed=3, sampler="dpmpp_2m")
    (low,) = generate(load_model(root / "stage-1"), GenerationRequest(**request, guidance_scale=0.0))
    cascade = load_model(root / "cascade")
    (high,) = generate(cascade, GenerationRequest(**request, guidance_scale=0.0))
    print(f"IF guidance 0: stage I {psnr(low, low_ref):.2f} dB, stage II {psnr(high, high_ref):.2f} dB")
    assert psnr(low, low_ref) >= PARITY_DB and psnr(high, high_ref) >= PARITY_DB
    assert _rows_per_evaluation(cascade, GenerationRequest(**{**request, "steps": 2}, n=2, guidance_scale=0.5)) == {2}


@pytest.mark.parametrize("guidance", [*OFF, 1.0])
def test_guidance_off_plans_one_row_per_image(imported_sdxl, guidance):
    """Every evaluation (base, refiner, decoder) has n rows, the engine plans
    n (admission, load) and runs n per evaluation, and the negative prompt is
    not encoded."""
    request = GenerationRequest(PROMPT, steps=3, n=2, guidance_scale=guidance, negative_prompt="blue sky",
                                width=32, height=32)
    assert encode_request(imported_sdxl, request).context.shape[0] == 2
    assert _rows_per_evaluation(imported_sdxl, request) == {2}
    assert text_keys(request) == [(PROMPT, True, True)]

    engine = Engine(TorchBackend(imported_sdxl, max_batch=8), EngineConfig())
    handle = engine.submit(request)
    assert engine.load() == 2  # the rows it plans for the request
    engine.run_until_idle()
    outcome = handle.result(0)
    assert outcome.ok
    assert engine.scheduler.stats.rows == 2 * outcome.evaluations_total


def test_guidance_above_one_still_doubles_the_rows(imported_sdxl):
    request = GenerationRequest(PROMPT, steps=3, n=2, guidance_scale=1.5, width=32, height=32)
    assert _rows_per_evaluation(imported_sdxl, request) == {4, 2}  # denoiser calls 2n, the decoder n


@pytest.mark.parametrize("guidance", OFF)
def test_shipped_family_guidance_off_is_the_conditional_image(shipped_shape_model, guidance):
    """The project's own models (the shipped model's shape of options): the same
    image as guidance 1, n rows per evaluation."""
    request = dict(prompt="a red circle on the left", steps=3, seed=4, sampler="heun", n=2)
    off = generate(shipped_shape_model, GenerationRequest(**request, guidance_scale=guidance))
    unguided = generate(shipped_shape_model, GenerationRequest(**request, guidance_scale=1.0))
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(off, unguided))
    assert _rows_per_evaluation(shipped_shape_model, GenerationRequest(**request, guidance_scale=guidance)) == {2}
