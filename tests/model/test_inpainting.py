"""Inpainting (an init image and a mask) on imported latent checkpoints against diffusers'
StableDiffusionInpaintPipeline on the tiny random SD (tests/support/diffusers.py), whose UNet takes
no mask (4 channels): after every scheduler step the latents outside the mask are the init image's,
noised to the next step's level. Each sampler's scheduler, strength 1 (the pipeline's default: pure
noise) and below, and the rules around it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.failure import InputError
from tests.support.diffusers import psnr

diffusers = pytest.importorskip("diffusers")

PARITY_DB = 60.0
CLIPPED_PARITY_DB = 45.0  # DDIM's default clip_sample: a kink a last-bit difference crosses (tests/model/test_img2img.py)
PROMPT = "a red cat on the house"
WIDTH, HEIGHT = 40, 24


@pytest.fixture(scope="module")
def sd(imported_sd_dir, tiny_diffusers_dir):
    from diffusers import StableDiffusionInpaintPipeline

    from ediffi.model import load_model

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_diffusers_dir / "sd", use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return load_model(imported_sd_dir), pipe


def _init_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))


def _mask(mode: str = "L") -> Image.Image:
    """White (repaint) over a rectangle off the latent grid's 8-pixel cells, black (keep) elsewhere."""
    array = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    array[5:19, 13:31] = 255
    return Image.fromarray(array).convert(mode)


def _ours(model, sampler: str, karras: bool, steps: int, strength: float | None, n: int = 1, **fields):
    from ediffi.pipeline import GenerationRequest, generate

    return generate(model, GenerationRequest(
        PROMPT, steps=steps, guidance_scale=5.0, seed=7, n=n, sampler=sampler, use_karras_sigmas=karras,
        init_image=_init_image(), mask=fields.pop("mask", _mask()), strength=strength, **fields,
    ))


def _reference(pipe, steps: int, strength: float | None, n: int = 1, mask=None):
    """diffusers, one call per image with its own generator seeded 7 + k (this server's image k: seed + k)."""
    images = []
    for k in range(n):
        kwargs = {} if strength is None else {"strength": strength}
        images += pipe(PROMPT, image=_init_image(), mask_image=mask or _mask(), num_inference_steps=steps,
                       guidance_scale=5.0, height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(7 + k),
                       **kwargs).images
    return images


@pytest.mark.parametrize(
    ("sampler", "karras", "scheduler", "config"),
    [
        ("euler", False, "EulerDiscreteScheduler", {}),
        ("euler", True, "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("euler_a", False, "EulerAncestralDiscreteScheduler", {}),
        ("heun", True, "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
        ("dpmpp_2m", False, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("ddim", False, "DDIMScheduler", {}),
        ("pndm", False, "PNDMScheduler", {}),  # the folder's own (SD 1.x's PLMS)
        ("ddpm", False, "DDPMScheduler", {}),  # its noise each step from the image's generator; clip_sample: 77.95 dB at worst
    ],
)
def test_inpainting_matches_stable_diffusion_inpaint_pipeline(sd, sampler, karras, scheduler, config):
    """Same prompt, init image, mask, steps and seeds: the pipeline's default strength (1: from pure
    noise) for two images (generators 7 and 8), then strength 0.6 and 0.3."""
    model, pipe = sd
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    bar = CLIPPED_PARITY_DB if sampler == "ddim" else PARITY_DB
    first = None
    for steps, strength, n in ((8, None, 2), (10, 0.6, 1), (6, 0.3, 1)):
        ours, reference = _ours(model, sampler, karras, steps, strength, n), _reference(pipe, steps, strength, n)
        first = first or reference
        assert [image.size for image in ours] == [image.size for image in reference] == [(WIDTH, HEIGHT)] * n
        figures = [psnr(a, b) for a, b in zip(ours, reference)]
        print(f"inpaint {sampler} (karras {karras}) {steps} steps, strength {strength}, n {n}: PSNR "
              + ", ".join(f"{figure:.2f}" for figure in figures) + " dB")
        assert min(figures) >= bar, (steps, strength)
    # The bar can fail: another mask makes another picture.
    other = _ours(model, sampler, karras, 8, None, mask=_mask().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert psnr(other[0], first[0]) < bar - 20


def test_the_mask_is_read_as_diffusers_reads_it(sd):
    """An RGB(A) mask is its grey level; a mask resized with its init image (width/height given) is
    resized in its own mode before it is made grey and binarised, as diffusers' mask processor."""
    model, pipe = sd
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    grey = _ours(model, "euler", False, 5, 0.6)
    rgb = _ours(model, "euler", False, 5, 0.6, mask=_mask("RGB"))
    assert psnr(grey[0], rgb[0]) == float("inf")
    (ours,) = _ours(model, "euler", False, 5, 0.6, width=32, height=48)
    (reference,) = pipe(PROMPT, image=_init_image(), mask_image=_mask(), num_inference_steps=5, strength=0.6,
                        guidance_scale=5.0, height=48, width=32, generator=torch.Generator().manual_seed(7)).images
    assert ours.size == reference.size == (32, 48)
    assert psnr(ours, reference) >= PARITY_DB


def test_only_the_masked_region_is_repainted(sd):
    """The final latents outside the mask are exactly the init image's latent sample; inside they are new
    (the tiny VAE's attention mixes the whole picture when decoding, so pixels are not compared)."""
    from ediffi.pipeline import GenerationRequest, RequestRun, encode_request, evaluate

    model, _ = sd
    request = GenerationRequest(PROMPT, steps=6, guidance_scale=5.0, seed=7, sampler="dpmpp_2m",
                                use_karras_sigmas=False, init_image=_init_image(), mask=_mask())
    run = RequestRun(model, request, encode_request(model, request))
    while not run._decoding:
        run.advance(evaluate(model, run.pending()))
    mask, known, _ = run._known
    final = run.sampler.x
    factor = model.config.stages[0].latent.scale_factor
    assert mask.shape[-2:] == final.shape[-2:] == (HEIGHT // factor, WIDTH // factor)
    assert 0 < float(mask.mean()) < 1
    assert torch.equal(final * (1 - mask), known * (1 - mask))
    assert (final - known).abs().mul(mask).amax() > 0.1
    # the latent mask is the pixel mask nearest-resized: each cell takes its top-left pixel
    assert torch.equal(mask[0, 0], torch.from_numpy(np.asarray(_mask())[::factor, ::factor] >= 128).float())


def test_what_inpainting_cannot_take_is_an_input_error_naming_the_field(sd, tiny_model):
    from ediffi.pipeline import GenerationRequest, encode_request

    model, _ = sd
    cases = [
        (model, dict(init_image=None), "mask"),  # a mask without its image
        (model, dict(mask=_mask().resize((20, 12))), "mask"),  # another size than the init image's
        (tiny_model, dict(sampler="heun"), "init_image"),  # a pixel cascade: no VAE
        (model, dict(strength=0.1), "strength"),
    ]
    for target, fields, field in cases:
        request = GenerationRequest(PROMPT, steps=6, sampler=fields.pop("sampler", "euler"),
                                    **{"init_image": _init_image(), "mask": _mask(), **fields})
        with pytest.raises(InputError) as caught:
            encode_request(target, request)
        assert caught.value.field == field, (fields, caught.value)


def test_default_strength_is_the_models_inpaint_pipelines_with_a_mask_and_img2imgs_without(sd, imported_sdxl):
    """SD's inpaint pipeline defaults to 1, SDXL's to 0.9999 (its first step skipped, the rest from the
    noised image), img2img to 0.8; a request's own strength wins."""
    from ediffi.pipeline import GenerationRequest, init_strength

    model, _ = sd
    assert init_strength(model.config, GenerationRequest(PROMPT, init_image=_init_image(), mask=_mask())) == 1.0
    assert init_strength(imported_sdxl.config, GenerationRequest(PROMPT, init_image=_init_image(), mask=_mask())) == 0.9999
    assert init_strength(imported_sdxl.config, GenerationRequest(PROMPT, init_image=_init_image())) == 0.8
    assert init_strength(model.config, GenerationRequest(PROMPT, init_image=_init_image(), mask=_mask(), strength=0.5)) == 0.5


@pytest.fixture(scope="module")
def sdxl_base(tiny_diffusers_dir, tmp_path_factory):
    """The tiny SDXL base imported alone, and StableDiffusionXLInpaintPipeline on the same folder."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model

    out = tmp_path_factory.mktemp("sdxl-base-alone") / "model"
    import_diffusers(tiny_diffusers_dir / "sdxl-base", out)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_diffusers_dir / "sdxl-base", use_safetensors=True,
                                                            add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return load_model(out), pipe


@pytest.mark.parametrize(
    ("sampler", "karras", "scheduler", "config"),
    [
        ("euler", False, "EulerDiscreteScheduler", {}),  # SDXL's as loaded (the model's default)
        ("dpmpp_2m", True, "DPMSolverMultistepScheduler",
         {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ],
)
def test_sdxl_inpainting_matches_stable_diffusion_xl_inpaint_pipeline(sdxl_base, sampler, karras, scheduler, config):
    """SDXL base: the pipeline's default strength (0.9999: 7 of 8 steps from the noised image) is the
    model's default here too; then 1 and 0.5."""
    model, pipe = sdxl_base
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    for steps, strength in ((8, None), (6, 1.0), (8, 0.5)):
        ours = _ours(model, sampler, karras, steps, strength)
        reference = _reference(pipe, steps, strength)
        figure = psnr(ours[0], reference[0])
        print(f"SDXL inpaint {sampler} (karras {karras}) {steps} steps, strength {strength}: PSNR {figure:.2f} dB")
        assert figure >= PARITY_DB, (steps, strength)
        if strength is None:  # the default is not SD's 1: from pure noise the picture is another
            assert psnr(_ours(model, sampler, karras, steps, 1.0)[0], reference[0]) < PARITY_DB - 20


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_padding_mask_crop_matches_the_pipelines(sd, sampler):
    """diffusers' padding_mask_crop (A1111's "only masked"): the region around the mask, grown to the
    requested 32 x 32, is inpainted and pasted back into the 40 x 24 init image, whose size the image
    takes; the pixels away from the mask are the init image's own."""
    from ediffi.pipeline import GenerationRequest, generate

    model, pipe = sd
    scheduler, config = {"euler": ("EulerDiscreteScheduler", {}),
                         "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"})}[sampler]
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (4, 6, 14, 14))
    request = GenerationRequest(PROMPT, steps=6, guidance_scale=5.0, seed=7, sampler=sampler, use_karras_sigmas=False,
                                init_image=_init_image(), mask=mask, width=32, height=32, padding_mask_crop=2)
    (ours,) = generate(model, request)
    (reference,) = pipe(PROMPT, image=_init_image(), mask_image=mask, height=32, width=32, padding_mask_crop=2,
                        num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images
    assert ours.size == reference.size == (WIDTH, HEIGHT)
    figure = psnr(ours, reference)
    print(f"padding_mask_crop 2, {sampler}: PSNR {figure:.2f} dB")
    assert figure >= PARITY_DB
    kept = np.asarray(ours)[:, 20:]  # right of the crop region: the init image, exactly
    assert np.array_equal(kept, np.asarray(_init_image())[:, 20:])
    (whole,) = generate(model, dataclasses.replace(request, padding_mask_crop=None, width=40, height=24))
    assert psnr(whole, reference) < PARITY_DB - 20


def test_padding_mask_crop_needs_a_mask_with_something_to_repaint(sd):
    from ediffi.pipeline import GenerationRequest, encode_request

    model, _ = sd
    for fields, field in (({"mask": None}, "padding_mask_crop"), ({"mask": Image.new("L", (WIDTH, HEIGHT), 0)}, "mask"),
                          ({"padding_mask_crop": -1}, "padding_mask_crop")):
        request = GenerationRequest(PROMPT, steps=4, **{"init_image": _init_image(), "mask": _mask(),
                                                        "padding_mask_crop": 2, **fields})
        with pytest.raises(InputError) as caught:
            encode_request(model, request)
        assert caught.value.field == field
