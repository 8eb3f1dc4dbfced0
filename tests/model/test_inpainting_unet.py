"""Inpainting checkpoints whose UNet takes the mask (stable-diffusion-inpainting's 9 input channels:
the latents, the mask, the masked image's latents), imported from a StableDiffusionInpaintPipeline
folder, against that pipeline on a tiny random one (tests/support/diffusers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.failure import InputError
from tests.support.diffusers import build_tiny_sd_inpainting, build_tiny_sdxl_inpainting, psnr

diffusers = pytest.importorskip("diffusers")

PARITY_DB = 60.0
CLIPPED_PARITY_DB = 45.0  # DDIM's default clip_sample (tests/model/test_img2img.py)
PROMPT = "a red cat on the house"
WIDTH, HEIGHT = 40, 24


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    from diffusers import StableDiffusionInpaintPipeline

    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model

    root = tmp_path_factory.mktemp("sd-inpainting")
    folder = build_tiny_sd_inpainting(root)
    import_diffusers(folder, root / "imported")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return load_model(root / "imported"), pipe


def _init_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))


def _mask(flip: bool = False) -> Image.Image:
    array = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    array[3:17, 5:27] = 255
    mask = Image.fromarray(array)
    return mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else mask


def _ours(model, sampler: str, steps: int, strength: float | None, n: int = 1, mask=None):
    from ediffi.pipeline import GenerationRequest, generate

    return generate(model, GenerationRequest(
        PROMPT, steps=steps, guidance_scale=5.0, seed=7, n=n, sampler=sampler, use_karras_sigmas=False,
        init_image=_init_image(), mask=mask or _mask(), strength=strength,
    ))


def _reference(pipe, steps: int, strength: float | None, n: int = 1):
    images = []
    for k in range(n):
        kwargs = {} if strength is None else {"strength": strength}
        images += pipe(PROMPT, image=_init_image(), mask_image=_mask(), num_inference_steps=steps, guidance_scale=5.0,
                       height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(7 + k), **kwargs).images
    return images


@pytest.mark.parametrize(
    ("sampler", "scheduler", "config"),
    [
        ("pndm", "PNDMScheduler", {}),  # the folder's own: a request's default
        ("euler", "EulerDiscreteScheduler", {}),
        ("euler_a", "EulerAncestralDiscreteScheduler", {}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("ddim", "DDIMScheduler", {}),
    ],
)
def test_an_inpainting_unet_matches_stable_diffusion_inpaint_pipeline(inpainting, sampler, scheduler, config):
    """Same prompt, image, mask, steps and seeds: strength 1 (the default) for two images, then 0.6."""
    model, pipe = inpainting
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    bar = CLIPPED_PARITY_DB if sampler == "ddim" else PARITY_DB
    first = None
    for steps, strength, n in ((8, None, 2), (10, 0.6, 1)):
        ours, reference = _ours(model, sampler, steps, strength, n), _reference(pipe, steps, strength, n)
        first = first or reference
        figures = [psnr(a, b) for a, b in zip(ours, reference)]
        print(f"inpainting UNet {sampler} {steps} steps, strength {strength}, n {n}: PSNR "
              + ", ".join(f"{figure:.2f}" for figure in figures) + " dB")
        assert min(figures) >= bar, (steps, strength)
    other = _ours(model, sampler, 8, None, mask=_mask(flip=True))
    assert psnr(other[0], first[0]) < bar - 20


def test_an_inpainting_checkpoint_takes_a_mask_always(inpainting):
    """Its UNet needs the mask and the masked image: a request without them is an InputError naming
    mask; GET /v1/models says so (mask_required)."""
    from ediffi.capabilities import model_capabilities
    from ediffi.pipeline import GenerationRequest, encode_request

    model, _ = inpainting
    capabilities = model_capabilities(model.config)
    assert capabilities.init_image and capabilities.mask_required
    assert capabilities.as_json(max_image_side=1024, max_n=4, max_steps=50)["mask_required"] is True
    assert model.config.request_defaults.sampler == "pndm"  # the folder's PNDMScheduler
    for fields in ({}, {"init_image": _init_image()}):
        with pytest.raises(InputError) as caught:
            encode_request(model, GenerationRequest(PROMPT, steps=4, **fields))
        assert caught.value.field == "mask"


def test_the_engine_warms_up_and_serves_an_inpainting_checkpoint(inpainting, tmp_path_factory):
    """The worker's path: a warm-up whose dummy rows carry the mask channels, then the engine (its
    batches of two requests at once) gives the reference pipeline's images."""
    from engines.engine import Engine, EngineConfig
    from engines.torch_backend import TorchBackend
    from ediffi.pipeline import GenerationRequest, generate

    model, _ = inpainting
    backend = TorchBackend(model.model_dir, max_batch=8)
    backend.warmup(repeats=1)
    requests = [
        GenerationRequest(PROMPT, steps=5, guidance_scale=5.0, seed=seed, sampler="dpmpp_2m", use_karras_sigmas=False,
                          init_image=_init_image(), mask=_mask(flip=seed == 2), strength=strength)
        for seed, strength in ((1, None), (2, 0.6))
    ]
    with Engine(backend, EngineConfig()) as engine:
        handles = [engine.submit(request) for request in requests]
        outcomes = [handle.result(timeout=120) for handle in handles]
    for request, outcome in zip(requests, outcomes):
        assert outcome.ok, outcome.failure
        assert psnr(outcome.images[0], generate(model, request)[0]) >= PARITY_DB
    backend.close()


def test_models_and_generate_over_http_say_a_mask_is_required(inpainting):
    import asyncio

    from server.main import capabilities as read_capabilities
    from tests.server.test_request_rules import api, error_locs

    model, _ = inpainting

    async def check() -> None:
        async with api(read_capabilities(model.model_dir)) as (client, queue):
            caps = (await client.get("/v1/models")).json()["data"][0]["capabilities"]
            assert caps["mask_required"] is True and caps["init_image"] is True
            response = await client.post("/generate", json={"prompt": "a cat", "steps": 4})
            assert error_locs(response) == [["body", "mask"]]
            assert await queue.depth() == 0

    asyncio.run(check())


def test_an_inpainting_unet_in_a_plain_pipeline_folder_is_refused_with_why(tmp_path):
    """A 9-channel UNet saved as a StableDiffusionPipeline (or a 4-channel one as an inpaint pipeline)
    cannot be sampled as its folder says: the import names the channels and the class it expects."""
    import json
    import shutil

    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    folder = build_tiny_sd_inpainting(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffusersImportError, match=r"in_channels \(9\).*StableDiffusionInpaintPipeline"):
        import_diffusers(folder, tmp_path / "out")
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 4}))
    with pytest.raises(DiffusersImportError, match=r"in_channels \(4\).*2 x the VAE's latent_channels \+ 1 = 9"):
        import_diffusers(folder, tmp_path / "out2")
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def sdxl_inpainting(tmp_path_factory):
    from diffusers import StableDiffusionXLInpaintPipeline

    from ediffi.importers.diffusers import import_diffusers
    from ediffi.model import load_model

    root = tmp_path_factory.mktemp("sdxl-inpainting")
    folder = build_tiny_sdxl_inpainting(root)
    import_diffusers(folder, root / "imported")
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder, use_safetensors=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return load_model(root / "imported"), pipe


@pytest.mark.parametrize(
    ("sampler", "scheduler", "config"),
    [
        ("euler", "EulerDiscreteScheduler", {}),  # the folder's own
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ],
)
def test_an_sdxl_inpainting_unet_matches_stable_diffusion_xl_inpaint_pipeline(sdxl_inpainting, sampler, scheduler, config):
    """Its defaults (StableDiffusionXLInpaintPipeline's: guidance 7.5, strength 0.9999) and the same
    request at strength 1 and 0.6."""
    model, pipe = sdxl_inpainting
    assert (model.config.request_defaults.guidance_scale, model.config.request_defaults.inpaint_strength) == (7.5, 0.9999)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.original_scheduler_config, **config)
    for steps, strength in ((8, None), (6, 1.0), (10, 0.6)):
        (ours,) = _ours(model, sampler, steps, strength)
        (reference,) = _reference(pipe, steps, strength)
        figure = psnr(ours, reference)
        print(f"SDXL inpainting UNet {sampler} {steps} steps, strength {strength}: PSNR {figure:.2f} dB")
        assert figure >= PARITY_DB, (steps, strength)


def test_an_sdxl_inpainting_checkpoint_takes_no_refiner(tmp_path, tiny_diffusers_dir):
    from ediffi.importers.diffusers import DiffusersImportError, import_diffusers

    folder = build_tiny_sdxl_inpainting(tmp_path)
    with pytest.raises(DiffusersImportError, match="imported alone"):
        import_diffusers(folder, tmp_path / "out", refiner_dir=tiny_diffusers_dir / "sdxl-refiner")
