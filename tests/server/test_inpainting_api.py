"""Inpainting over HTTP: ``mask`` (with ``init_image``) on /generate and /v1/images/generations,
OpenAI's multipart ``POST /v1/images/edits`` (through the official ``openai`` client too) and A1111's
img2img with a mask, against the capabilities of an imported SDXL (which inpaints) and of the shipped
family (which does not): what reaches the queue (params and the mask's bytes), and the refusals."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from tests.server.test_img2img_api import assert_refused
from tests.server.test_request_rules import api, error_locs, sdxl_capabilities  # noqa: F401
from tests.support.api import QueueWorker, run_async

W, H = 40, 24


def _image(width: int = W, height: int = H, mode: str = "RGB", transparent_box: bool = False) -> Image.Image:
    array = np.full((height, width, 4), (200, 30, 30, 255), dtype=np.uint8)
    if transparent_box:
        array[4:12, 8:24, 3] = 0
    return Image.fromarray(array, "RGBA").convert(mode)


def _mask(width: int = W, height: int = H) -> Image.Image:
    array = np.zeros((height, width), dtype=np.uint8)
    array[4:12, 8:24] = 255
    return Image.fromarray(array, "L")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


@dataclass
class InputReadingWorker(QueueWorker):
    """A QueueWorker that reads each job's byte inputs, as the real worker does, before finishing it."""

    inputs: dict[str, dict[str, bytes]] = field(default_factory=dict)

    async def handle(self, job) -> None:
        self.inputs[job.job_id] = {name: await self.queue.load_input(job.job_id, name) for name in job.input_names}
        await super().handle(job)


def _job_mask(worker: InputReadingWorker, job) -> np.ndarray:
    """The mask the worker read: grey levels of the job's "mask" input."""
    return np.asarray(Image.open(io.BytesIO(worker.inputs[job.job_id]["mask"])).convert("L"))


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
def test_a_mask_reaches_the_worker_with_its_init_image(sdxl_capabilities, path):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), InputReadingWorker(queue) as worker:
            for extra, strength in (({}, 0.9999), ({"strength": 0.5, "padding_mask_crop": 4}, 0.5)):  # SDXL inpaint's default
                body = {"prompt": "a cat", "steps": 4, "init_image": _b64(_image()), "mask": _b64(_mask()),
                        "response_format": "b64_json", **extra}
                response = await client.post(path, json=body)
                assert response.status_code == 200, response.text
                job = worker.claimed[-1]
                assert job.params["inputs"] == ["init_image", "mask"]
                assert (job.params["width"], job.params["height"], job.params["strength"]) == (W, H, strength)
                # version 3: a worker from before inpainting refuses the job rather than draw it as img2img
                assert job.params["version"] == 3
                assert job.params.get("padding_mask_crop") == extra.get("padding_mask_crop")
                assert np.array_equal(_job_mask(worker, job), np.asarray(_mask()))

    check()


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("imported", "fields", "field", "words"),
    [
        (True, {"mask": _b64(_mask())}, "mask", "goes with an init_image"),
        (True, {"init_image": _b64(_image()), "mask": _b64(_mask(20, 12))}, "mask", "init image's size"),
        (True, {"init_image": _b64(_image()), "mask": "bm90IGFuIGltYWdl"}, "mask", ""),  # "not an image"
        (True, {"init_image": _b64(_image()), "mask": _b64(_mask()), "strength": 0.1, "steps": 5}, "strength",
         "at least one step"),
        (True, {"init_image": _b64(_image()), "padding_mask_crop": 4}, "padding_mask_crop", "goes with a mask"),
        (True, {"init_image": _b64(_image()), "mask": _b64(_mask().point(lambda v: 0)), "padding_mask_crop": 4},
         "mask", "nothing to crop around"),
        (True, {"init_image": _b64(_image()), "mask": _b64(_mask()), "padding_mask_crop": -1}, "padding_mask_crop", ""),
        (False, {"init_image": _b64(_image(64, 64)), "mask": _b64(_mask(64, 64))}, "init_image", "takes no init image"),
    ],
)
def test_what_inpainting_cannot_take_is_422_naming_the_field(sdxl_capabilities, path, imported, fields, field, words):  # noqa: F811
    assert_refused(sdxl_capabilities if imported else None, path, fields, field, words)


# ------------------------------------------------------------------ OpenAI edits


def _edit_files(image: Image.Image | None = None, mask: Image.Image | None = None) -> list:
    files = [("image", ("image.png", _png(image or _image(mode="RGBA", transparent_box=True)), "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", _png(mask), "image/png")))
    return files


def test_edits_take_openais_transparent_pixels_as_the_mask(sdxl_capabilities):  # noqa: F811
    """No mask: the image's own fully transparent pixels are repainted; an RGBA mask: its transparent
    pixels; a mask without alpha: its white ones (diffusers' and A1111's convention)."""
    expected = np.asarray(_mask())
    rgba_mask = Image.fromarray(np.where(expected[..., None] == 255, (0, 0, 0, 0), (0, 0, 0, 255)).astype(np.uint8), "RGBA")
    cases = [
        (_edit_files(), expected),
        (_edit_files(_image(), rgba_mask), expected),
        (_edit_files(_image(), _mask()), expected),
    ]

    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), InputReadingWorker(queue) as worker:
            for files, mask in cases:
                response = await client.post("/v1/images/edits", files=files,
                                              data={"prompt": "a cat", "n": "2", "steps": "4", "response_format": "b64_json"})
                assert response.status_code == 200, response.text
                assert len(response.json()["data"]) == 2 and "b64_json" in response.json()["data"][0]
                job = worker.claimed[-1]
                assert (job.params["n"], job.params["steps"], job.params["strength"]) == (2, 4, 0.9999)  # SDXL's default
                assert (job.params["width"], job.params["height"], job.params["version"]) == (W, H, 3)
                assert "padding_mask_crop" not in job.params
                assert job.params["client"]["api"] == "openai"
                assert np.array_equal(_job_mask(worker, job), mask)

    check()


def test_the_openai_client_edits_an_image(sdxl_capabilities):  # noqa: F811
    """openai-python's ``images.edit`` (its multipart encoding, its error parsing) against the endpoint."""

    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), InputReadingWorker(queue) as worker:
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=client._transport.app))
            async with openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-unused", http_client=http) as oa:
                result = await oa.images.edit(
                    image=("in.png", _png(_image()), "image/png"), mask=("mask.png", _png(_mask()), "image/png"),
                    prompt="a cat", n=1, size="32x48", response_format="b64_json", model="dall-e-2",
                    extra_body={"steps": 3, "seed": 5},
                )
                assert len(result.data) == 1 and result.data[0].b64_json
                job = worker.claimed[-1]
                assert (job.params["width"], job.params["height"], job.params["seed"]) == (32, 48, 5)
                with pytest.raises(openai.UnprocessableEntityError) as caught:
                    await oa.images.edit(image=("in.png", _png(_image()), "image/png"), prompt="a cat")
                assert caught.value.body["param"] == "mask"  # an opaque image and no mask: nothing to edit
                assert len(worker.claimed) == 1

    check()


@pytest.mark.parametrize(
    ("imported", "files", "data", "field"),
    [
        (True, [], {"prompt": "a cat"}, "image"),
        (True, _edit_files(), {}, "prompt"),
        (True, _edit_files(), {"prompt": "a cat", "n": "two"}, "n"),
        (True, _edit_files(), {"prompt": "a cat", "num_inference_steps": "4"}, "num_inference_steps"),
        (True, _edit_files(), {"prompt": "a cat", "size": "13x7"}, "size"),
        (True, _edit_files(), {"prompt": "a cat", "strength": "0"}, "strength"),
        (True, _edit_files(_image()), {"prompt": "a cat"}, "mask"),  # opaque, no mask
        (True, _edit_files(_image(), _mask(20, 12)), {"prompt": "a cat"}, "mask"),
        (True, [("image", ("x.png", b"not an image", "image/png"))], {"prompt": "a cat"}, "image"),
        (True, _edit_files() + [("extra", ("x.png", b"1", "image/png"))], {"prompt": "a cat"}, "extra"),
        (True, _edit_files() * 2, {"prompt": "a cat"}, "body"),  # more files than the endpoint takes
        (False, _edit_files(_image(64, 64, "RGBA", True)), {"prompt": "a cat"}, "image"),  # the shipped family
    ],
)
def test_what_an_edit_cannot_take_is_422_naming_the_field(sdxl_capabilities, imported, files, data, field):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities if imported else None) as (client, queue):
            # (a form without files: its text as parts without a filename, so httpx still sends multipart)
            parts = files or [(name, (None, value.encode())) for name, value in data.items()]
            response = await client.post("/v1/images/edits", files=parts, data=data if files else None)
            assert response.status_code == 422, response.text
            locs = error_locs(response)
            assert locs[0][: 1 + (field != "body")] == ["body", field][: 1 + (field != "body")], response.text
            assert response.json()["error"]["message"]  # OpenAI's error shape
            assert await queue.depth() == 0

    check()


def test_an_edit_sent_as_json_or_compressed_is_415(sdxl_capabilities):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue):
            response = await client.post("/v1/images/edits", json={"prompt": "a cat", "image": _b64(_image())})
            assert response.status_code == 415, response.text
            assert response.headers["accept-post"] == "multipart/form-data"
            # a coding this server does not decode (it would read the compressed bytes as the form)
            response = await client.post("/v1/images/edits", files=_edit_files(), data={"prompt": "a cat"},
                                         headers={"Content-Encoding": "gzip"})
            assert response.status_code == 415, response.text
            assert response.headers["accept-encoding"] == "identity"
            assert await queue.depth() == 0

    check()


# ---------------------------------------------------------------------- A1111


def test_a1111_img2img_with_a_mask_inpaints(sdxl_capabilities):  # noqa: F811
    """A1111's mask: blurred by mask_blur (4 by default) before the pipeline binarises it at 50%;
    inpainting_mask_invert swaps what is kept; "Mask blur" in the infotext."""

    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities, sync_timeout_s=30) as (client, queue), InputReadingWorker(queue) as worker:
            body = {"prompt": "a cat", "steps": 4, "init_images": [_b64(_image())], "mask": _b64(_mask()), "seed": 5,
                    "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
            response = await client.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 200, response.text
            job = worker.claimed[-1]
            assert job.params["strength"] == 0.75 and job.params["version"] == 3  # A1111's denoising default
            assert np.array_equal(_job_mask(worker, job), np.asarray(_mask()))
            assert "Mask blur: 0" in json.loads(response.json()["info"])["infotexts"][0]

            assert "padding_mask_crop" not in job.params  # "Whole picture"

            response = await client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": True,
                                                                     "inpaint_full_res_padding": 8})
            assert response.status_code == 200, response.text
            assert worker.claimed[-1].params["padding_mask_crop"] == 8  # "Only masked": diffusers' crop

            response = await client.post("/sdapi/v1/img2img", json={**body, "mask_blur": None, "inpainting_mask_invert": 1})
            assert response.status_code == 200, response.text
            blurred_inverted = _job_mask(worker, worker.claimed[-1])
            assert blurred_inverted[0, 0] > 200 and blurred_inverted[8, 16] < 128  # inverted: the box is kept
            assert 0 < ((blurred_inverted > 0) & (blurred_inverted < 255)).sum()  # blurred (A1111's default 4)
            assert "Mask blur: 4" in json.loads(response.json()["info"])["infotexts"][0]

    check()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"inpainting_fill": 0}, "inpainting_fill"),
        ({"inpaint_full_res": True, "inpaint_full_res_padding": -1}, "inpaint_full_res_padding"),
        ({"latent_mask": "abc"}, "latent_mask"),
        ({"initial_noise_multiplier": 1.2}, "initial_noise_multiplier"),
        ({"mask": _b64(_mask(20, 12))}, "mask"),
        ({"mask": "bm90IGFuIGltYWdl"}, "mask"),
        ({"mask_blur": -1}, "mask_blur"),
    ],
)
def test_a1111_inpainting_refusals_name_the_field(sdxl_capabilities, fields, field):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue):
            body = {"prompt": "a cat", "steps": 4, "init_images": [_b64(_image())], "mask": _b64(_mask()), **fields}
            response = await client.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 422, response.text
            assert [error["loc"][:2] for error in response.json()["detail"]] == [["body", field]], response.text
            assert await queue.depth() == 0

    check()
