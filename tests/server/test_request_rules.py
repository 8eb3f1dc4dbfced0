"""Request rules a diffusers/OpenAI client relies on, over HTTP, with the
capabilities of an imported model that makes several sizes (the tiny SDXL
base + refiner, tests/support/diffusers.py) and of the shipped family's fixed
size:

- ``/v1/images/generations`` ``size``: any "WxH" width/height take, a 422
  naming ``size`` otherwise, and naming both when it disagrees with them;
- ``seed``: image k uses seed + k, so seed + n - 1 must stay in range (both
  endpoints; the CLI's check is in tests/e2e/test_cli_seed_range.py);
- ``GET /v1/models``: what a client may send (largest side, samplers, each
  field's default and limits, ``sr_noise_level`` for IF models only).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import pytest

from ediffi.capabilities import ModelCapabilities
from ediffi.failure import field_loc
from ediffi.spec import MAX_SEED
from server.app import create_app
from server.main import capabilities as read_capabilities
from server.queue import InProcessQueue, queue_limits
from tests.support.api import QueueWorker, make_settings, run_async

MAX_SIDE = 1024  # EDIFFI_MAX_IMAGE_SIDE of these apps (not the default 2048, so the listing shows the setting)


@pytest.fixture(scope="module")
def sdxl_capabilities(imported_sdxl_dir) -> ModelCapabilities:
    """The imported SDXL's capabilities as the API reads them (model.json only): default 32x32, multiples of 8."""
    return read_capabilities(imported_sdxl_dir)


@asynccontextmanager
async def api(capabilities: ModelCapabilities | None, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """(client, queue) of an app serving `capabilities` (None: the shipped family's fixed 64 px) on an in-process queue."""
    settings = make_settings(**{"max_image_side": MAX_SIDE, **overrides})
    queue = InProcessQueue(**queue_limits(settings))
    app = create_app(settings, queue=queue, capabilities=capabilities, static_dir=None)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            yield client, queue
    finally:
        await queue.close()


def error_locs(response: httpx.Response) -> list[list]:
    """The fields a 422 names: /generate's ``detail`` locs; /v1's OpenAI-shaped error names one, ``param``."""
    assert response.status_code == 422, response.text
    body = response.json()
    if "error" in body:
        return [["body", *field_loc(body["error"]["param"])]]
    return [error["loc"] for error in body["detail"]]


def error_message(response: httpx.Response) -> str:
    """The first error's message (of /generate's ``detail``, or /v1's OpenAI-shaped error)."""
    body = response.json()
    return body["error"]["message"] if "error" in body else body["detail"][0]["msg"]


# ------------------------------------------------------------------ OpenAI size


@pytest.mark.parametrize(
    ("body", "size"),
    [
        ({"size": "48x32"}, (48, 32)),
        ({"size": "1024x576"}, (1024, 576)),  # a wide size up to max_image_side
        ({"size": "32x32"}, (32, 32)),  # the default, named
        ({"size": "48x32", "width": 48}, (48, 32)),  # agreeing width/height are fine
        ({"size": "48x32", "width": 48, "height": 32}, (48, 32)),
        ({"width": 40, "height": 24}, (40, 24)),  # width/height alone, as before
    ],
)
def test_openai_size_takes_any_size_the_model_makes(sdxl_capabilities, body, size):
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), QueueWorker(queue) as worker:
            response = await client.post(
                "/v1/images/generations", json={"prompt": "a cat", "steps": 1, "response_format": "b64_json", **body}
            )
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert (job.params["width"], job.params["height"]) == size  # what the worker makes

    check()


def test_openai_size_of_an_openai_client_with_the_default_max_side(sdxl_capabilities):
    """The review's case: an OpenAI client asking an SDXL server for 1792x1024
    (within EDIFFI_MAX_IMAGE_SIDE's default 2048)."""

    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities, max_image_side=2048) as (client, queue), QueueWorker(queue) as worker:
            response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "1792x1024", "steps": 1})
            assert response.status_code == 200, response.text
            assert (worker.claimed[0].params["width"], worker.claimed[0].params["height"]) == (1792, 1024)

    check()


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("36x32", "width must be a multiple of 8"),
        ("32x20", "height must be a multiple of 8"),
        (f"{MAX_SIDE + 8}x32", f"within [8, {MAX_SIDE}]"),  # beyond max_image_side
        ("1792x1024", f"within [8, {MAX_SIDE}]"),
        ("1024", 'must be "WIDTHxHEIGHT"'),
        ("32x", 'must be "WIDTHxHEIGHT"'),
        ("0x32", 'must be "WIDTHxHEIGHT"'),
        ("-8x32", 'must be "WIDTHxHEIGHT"'),
        (" 32x32", 'must be "WIDTHxHEIGHT"'),
        ("32x32x32", 'must be "WIDTHxHEIGHT"'),
        ("9" * 40 + "x32", 'must be "WIDTHxHEIGHT"'),
    ],
)
def test_openai_size_the_model_cannot_make_is_422_naming_size(sdxl_capabilities, size, words):
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue):
            response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": size})
            assert error_locs(response) == [["body", "size"]]
            assert words in error_message(response)
            assert await queue.depth() == 0

    check()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"width": 40}, ["width"]),
        ({"height": 40}, ["height"]),
        ({"width": 32, "height": 48}, ["width", "height"]),
        ({"width": 48, "height": 40}, ["height"]),
    ],
)
def test_openai_size_disagreeing_with_width_height_is_422_naming_both(sdxl_capabilities, extra, named):
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, _):
            response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "48x32", **extra})
            # OpenAI's error shape: the first field is param, the message names each ("size: why; width: why").
            assert error_locs(response) == [["body", "size"]]
            assert error_message(response).startswith("size: ") and "disagrees" in error_message(response)
            assert [name for name in ("width", "height") if f"; {name}: " in error_message(response)] == named

    check()


def test_openai_size_of_a_fixed_size_model_is_its_size_only():
    @run_async
    async def check() -> None:
        async with api(None) as (client, queue), QueueWorker(queue) as worker:
            ok = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "steps": 1})
            assert ok.status_code == 200, ok.text
            assert (worker.claimed[0].params["width"], worker.claimed[0].params["height"]) == (64, 64)
            for size in ("32x32", "64x32", "1024x1024"):
                wrong = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": size})
                assert error_locs(wrong) == [["body", "size"]]
                assert "makes 64x64 images only" in error_message(wrong)

    check()


# ----------------------------------------------------------------------- seed


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(("seed", "n"), [(MAX_SEED, 2), (MAX_SEED - 2, 4), (MAX_SEED, 4)])
def test_seed_whose_last_image_overflows_is_422_naming_seed(path, seed, n):
    @run_async
    async def check() -> None:
        async with api(None) as (client, queue):
            response = await client.post(path, json={"prompt": "a cat", "seed": seed, "n": n})
            assert error_locs(response) == [["body", "seed"]]
            assert f"n={n}" in error_message(response)
            if path == "/generate":
                assert response.json()["detail"][0]["ctx"] == {"le": MAX_SEED - n + 1}
            assert await queue.depth() == 0

    check()


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(("seed", "n"), [(MAX_SEED, 1), (MAX_SEED - 1, 2), (MAX_SEED - 3, 4)])
def test_seed_whose_last_image_is_max_seed_is_accepted(path, seed, n):
    @run_async
    async def check() -> None:
        async with api(None) as (client, queue), QueueWorker(queue) as worker:
            response = await client.post(path, json={"prompt": "a cat", "seed": seed, "n": n, "steps": 1})
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert job.params["seed"] + n - 1 == MAX_SEED

    check()


# ---------------------------------------------------------------- GET /v1/models


async def _listed(capabilities: ModelCapabilities | None, **settings: Any) -> dict:
    async with api(capabilities, **settings) as (client, _):
        response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    (model,) = response.json()["data"]
    return model["capabilities"]


def test_models_lists_what_a_client_may_send(sdxl_capabilities):
    caps = asyncio.run(_listed(sdxl_capabilities, max_n=3, max_steps=40))
    # The fields clients already read, unchanged.
    assert caps["sizes"] == {"default_width": 32, "default_height": 32, "fixed": False, "multiple_of": 8}
    assert caps["id"] and caps["source"] == "StableDiffusionXLPipeline"
    assert caps["paint_with_words"] is True and caps["style_image"] is False
    assert [e["name"] for e in caps["stages"][0]["experts"]] == ["base", "refiner"]
    # What a client may send, with the server's limits.
    assert caps["max_side"] == MAX_SIDE
    assert caps["samplers"] == ["heun", "euler", "dpmpp_2m", "euler_a", "unipc", "ddim", "pndm", "ddpm"]
    assert caps["request"] == {
        "n": {"default": 1, "min": 1, "max": 3},
        # StableDiffusionXLPipeline's own defaults: 50 steps (here within max_steps 40) and guidance 5,
        # with the sampler whose images equal its EulerDiscreteScheduler's (on the Karras schedule).
        "steps": {"default": 40, "min": 1, "max": 40},
        "guidance_scale": {"default": 5.0, "min": 0.0, "max": 50.0, "off_at_or_below": 1.0},
        "seed": {"min": 0, "max": MAX_SEED, "random": -1},
        "sampler": {"default": "euler"},
        "sr_noise_level": None,  # no noise-level SR stage: the field does not apply
        "use_karras_sigmas": {"default": False},  # its folder's EulerDiscreteScheduler samples on its own sigmas
        "strength": {"default": 0.8, "default_with_mask": 0.9999, "min": 0.0, "max": 1.0, "exclusive_min": True},  # with an init_image
    }


def test_models_lists_the_shipped_family_defaults():
    request = asyncio.run(_listed(None))["request"]
    assert request["steps"]["default"] == 32 and request["guidance_scale"]["default"] == 3.0
    assert request["sampler"] == {"default": "heun"}
    assert request["use_karras_sigmas"] is None  # Karras's sigmas only


# ------------------------------------------------------------ model defaults


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        # SDXL's pipeline defaults, on its scheduler's own sigmas
        ({}, {"steps": 50, "guidance_scale": 5.0, "sampler": "euler", "use_karras_sigmas": False}),
        ({"steps": None, "guidance_scale": None, "sampler": None, "use_karras_sigmas": None},
         {"steps": 50, "guidance_scale": 5.0, "sampler": "euler", "use_karras_sigmas": False}),
        # a sampler named: Karras's sigmas unless asked (the model's own are its default configuration)
        ({"steps": 3, "guidance_scale": 0.0, "sampler": "heun"},
         {"steps": 3, "guidance_scale": 0.0, "sampler": "heun", "use_karras_sigmas": True}),
        ({"guidance_scale": 7.5, "use_karras_sigmas": True},
         {"steps": 50, "guidance_scale": 7.5, "sampler": "euler", "use_karras_sigmas": True}),
        ({"sampler": "dpmpp_2m"}, {"sampler": "dpmpp_2m", "use_karras_sigmas": True}),  # "DPM++ 2M Karras"
        ({"sampler": "euler"}, {"sampler": "euler", "use_karras_sigmas": True}),  # as `euler` always meant
        ({"sampler": "dpmpp_2m", "use_karras_sigmas": False}, {"sampler": "dpmpp_2m", "use_karras_sigmas": False}),
    ],
)
def test_fields_left_out_take_the_models_defaults(sdxl_capabilities, path, sent, expected):
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities) as (client, queue), QueueWorker(queue, image_size=32) as worker:
            response = await client.post(path, json={"prompt": "a cat", **sent})
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert {name: job.params[name] for name in expected} == expected

    check()


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("imported", "fields", "words"),
    [
        (False, {"use_karras_sigmas": False}, "Karras schedule only"),
        (True, {"use_karras_sigmas": False, "sampler": "heun"}, "goes with sampler euler, dpmpp_2m, euler_a"),
        (True, {"use_karras_sigmas": True, "sampler": "pndm"}, "its diffusers scheduler's own timesteps"),
        (True, {"use_karras_sigmas": "no"}, "valid boolean"),
    ],
)
def test_use_karras_sigmas_false_where_it_cannot_apply_is_422_naming_it(
    sdxl_capabilities, path, imported, fields, words
):
    @run_async
    async def check() -> None:
        async with api(sdxl_capabilities if imported else None) as (client, queue):
            response = await client.post(path, json={"prompt": "a cat", **fields})
            assert error_locs(response) == [["body", "use_karras_sigmas"]]
            assert words in error_message(response)
            assert await queue.depth() == 0

    check()


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
def test_seed_minus_one_picks_a_random_seed_as_absent_does(path):
    @run_async
    async def check() -> None:
        async with api(None) as (client, queue), QueueWorker(queue) as worker:
            for _attempt in range(2):
                response = await client.post(path, json={"prompt": "a cat", "seed": -1, "n": 2, "steps": 1})
                assert response.status_code == 200, response.text
            if path == "/generate":  # each image's seed is in the answer
                last = worker.claimed[-1].params["seed"]
                assert [image["seed"] for image in response.json()["images"]] == [last, last + 1]
            seeds = [job.params["seed"] for job in worker.claimed]
            assert all(0 <= seed < 2**31 for seed in seeds)
            assert seeds[0] != seeds[1]  # picked per request (a 1 in 2**31 chance of a false failure)

    check()


def test_models_max_side_of_a_fixed_size_model_is_its_size():
    caps = asyncio.run(_listed(None))
    assert caps["sizes"]["fixed"] is True and caps["max_side"] == 64


def test_models_lists_sr_noise_level_of_an_if_model_and_the_api_checks_it(tiny_if, tmp_path):
    """An imported IF cascade: sr_noise_level applies, default 250, within
    [0, 999] (its image-noising schedule's 1000 levels); a level beyond is a
    422 naming it at submission (before: a failed job), a level within is queued."""
    from ediffi.importers.diffusers import import_diffusers

    import_diffusers(tiny_if.stage_1, tmp_path / "if", sr_dir=tiny_if.stage_2)
    if_capabilities = read_capabilities(tmp_path / "if")

    @run_async
    async def check() -> None:
        caps = await _listed(if_capabilities)
        assert caps["request"]["sr_noise_level"] == {"default": 250, "min": 0, "max": 999}
        async with api(if_capabilities) as (client, queue):
            headers = {"Prefer": "respond-async"}
            wrong = await client.post("/generate", json={"prompt": "a cat", "sr_noise_level": 1000}, headers=headers)
            assert error_locs(wrong) == [["body", "sr_noise_level"]]
            ok = await client.post("/generate", json={"prompt": "a cat", "sr_noise_level": 999}, headers=headers)
            assert ok.status_code == 202, ok.text
        async with api(None) as (client, _):  # the shipped family has no such stage
            wrong = await client.post("/generate", json={"prompt": "a cat", "sr_noise_level": 100}, headers=headers)
            assert error_locs(wrong) == [["body", "sr_noise_level"]]

    check()
