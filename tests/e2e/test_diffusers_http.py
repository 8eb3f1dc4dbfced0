"""The imported tiny SDXL base + refiner served by the real `ediffi serve`
process (EDIFFI_MODEL_DIR) over HTTP (issue 17): the image of POST /generate
equals diffusers' own; GET /v1/models shows the model's capabilities; fields
the model cannot honour get a 422 naming them."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.diffusers import psnr, sdxl_reference
from tests.support.process import ediffi_serve
from tests.e2e.test_web_ui import browser, open_page, wait_for  # noqa: F401  (browser: the UI tests' fixture)

pytest.importorskip("diffusers")

@pytest.fixture(scope="module")
def served_sdxl(imported_sdxl_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve-sdxl") / "serve.log"
    env = dict(EDIFFI_INTRA_OP_THREADS="1", EDIFFI_MAX_BATCH="4", OMP_NUM_THREADS="1")
    with ediffi_serve(imported_sdxl_dir, log_path, env, ready_timeout_s=240) as url:
        yield url


@pytest.mark.parametrize(
    ("fields", "karras"),
    [
        ({}, False),  # the model's defaults: the schedulers as the folders name them, guidance 5
        ({"sampler": "euler", "use_karras_sigmas": True, "guidance_scale": 5.0}, True),
    ],
    ids=["defaults", "euler-karras"],
)
def test_generate_over_http_matches_diffusers(served_sdxl, tiny_diffusers_dir, fields, karras):
    body = {"prompt": "a red cat on the house", "steps": 8, "seed": 7, "width": 48, "height": 32, **fields}
    response = httpx.post(served_sdxl + "/generate", json=body, timeout=240)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["b64_json"])))
    reference = sdxl_reference(tiny_diffusers_dir, body["prompt"], seed=7, steps=8, guidance=5.0, width=48, height=32,
                               karras=karras)
    assert image.size == reference.size == (48, 32)
    print(f"SDXL base + refiner over HTTP ({'Karras' if karras else 'as loaded'}): PSNR {psnr(image, reference):.2f} dB")
    assert psnr(image, reference) >= 35.0


def test_models_lists_capabilities(served_sdxl):
    response = httpx.get(served_sdxl + "/v1/models", timeout=10)
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    (model,) = listing["data"]
    caps = model["capabilities"]
    assert model["object"] == "model" and caps["source"] == "StableDiffusionXLPipeline"
    assert caps["sizes"] == {"default_width": 32, "default_height": 32, "fixed": False, "multiple_of": 8}
    (stage,) = caps["stages"]
    assert stage["space"] == "latent"
    assert [e["name"] for e in stage["experts"]] == ["base", "refiner"]
    assert stage["experts"][0]["sigma_lo"] == stage["experts"][1]["sigma_hi"] > 0
    assert caps["paint_with_words"] is True and caps["style_image"] is False
    assert caps["samplers"] == ["heun", "euler", "dpmpp_2m", "euler_a", "unipc", "ddim", "pndm", "ddpm"]


@pytest.mark.parametrize("sampler_name", ["Euler a", "DDIM", "PLMS"])
def test_a1111_samplers_of_an_imported_checkpoint_are_served(served_sdxl, sampler_name):
    """A1111's "Euler a", "DDIM" and "PLMS" on the imported SDXL (DDIM and PLMS exist only for imported
    checkpoints: the shipped model's listing leaves them out)."""
    listed = httpx.get(served_sdxl + "/sdapi/v1/samplers", timeout=10).json()
    assert sampler_name in [s["name"] for s in listed]
    # 4 steps: this SDXL config leaves skip_prk_steps unset, so PLMS starts with Runge-Kutta steps (at least 4)
    body = {"prompt": "a red cat on the house", "steps": 4, "seed": 7, "sampler_name": sampler_name, "width": 32, "height": 32}
    response = httpx.post(served_sdxl + "/sdapi/v1/txt2img", json=body, timeout=240)
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (32, 32)
    assert f"Sampler: {sampler_name}," in json.loads(response.json()["info"])["infotexts"][0]
    karras = httpx.post(served_sdxl + "/sdapi/v1/txt2img", json={**body, "scheduler": "Karras"}, timeout=60)
    if sampler_name == "Euler a":
        assert karras.status_code == 200, karras.text
    else:  # DDIM and PLMS step their scheduler's own timesteps: no Karras variant, 422 naming A1111's field
        assert karras.status_code == 422 and karras.json()["detail"][0]["loc"] == ["body", "scheduler"], karras.text
    if sampler_name == "PLMS":
        few = httpx.post(served_sdxl + "/sdapi/v1/txt2img", json={**body, "steps": 3}, timeout=60)
        assert few.status_code == 422 and few.json()["detail"][0]["loc"] == ["body", "steps"], few.text


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_over_http_starts_from_the_init_image(served_sdxl):
    """A real worker decodes the init image, encodes it with the VAE and runs int(steps x strength)
    steps: the image's size comes back; the same request gives the same pixels, another init image
    other ones; A1111's img2img answers the same way (parity with diffusers: tests/model/test_img2img.py)."""
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))[..., None].repeat(3, axis=2))

    def generate(init: Image.Image) -> np.ndarray:
        body = {"prompt": "a red cat on the house", "steps": 6, "seed": 3, "init_image": _png_b64(init), "strength": 0.5}
        response = httpx.post(served_sdxl + "/generate", json=body, timeout=240)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["b64_json"])))
        assert image.size == init.size == (40, 24)
        return np.asarray(image)

    first, again = generate(gradient), generate(gradient)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    body = {"prompt": "a red cat", "steps": 6, "init_images": [_png_b64(gradient)], "denoising_strength": 0.5,
            "width": 32, "height": 32}
    response = httpx.post(served_sdxl + "/sdapi/v1/img2img", json=body, timeout=240)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size == (32, 32)


def test_inpainting_over_http_is_the_reference_pipelines(served_sdxl, imported_sdxl):
    """A real worker (the engine, its batches) inpaints as the reference pipeline does (whose parity with
    diffusers' StableDiffusionInpaintPipeline is tests/model/test_inpainting.py); OpenAI's edits, sent by
    the openai client with the same mask and fields, make the same pixels; another mask other ones."""
    import openai

    from ediffi.pipeline import GenerationRequest, generate

    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))[..., None].repeat(3, axis=2))
    box = np.zeros((24, 40), dtype=np.uint8)
    box[4:20, 10:30] = 255
    mask = Image.fromarray(box, "L")
    sampling = {"steps": 6, "seed": 3, "sampler": "dpmpp_2m", "use_karras_sigmas": False, "guidance_scale": 5.0}
    body = {"prompt": "a red cat on the house", "init_image": _png_b64(gradient), "mask": _png_b64(mask), **sampling}
    response = httpx.post(served_sdxl + "/generate", json=body, timeout=240)
    assert response.status_code == 200, response.text
    served = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["b64_json"])))
    (reference,) = generate(imported_sdxl, GenerationRequest("a red cat on the house", init_image=gradient, mask=mask,
                                                              **sampling))
    assert served.size == reference.size == (40, 24)
    figure = psnr(served, reference)
    print(f"inpainting, served vs reference pipeline: PSNR {figure:.2f} dB")
    assert figure >= 60

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    with openai.OpenAI(base_url=served_sdxl + "/v1", api_key="sk-unused", max_retries=0, timeout=240) as client:
        edited = client.images.edit(
            image=("in.png", png(gradient), "image/png"), mask=("mask.png", png(mask), "image/png"),
            prompt="a red cat on the house", response_format="b64_json", extra_body=sampling,
        )
        other = client.images.edit(
            image=("in.png", png(gradient), "image/png"),
            mask=("mask.png", png(mask.transpose(Image.Transpose.FLIP_TOP_BOTTOM).rotate(90, expand=False)), "image/png"),
            prompt="a red cat on the house", response_format="b64_json", extra_body=sampling,
        )
    # only the region around the mask, inpainted at 32 x 32 and pasted back: the init image's size
    cropped = httpx.post(served_sdxl + "/generate", json={**body, "width": 32, "height": 32, "padding_mask_crop": 2},
                         timeout=240)
    assert cropped.status_code == 200, cropped.text
    cropped_image = Image.open(io.BytesIO(base64.b64decode(cropped.json()["images"][0]["b64_json"])))
    (cropped_reference,) = generate(imported_sdxl, GenerationRequest(
        "a red cat on the house", init_image=gradient, mask=mask, width=32, height=32, padding_mask_crop=2, **sampling,
    ))
    assert cropped_image.size == cropped_reference.size == (40, 24)
    assert psnr(cropped_image, cropped_reference) >= 60

    edited_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))))
    assert np.array_equal(edited_pixels, np.asarray(served))
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(other.data[0].b64_json)))), edited_pixels)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"style_image": _png_b64(Image.new("RGB", (16, 16), "red"))}, "style_image"),
        ({"width": 36}, "width"),
        ({"height": 4096}, "height"),  # beyond max_image_side
    ],
)
def test_fields_the_model_cannot_honour_are_422(served_sdxl, extra, field):
    response = httpx.post(served_sdxl + "/generate", json={"prompt": "a cat", "steps": 2, **extra}, timeout=30)
    assert response.status_code == 422, response.text
    assert any(error["loc"][-1] == field for error in response.json()["detail"]), response.text


def test_web_ui_hides_the_style_control_for_a_model_without_image_encoder(served_sdxl, browser):
    """The page reads GET /v1/models and offers no style image to the
    imported SDXL (a real headless Chromium; skipped without one)."""
    open_page(browser, served_sdxl)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('style-controls').hidden"), 20,
             "the style controls stayed visible")
    assert browser.execute_script("return document.getElementById('negative-prompt').offsetParent !== undefined")


def test_web_ui_offers_width_and_height_for_a_model_that_makes_several_sizes(served_sdxl, browser):
    """A latent model (sizes.fixed false) gets width and height fields at its
    default size in steps of its multiple, and the request carries them."""
    open_page(browser, served_sdxl)
    wait_for(browser, lambda d: d.find_element("id", "width-field").is_displayed(), 20, "no width field")
    width, height = browser.find_element("id", "width"), browser.find_element("id", "height")
    assert (width.get_attribute("value"), height.get_attribute("value")) == ("32", "32")  # the model's default
    assert width.get_attribute("step") == height.get_attribute("min") == "8"  # its multiple
    browser.execute_script("document.getElementById('width').value = '48'")
    body = browser.execute_script("document.getElementById('prompt').value = 'a cat'; return buildRequest().body")
    assert (body["width"], body["height"]) == (48, 32)
