"""img2img on imported latent checkpoints (an init image and its strength) against diffusers'
StableDiffusionImg2ImgPipeline on the tiny random checkpoints (tests/support/diffusers.py): the
VAE's latent sample and the noise drawn from each image's generator, the schedule's last
int(steps x strength) steps, each sampler's scheduler; and the rules around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.failure import InputError
from tests.support.diffusers import psnr

diffusers = pytest.importorskip("diffusers")

PARITY_DB = 60.0
# DDIM's default clip_sample (this config leaves it unset) clamps x0: a kink a last-bit difference
# crosses differently (measured 52.7-68.3 dB here).
CLIPPED_PARITY_DB = 45.0
PROMPT = "a red cat on the house"


@pytest.fixture(scope="module")
def sd(imported_sd_dir, tiny_diffusers_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    from ediffi.model import load_model

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_diffusers_dir / "sd", use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)  # tests swap schedulers: each starts from this
    return load_model(imported_sd_dir), pipe


def _init_image(width: int = 40, height: int = 24) -> Image.Image:
    """Random RGB pixels, 40 x 24 (not the model's default 32 x 32: the output takes the image's size)."""
    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))


def _ours(model, sampler: str, karras: bool, steps: int, strength: float, n: int = 1, **fields):
    from ediffi.pipeline import GenerationRequest, generate

    return generate(model, GenerationRequest(
        PROMPT, steps=steps, guidance_scale=5.0, seed=7, n=n, sampler=sampler, use_karras_sigmas=karras,
        init_image=fields.pop("init_image", _init_image()), strength=strength, **fields,
    ))


def _reference(pipe, steps: int, strength: float, n: int = 1, image=None):
    """diffusers with one generator per image, seeded 7 + k: this server's image k (seed + k)."""
    generators = [torch.Generator().manual_seed(7 + k) for k in range(n)]
    return pipe(PROMPT, image=image or _init_image(), strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                num_images_per_prompt=n, generator=generators).images


@pytest.mark.parametrize(
    ("sampler", "karras", "scheduler", "config"),
    [
        ("euler", False, "EulerDiscreteScheduler", {}),
        ("euler", True, "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("euler_a", False, "EulerAncestralDiscreteScheduler", {}),
        ("dpmpp_2m", False, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("ddim", False, "DDIMScheduler", {}),
        ("pndm", False, "PNDMScheduler", {}),  # the folder's own (SD 1.x's PLMS): its model default
        ("ddpm", False, "DDPMScheduler", {}),  # its noise each step from the image's generator; clip_sample: 77.95 dB at worst
    ],
)
def test_img2img_matches_stable_diffusion_img2img_pipeline(sd, sampler, karras, scheduler, config):
    """Same prompt, init image (40 x 24: the images' size), strength, steps and seeds: two images at
    strength 0.6 (their generators 7 and 8), one at 1.0 and at 0.3."""
    model, pipe = sd
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    bar = CLIPPED_PARITY_DB if sampler == "ddim" else PARITY_DB
    for steps, strength, n in ((10, 0.6, 2), (7, 1.0, 1), (5, 0.3, 1)):
        ours, reference = _ours(model, sampler, karras, steps, strength, n), _reference(pipe, steps, strength, n)
        assert [image.size for image in ours] == [image.size for image in reference] == [(40, 24)] * n
        figures = [psnr(a, b) for a, b in zip(ours, reference)]
        print(f"img2img {sampler} (karras {karras}) {steps} steps, strength {strength}, n {n}: PSNR "
              + ", ".join(f"{figure:.2f}" for figure in figures) + " dB")
        assert min(figures) >= bar, (steps, strength)
    # The bar can fail: the same request from another init image is far from the reference.
    other = _ours(model, sampler, karras, 5, 0.3, init_image=_init_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert psnr(other[0], reference[0]) < bar - 20


def test_a_size_resizes_the_init_image_and_none_rounds_its_size_down(sd):
    """width/height given: the init image resized to them (Lanczos) first, so diffusers' pipeline
    given that resized image (it takes no size) makes the same picture; none given: the image's size
    rounded down to the model's multiple (here 8; diffusers rounds to the VAE's factor, 8 on real SD)."""
    model, pipe = sd
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    (ours,) = _ours(model, "euler", False, 6, 0.5, width=32, height=48)
    resized = _init_image().resize((32, 48), resample=Image.Resampling.LANCZOS)
    (reference,) = _reference(pipe, 6, 0.5, image=resized)
    assert ours.size == reference.size == (32, 48)
    assert psnr(ours, reference) >= PARITY_DB
    (rounded,) = _ours(model, "euler", False, 6, 0.5, init_image=_init_image(41, 30))
    assert rounded.size == (40, 24)


def test_n_images_equal_diffusers_with_one_generator_per_image(sd, tiny_diffusers_dir):
    """Image k of n uses seed + k: diffusers' pipeline given a list of generators seeded S + k (txt2img too)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from ediffi.pipeline import GenerationRequest, generate

    model, _ = sd
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir / "sd", use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = generate(model, GenerationRequest(PROMPT, steps=6, guidance_scale=5.0, seed=7, n=3, sampler="euler",
                                             use_karras_sigmas=False))
    reference = pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=3,
                     generator=[torch.Generator().manual_seed(7 + k) for k in range(3)]).images
    figures = [psnr(a, b) for a, b in zip(ours, reference)]
    print("txt2img n=3 vs one generator per image: PSNR " + ", ".join(f"{f:.2f}" for f in figures) + " dB")
    assert min(figures) >= PARITY_DB


def test_what_img2img_cannot_do_is_an_input_error_naming_the_field(sd, tiny_model):
    from ediffi.pipeline import GenerationRequest, encode_request

    model, _ = sd
    cases = [
        (tiny_model, dict(sampler="heun"), "init_image"),  # a pixel cascade: no VAE to encode it
        (model, dict(sampler="euler", strength=0.1), "strength"),  # int(6 x 0.1) = 0 steps
        (model, dict(sampler="euler", strength=1.5), "strength"),
        (model, dict(sampler="euler", init_image=_init_image(5, 5)), "init_image"),  # rounds to 0 x 0
    ]
    for target, fields, field in cases:
        request = GenerationRequest(PROMPT, steps=6, **{"init_image": _init_image(), **fields})
        with pytest.raises(InputError) as caught:
            encode_request(target, request)
        assert caught.value.field == field, (fields, caught.value)
