"""``/sdapi/v1/*``: what a tool written for AUTOMATIC1111's API sends and reads (its web UI's txt2img
payload, its sampler and scheduler names, ``{images, parameters, info}``), on both queues, through
the app in process with a worker playing the engine."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from ediffi.capabilities import ModelCapabilities
from server.main import capabilities as read_capabilities
from tests.support.api import (  # noqa: F401 - the backend fixture is used by name
    Backend,
    QueueWorker,
    backend,
    run_async,
    service,
)

#: What A1111's web UI (1.9+) posts for a plain txt2img, less the fields this server refuses.
WEBUI_PAYLOAD: dict[str, Any] = {
    "prompt": "a red circle on the left", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler",
    "scheduler": "Automatic", "batch_size": 2, "n_iter": 1, "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0,
    "denoising_strength": 0.7, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "comments": {}, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_prompt": "",
    "hr_negative_prompt": "", "sampler_index": "Euler", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {},
}


@pytest.fixture(scope="module")
def sdxl_capabilities(imported_sdxl_dir) -> ModelCapabilities:
    return read_capabilities(imported_sdxl_dir)


@run_async
async def test_the_web_uis_payload_answers_in_a1111s_shape(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue) as worker:
        response = await svc.client.post("/sdapi/v1/txt2img", json=WEBUI_PAYLOAD)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"images", "parameters", "info"}
        images = [Image.open(io.BytesIO(base64.b64decode(image))) for image in body["images"]]
        assert [image.size for image in images] == [(64, 64), (64, 64)]
        assert body["parameters"]["prompt"] == WEBUI_PAYLOAD["prompt"]
        info = json.loads(body["info"])
        (job,) = worker.claimed
        seed = job.params["seed"]
        assert 0 <= seed < 2**31 and info["seed"] == seed and info["all_seeds"] == [seed, seed + 1]
        assert info["infotexts"][1] == (
            f"a red circle on the left\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: {seed + 1}, Size: 64x64, "
            f"Model: {info['sd_model_name']}"
        )
        # batch_size x n_iter images, cfg_scale as the guidance; the shipped family has Karras's sigmas only
        assert {k: job.params[k] for k in ("n", "steps", "guidance_scale", "sampler", "use_karras_sigmas")} == {
            "n": 2, "steps": 3, "guidance_scale": 7.0, "sampler": "euler", "use_karras_sigmas": True,
        }


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"sampler_name": "Euler"}, ("euler", False)),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, ("euler", True)),
        ({"sampler_name": "DPM++ 2M"}, ("dpmpp_2m", False)),
        ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, ("dpmpp_2m", True)),
        ({"sampler_name": "DPM++ 2M Karras"}, ("dpmpp_2m", True)),
        ({"sampler_name": "Heun"}, ("heun", True)),
        ({"sampler_index": "DPM++ 2M Karras"}, ("dpmpp_2m", True)),  # A1111's older field name
        ({}, ("euler", False)),  # none named: the model's default (SDXL's Euler as loaded)
        ({"scheduler": "Karras"}, ("euler", True)),  # the model's sampler on Karras's sigmas
    ],
)
def test_a1111_sampler_and_scheduler_names_pick_the_sampler_and_its_sigmas(sdxl_capabilities, fields, expected):
    @run_async
    async def check() -> None:
        async with service(Backend("memory"), sdxl_capabilities) as svc, QueueWorker(svc.queue, image_size=32) as worker:
            body = {"prompt": "a cat", "steps": 2, "cfg_scale": 5, **fields}
            response = await svc.client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 200, response.text
            (job,) = worker.claimed
            assert (job.params["sampler"], job.params["use_karras_sigmas"]) == expected

    check()


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"sampler_name": "DPM++ SDE"}, "sampler_name", "not served"),
        ({"sampler_name": "DDIM"}, "sampler_name", "imported checkpoint"),  # the shipped model has no timesteps
        ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, "scheduler", "Automatic or Karras"),
        ({"scheduler": "Exponential"}, "scheduler", "Automatic or Karras"),  # with no sampler named too
        ({"enable_hr": True}, "enable_hr", "hires fix"),
        ({"restore_faces": True}, "restore_faces", "face restoration"),
        ({"styles": ["cinematic"]}, "styles", "styles"),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", "not supported"),
        ({"subseed_strength": 0.3}, "subseed_strength", "variation seeds"),
        ({"clip_skip": 2}, "clip_skip", "Extra inputs are not permitted"),
        ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned.safetensors [6ce0161689]"}},
         "override_settings.sd_model_checkpoint", "serves"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers",
         "not supported"),
        ({"cfg_scale": 100}, "cfg_scale", "less than or equal to 50"),
        ({"batch_size": 5, "n_iter": 2}, "batch_size", "less than or equal to"),  # n = 10 > EDIFFI_MAX_N
        ({"prompt": ""}, "prompt", ""),
        ({"seed": -2}, "seed", ""),
    ],
)
def test_what_cannot_be_honoured_is_422_naming_the_a1111_field(fields, field, words):
    @run_async
    async def check() -> None:
        async with service(Backend("memory")) as svc:
            response = await svc.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, **fields})
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert [error["loc"] for error in detail] == [["body", *field.split(".")]], detail
            assert words in detail[0]["msg"]
            assert await svc.queue.depth() == 0

    check()


@run_async
async def test_override_settings_naming_the_served_checkpoint_are_accepted(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue):
        (model,) = (await svc.client.get("/sdapi/v1/sd-models")).json()
        for served in (model["title"], f"{model['title']}.safetensors [0123abcd]"):
            body = {"prompt": "a cat", "steps": 1, "override_settings": {"sd_model_checkpoint": served,
                                                                        "CLIP_stop_at_last_layers": 1}}
            assert (await svc.client.post("/sdapi/v1/txt2img", json=body)).status_code == 200


@run_async
async def test_samplers_schedulers_and_models_are_listed(backend: Backend) -> None:
    async with service(backend) as svc:
        samplers = (await svc.client.get("/sdapi/v1/samplers")).json()
        # the shipped model's: DDIM and PLMS are for imported checkpoints
        assert [s["name"] for s in samplers] == ["Euler", "DPM++ 2M", "DPM++ 2M Karras", "Euler a", "Heun"]
        assert [s["label"] for s in (await svc.client.get("/sdapi/v1/schedulers")).json()] == ["Automatic", "Karras"]
        (model,) = (await svc.client.get("/sdapi/v1/sd-models")).json()
        assert model["model_name"] == model["title"] and model["filename"] == ""  # no server paths
        options = (await svc.client.get("/sdapi/v1/options")).json()
        assert options["sd_model_checkpoint"] == model["title"] and options["CLIP_stop_at_last_layers"] == 1


@run_async
async def test_progress_and_interrupt_follow_the_callers_own_wait(backend: Backend) -> None:
    keys = {"a": {"Authorization": "Bearer key-a"}, "b": {"Authorization": "Bearer key-b"}}
    async with service(backend, api_keys=["key-a", "key-b"], allow_anonymous=False, sync_timeout_s=20) as svc, \
            QueueWorker(svc.queue, step_delay_s=0.05):
        async def progress(caller: str) -> dict[str, Any]:
            response = await svc.client.get("/sdapi/v1/progress", headers=keys[caller])
            assert response.status_code == 200, response.text
            return response.json()

        assert (await progress("a"))["state"]["job_count"] == 0  # idle
        waiting = asyncio.create_task(
            svc.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 40}, headers=keys["a"])
        )
        for _ in range(200):
            polled = await progress("a")
            if polled["state"]["sampling_step"] >= 2:
                break
            await asyncio.sleep(0.02)
        assert 0 < polled["progress"] < 1 and polled["state"]["sampling_steps"] == 40 and polled["eta_relative"] > 0
        assert (await progress("b"))["state"]["job_count"] == 0  # b sees nothing of a's job
        assert (await svc.client.post("/sdapi/v1/interrupt", headers=keys["b"])).status_code == 200
        await asyncio.sleep(0.2)
        assert (await progress("a"))["state"]["job_count"] == 1  # b's interrupt stopped nothing of a's
        assert (await svc.client.post("/sdapi/v1/interrupt", headers=keys["a"])).status_code == 200
        assert (await asyncio.wait_for(waiting, 10)).status_code == 409  # a's own interrupt cancels its job
        assert (await progress("a"))["state"]["job_count"] == 0


@run_async
async def test_progress_and_interrupt_answer_on_every_api_replica(redis_url, redis_key_prefix) -> None:
    """Two API replicas on one Redis (as deploy/k8s/api.yaml runs 2): a txt2img waiting on the first is
    the progress a poll on the second reports, and the second's interrupt cancels it. (Before, each
    replica knew only its own waits: the second answered idle and interrupted nothing.)"""
    backend = Backend("redis", redis_url=redis_url, key_prefix=redis_key_prefix)
    keys = {"Authorization": "Bearer key-a"}
    settings = dict(api_keys=["key-a"], allow_anonymous=False, sync_timeout_s=20)
    async with service(backend, **settings) as first, service(backend, **settings) as second, \
            QueueWorker(first.queue, step_delay_s=0.05):
        waiting = asyncio.create_task(
            first.client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 40}, headers=keys)
        )
        for _ in range(200):
            polled = (await second.client.get("/sdapi/v1/progress", headers=keys)).json()
            if polled["state"]["sampling_step"] >= 2:
                break
            await asyncio.sleep(0.02)
        assert polled["state"]["job_count"] == 1 and 0 < polled["progress"] < 1, polled
        assert (await second.client.post("/sdapi/v1/interrupt", headers=keys)).status_code == 200
        assert (await asyncio.wait_for(waiting, 10)).status_code == 409
        assert (await second.client.get("/sdapi/v1/progress", headers=keys)).json()["state"]["job_count"] == 0
