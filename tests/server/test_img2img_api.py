"""img2img over HTTP: ``init_image`` + ``strength`` on /generate (and /v1/images/generations), and
A1111's ``POST /sdapi/v1/img2img``, against the capabilities of an imported SDXL (which takes an
init image) and of the shipped family (which does not): what reaches the queue, and the 422s."""

from __future__ import annotations

import base64
import json
import io

import pytest
from PIL import Image

from tests.server.test_request_rules import api, error_locs, error_message, sdxl_capabilities  # noqa: F401
from tests.support.api import QueueWorker, run_async


def _png(width: int = 40, height: int = 24, color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"width": 40, "height": 24, "strength": 0.8}),  # the image's size; diffusers' default strength
        ({"strength": 0.5, "width": 32, "height": 48}, {"width": 32, "height": 48, "strength": 0.5}),  # resized
        ({"init_image": _png(43, 29)}, {"width": 40, "height": 24, "strength": 0.8}),  # rounded down to 8
    ],
)
def test_an_init_image_reaches_the_worker_with_its_size_and_strength(sdxl_capabilities, fields, expected):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), QueueWorker(queue) as worker:
            body = {"prompt": "a cat", "steps": 4, "init_image": _png(), **fields}
            response = await client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert {name: job.params[name] for name in expected} == expected
            assert "init_image" in job.params["inputs"]
            # version 2: a worker of before img2img (JobParams version 1 only) refuses it, never draws txt2img
            assert job.params["version"] == 2
            assert "init_image" in job.input_names  # (its bytes: tests/e2e/test_diffusers_http.py, a real worker)

    check()


def test_a_plain_request_carries_no_strength(sdxl_capabilities):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), QueueWorker(queue) as worker:
            assert (await client.post("/generate", json={"prompt": "a cat", "steps": 1})).status_code == 200
            assert "strength" not in worker.claimed[0].params and worker.claimed[0].params["inputs"] == []
            assert worker.claimed[0].params["version"] == 1  # what every worker reads

    check()


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("imported", "fields", "field", "words"),
    [
        (False, {"init_image": _png(64, 64)}, "init_image", "takes no init image"),  # the shipped pixel cascade
        (True, {"strength": 0.5}, "strength", "goes with an init_image"),
        (True, {"init_image": _png(), "strength": 0.1, "steps": 5}, "strength", "at least one step"),
        (True, {"init_image": _png(), "strength": 0}, "strength", "greater than 0"),
        (True, {"init_image": _png(), "strength": 1.5}, "strength", "less than or equal to 1"),
        (True, {"init_image": _png(), "sampler": "pndm"}, "sampler", "init image"),
        (True, {"init_image": "bm90IGFuIGltYWdl"}, "init_image", ""),  # base64 of "not an image"
        (True, {"init_image": _png(4000, 16)}, "init_image", "send width and height"),  # beyond max_image_side
        (True, {"init_image": _png(5, 5)}, "init_image", "send width and height"),  # rounds to 0 x 0
    ],
)
def test_what_img2img_cannot_take_is_422_naming_the_field(sdxl_capabilities, path, imported, fields, field, words):  # noqa: F811
    assert_refused(sdxl_capabilities if imported else None, path, fields, field, words)


def assert_refused(capabilities, path: str, fields: dict, field: str, words: str) -> None:
    """``fields`` (with a prompt) sent to ``path`` is a 422 naming ``field`` (its message has ``words``),
    and nothing is queued."""

    @run_async
    async def check() -> None:
        async with api(capabilities) as (client, queue):
            response = await client.post(path, json={"prompt": "a cat", **fields})
            assert error_locs(response) == [["body", field]], response.text
            assert words in error_message(response)
            assert await queue.depth() == 0

    check()


def test_models_lists_init_image_and_strength(sdxl_capabilities):  # noqa: F811
    @run_async
    async def check() -> None:
        for capabilities, takes in ((sdxl_capabilities, True), (None, False)):
            async with api(capabilities) as (client, _):
                caps = (await client.get("/v1/models")).json()["data"][0]["capabilities"]
                assert caps["init_image"] is takes
                assert caps["mask"] is takes  # inpainting, wherever img2img is
                expected = {"default": 0.8, "default_with_mask": 0.9999, "min": 0.0, "max": 1.0, "exclusive_min": True}
                expected = expected if takes else None
                assert caps["request"]["strength"] == expected

    check()


def test_a1111_img2img_takes_its_init_image_and_denoising_strength(sdxl_capabilities):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities, sync_timeout_s=30) as (client, queue), QueueWorker(queue) as worker:
            body = {"prompt": "a cat", "steps": 4, "init_images": [_png()], "width": 32, "height": 32,
                    "sampler_name": "Euler a", "seed": 5}
            response = await client.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert (job.params["width"], job.params["height"], job.params["strength"]) == (32, 32, 0.75)  # A1111's default
            assert job.params["sampler"] == "euler_a"
            answer = response.json()
            assert "init_images" not in answer["parameters"]  # not echoed back (megabytes)
            assert "Denoising strength: 0.75" in json.loads(answer["info"])["infotexts"][0]

    check()


@pytest.mark.parametrize(
    ("imported", "fields", "field"),
    [
        (True, {"init_images": [_png(), _png()]}, "init_images"),
        (True, {"resize_mode": 1}, "resize_mode"),
        (True, {"denoising_strength": 0}, "denoising_strength"),
        (True, {"denoising_strength": 0.1, "steps": 5}, "denoising_strength"),  # no step would run
        (False, {}, "init_images"),  # the shipped family takes no init image
    ],
)
def test_a1111_img2img_refusals_name_a1111_fields(sdxl_capabilities, imported, fields, field):  # noqa: F811
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities if imported else None) as (client, queue):
            body = {"prompt": "a cat", "steps": 4, "init_images": [_png(64, 64)], **fields}
            response = await client.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 422, response.text
            assert [error["loc"][:2] for error in response.json()["detail"]] == [["body", field]], response.text
            assert await queue.depth() == 0

    check()
