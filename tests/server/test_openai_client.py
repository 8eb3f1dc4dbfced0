"""``/v1/*`` as the official ``openai`` Python client sees it (the peer these endpoints claim
compatibility with), on both queues, through the app in process: its retries, its error
parsing, its nullable fields and ``client.models``.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import httpx2
import openai
import pytest

from ediffi.failure import Failure, FailureKind
from tests.support.api import (  # noqa: F401 - the backend fixture is used by name
    Backend,
    QueueWorker,
    Service,
    backend,
    run_async,
    service,
)

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def openai_client(svc: Service, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """openai-python with its defaults (2 retries), talking to the app in process."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=svc.app))
    async with openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="sk-unused", http_client=http, **options
    ) as client:
        yield client


def jobs_submitted(svc: Service) -> float:
    return svc.metrics.registry.get_sample_value("ediffi_jobs_submitted_total") or 0.0


# ------------------------------------------------------------------ retries


@run_async
async def test_a_sync_wait_that_times_out_is_one_job_not_one_per_client_retry(backend: Backend) -> None:
    # No worker: the job stays queued past the wait (504). openai-python retries every 5xx
    # unless told not to, and sends no Idempotency-Key: each retry was a new job (3 in all).
    async with service(backend, sync_timeout_s=0.2) as svc, openai_client(svc) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert jobs_submitted(svc) == 1


@run_async
async def test_under_an_idempotency_key_the_client_retries_a_timed_out_wait_on_the_same_job(backend: Backend) -> None:
    # With the key a resend is the same job: openai-python's own retries then wait on it again
    # (two retries: three waits of 0.2 s) and the worker's result, when it comes, is the answer.
    async with service(backend, sync_timeout_s=0.2) as svc, openai_client(svc, max_retries=3) as client:
        worker = QueueWorker(svc.queue, step_delay_s=0.05)
        started = asyncio.create_task(client.images.generate(
            prompt="a fox", extra_body={"steps": 8}, extra_headers={"Idempotency-Key": "fox-1"},
        ))
        await asyncio.sleep(0.3)  # the first wait has timed out: 504, which the client may retry
        async with worker:
            result = await asyncio.wait_for(started, 30)
        assert result.data and result.data[0].url
        assert jobs_submitted(svc) == 1 and len(worker.claimed) == 1


@run_async
async def test_a_canceled_job_is_a_conflict_not_a_silent_resubmission(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue, mode="hold") as worker, openai_client(svc) as client:

        async def cancel_every_job() -> None:
            canceled: set[str] = set()
            while True:
                for job in worker.claimed:
                    if job.job_id not in canceled:
                        canceled.add(job.job_id)
                        assert (await svc.client.post(f"/jobs/{job.job_id}/cancel")).status_code == 200
                await asyncio.sleep(0.01)

        canceler = asyncio.create_task(cancel_every_job())
        try:
            with pytest.raises(openai.ConflictError) as caught:
                await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        finally:
            canceler.cancel()
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert jobs_submitted(svc) == 1


@run_async
async def test_a_failed_job_is_reported_once_not_resubmitted(backend: Backend) -> None:
    async with service(backend) as svc, openai_client(svc) as client:
        for kind, status in [(FailureKind.INTERNAL, 500), (FailureKind.OUT_OF_MEMORY, 503)]:
            before = jobs_submitted(svc)
            async with QueueWorker(svc.queue, mode="fail", failure=Failure.of(kind)):
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.images.generate(prompt="a fox", extra_body={"steps": 1})
            assert caught.value.status_code == status
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert jobs_submitted(svc) == before + 1, kind


# ------------------------------------------------------------------- errors


def openai_body(response: Any) -> dict:
    """The error object of an OpenAI-shaped error body, checked to be exactly that shape, with the
    API's own ``detail`` (DESIGN.md's field-level contract) beside it."""
    body = response.json()
    assert "error" in body and "detail" in body, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@run_async
async def test_validation_errors_name_the_field_as_openai_clients_read_them(backend: Backend) -> None:
    async with service(backend) as svc, openai_client(svc, max_retries=0) as client:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await client.images.generate(prompt="a fox", n=0)
        error = caught.value
        assert error.param == "n" and error.code == "greater_than_equal" and error.type == "invalid_request_error"
        assert error.message.startswith("Error code: 422 - ") and "n: Input should be greater than or equal to 1" in (
            error.message
        )
        nested = await svc.client.post(
            "/v1/images/generations",
            json={"prompt": "a fox", "paint_with_words": {"color_map": "x", "regions": [{"color": "red", "phrase": "a"}]}},
        )
        assert nested.status_code == 422
        assert openai_body(nested)["param"] == "paint_with_words.regions[0].color"
        # ... and the API's own field-level detail beside it, as on /generate (DESIGN.md's error contract).
        assert nested.json()["detail"][0]["loc"] == ["body", "paint_with_words", "regions", 0, "color"]
        # /generate keeps FastAPI's field-level format.
        generate = await svc.client.post("/generate", json={"prompt": "a fox", "n": 0})
        assert generate.status_code == 422 and generate.json()["detail"][0]["loc"] == ["body", "n"]


@run_async
async def test_job_outcomes_are_openai_errors_with_the_failure_kind_as_code(backend: Backend) -> None:
    async with service(backend, sync_timeout_s=0.2) as svc, openai_client(svc) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        error = caught.value
        assert error.status_code == 504 and error.code == "timeout" and error.type == "server_error"
        assert "did not finish within 0.2 s; poll /jobs/" in error.message
        assert error.response.headers["location"].startswith("/jobs/")
    async with service(backend) as svc, openai_client(svc) as client:
        async with QueueWorker(svc.queue, mode="fail", failure=Failure.of(FailureKind.OUT_OF_MEMORY)):
            with pytest.raises(openai.InternalServerError) as caught:
                await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        assert caught.value.status_code == 503 and caught.value.code == "out_of_memory"
        assert caught.value.response.headers["retry-after"]


@run_async
async def test_refusals_before_routing_are_openai_errors_on_v1_only(backend: Backend) -> None:
    async with service(backend, api_keys=["k" * 32], allow_anonymous=False) as svc:
        missing = await svc.client.post("/v1/images/generations", json={"prompt": "a fox"})
        assert missing.status_code == 401 and openai_body(missing)["code"] == "invalid_api_key"
        assert "missing API key" in openai_body(missing)["message"]
        wrong = await svc.client.post("/v1/images/generations", json={"prompt": "a"}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403 and openai_body(wrong)["message"] == "invalid API key"
        form = await svc.client.post(
            "/v1/images/generations", content=b"prompt=a", headers={"Authorization": "Bearer " + "k" * 32,
                                                                      "Content-Type": "text/plain"}
        )
        assert form.status_code == 415 and openai_body(form)["code"] == "unsupported_media_type"
        assert form.headers["accept-post"] == "application/json"
        unknown = await svc.client.get("/v1/no-such-thing")
        assert unknown.status_code == 404 and openai_body(unknown)["message"] == "Not Found"
        # Elsewhere, the API's own format.
        assert (await svc.client.post("/generate", json={"prompt": "a"})).json()["detail"].startswith("missing API key")
    async with service(backend, max_inflight_requests=1, sync_timeout_s=0.5) as svc, QueueWorker(svc.queue) as worker:
        worker.mode = "hold"
        waiting = asyncio.create_task(svc.client.post("/v1/images/generations", json={"prompt": "a fox", "steps": 1}))
        await asyncio.wait_for(worker.running.wait(), 5)
        busy = await svc.client.get("/v1/models")
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert openai_body(busy) == {
            "message": "server busy: 1 requests in flight; retry later", "type": "server_error", "param": None,
            "code": "service_unavailable",
        }
        assert (await waiting).status_code == 504


@run_async
async def test_an_unexpected_error_is_a_json_500_in_openai_shape_on_v1(backend: Backend, monkeypatch) -> None:
    """A bug (here the queue raising what it never should) is still an answer the client can parse:
    OpenAI's shape on /v1 (openai-python's InternalServerError with its message), JSON elsewhere;
    nothing of the exception leaks."""
    async with service(backend) as svc:
        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(svc.queue, "submit", broken)
        transport = httpx.ASGITransport(app=svc.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            v1 = await http.post("/v1/images/generations", json={"prompt": "a fox", "steps": 1})
            assert v1.status_code == 500 and openai_body(v1)["type"] == "server_error", v1.text
            own = await http.post("/generate", json={"prompt": "a fox", "steps": 1})
            assert own.status_code == 500 and own.json() == {"detail": "internal server error"}
            assert "secret" not in v1.text + own.text
        http2 = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=svc.app, raise_app_exceptions=False))
        async with openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key="sk-unused", http_client=http2, max_retries=0
        ) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.images.generate(prompt="a fox", extra_body={"steps": 1})
            assert caught.value.status_code == 500 and caught.value.type == "server_error"  # its parsed error object


# ------------------------------------------------------------ nullable fields


@run_async
async def test_null_for_a_field_with_a_default_means_the_default(backend: Backend) -> None:
    # openai-python sends JSON null for an explicit None (n: Optional[int], response_format: Optional[...]).
    async with service(backend) as svc, QueueWorker(svc.queue) as worker, openai_client(svc) as client:
        images = await client.images.generate(
            prompt="a fox", n=None, response_format=None, extra_body={"steps": 1, "negative_prompt": None}
        )
        (image,) = images.data  # n's default
        assert image.url is not None and image.url.endswith("/images/0.png")  # the OpenAI default, url
        assert (worker.claimed[0].params["n"], worker.claimed[0].params["negative_prompt"]) == (1, "")
        nulls = {key: None for key in ("n", "negative_prompt", "guidance_scale", "sampler", "response_format", "seed")}
        generate = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1, **nulls})
        assert generate.status_code == 200, generate.text
        (made,) = generate.json()["images"]
        assert "b64_json" in made  # /generate's default
        params = worker.claimed[1].params
        assert (params["guidance_scale"], params["sampler"]) == (3.0, "heun")
        # Null is not a value for a field without a default.
        assert (await svc.client.post("/generate", json={"prompt": None})).status_code == 422


def test_openapi_shows_nullable_defaults_keeping_their_limits() -> None:
    from server.app import create_app
    from tests.support.api import make_settings

    components = create_app(make_settings(max_n=4), static_dir=None).openapi()["components"]["schemas"]
    for model in ("GenerateRequest", "OpenAIImagesRequest"):
        n = components[model]["properties"]["n"]
        assert n["anyOf"] == [{"type": "integer", "minimum": 1}, {"type": "null"}] and n["default"] == 1
        assert n["maximum"] == 4
        assert {"type": "null"} in components[model]["properties"]["response_format"]["anyOf"]
    assert components["PaintRegion"]["properties"]["strength"]["default"] == 0.4
    assert {"type": "null"} in components["PaintRegion"]["properties"]["strength"]["anyOf"]
    assert {"type": "null"} not in components["GenerateRequest"]["properties"]["prompt"].get("anyOf", [])


# ------------------------------------------------------------ fields it cannot honour


@run_async
async def test_fields_it_cannot_honour_are_refused_naming_them(backend: Backend) -> None:
    async with service(backend) as svc, openai_client(svc, max_retries=0) as client:
        with pytest.raises(openai.UnprocessableEntityError) as caught:  # diffusers' name: it was silently dropped
            await client.images.generate(prompt="a fox", extra_body={"num_inference_steps": 4})
        assert caught.value.param == "num_inference_steps" and caught.value.code == "extra_forbidden"
        assert "use 'steps'" in caught.value.message
        with pytest.raises(openai.UnprocessableEntityError) as caught:  # it returned a PNG
            await client.images.generate(prompt="a fox", output_format="jpeg")
        assert caught.value.param == "output_format" and "only PNG" in caught.value.message
        for field, value in [("stream", True), ("background", "transparent"), ("output_compression", 50)]:
            response = await svc.client.post("/v1/images/generations", json={"prompt": "a fox", field: value})
            assert response.status_code == 422, (field, response.text)
            assert openai_body(response)["param"] == field
        with pytest.raises(openai.NotFoundError) as caught:  # a model id this server does not have
            await client.images.generate(prompt="a fox", model="ediffi-xl")
        assert caught.value.param == "model" and caught.value.code == "model_not_found"
        assert "'ediffi'" in caught.value.message
        assert jobs_submitted(svc) == 0


@run_async
async def test_openai_fields_that_do_not_change_the_image_are_accepted(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue), openai_client(svc) as client:
        images = await client.images.generate(
            prompt="a fox", model="ediffi", quality="hd", style="vivid", user="u1", moderation="low",
            background="auto", output_format="png", response_format="b64_json", extra_body={"steps": 1, "stream": False},
        )
        assert len(images.data) == 1 and images.data[0].b64_json
        # Code written for OpenAI names OpenAI's image models: it runs unchanged, on the served model.
        for name in ("dall-e-2", "dall-e-3", "gpt-image-1"):
            images = await client.images.generate(prompt="a fox", model=name, response_format="b64_json",
                                                  extra_body={"steps": 1})
            assert images.data[0].b64_json, name


# ------------------------------------------------------------------- models


@run_async
async def test_models_list_and_retrieve_as_openai_clients_read_them(tmp_path: Any) -> None:
    from server.main import capabilities

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shipped = json.loads((REPO / "models" / "default" / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**shipped, "name": "ediffi"}))  # read at start, as serve does
    os.utime(model_dir / "model.json", (1_700_000_000, 1_700_000_000))
    served = capabilities(model_dir)
    async with service(Backend("memory"), capabilities=served) as svc, openai_client(svc, max_retries=0) as client:
        listed = [model async for model in client.models.list()]
        assert [(m.id, m.object, m.created, m.owned_by) for m in listed] == [
            ("ediffi", "model", 1_700_000_000, "ediffi-serving")
        ]
        model = await client.models.retrieve("ediffi")
        assert (model.id, model.created, model.owned_by) == ("ediffi", 1_700_000_000, "ediffi-serving")
        assert model.model_extra["capabilities"] == listed[0].model_extra["capabilities"]
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("dall-e-3")
        assert caught.value.code == "model_not_found" and "'ediffi'" in caught.value.message


def test_openapi_says_what_an_image_url_is() -> None:
    from server.app import create_app
    from tests.support.api import make_settings

    schema = create_app(make_settings(), static_dir=None).openapi()
    described = schema["components"]["schemas"]["OpenAIImagesRequest"]["properties"]["response_format"]["description"]
    # It said "absolute links": they are relative unless EDIFFI_PUBLIC_BASE_URL is set, and need the API key.
    assert "absolute links" not in described
    assert "relative unless" in described and "EDIFFI_PUBLIC_BASE_URL" in described and "API key" in described
