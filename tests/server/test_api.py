"""The HTTP API end to end on both queues (in process and a real Redis), with a worker
stand-in driving the real queue API: sync and async generation, job views and images,
Server-Sent Events, cancel, idempotency and the OpenAI-compatible endpoint.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import time

import httpx
from PIL import Image

from ediffi.failure import PUBLIC_MESSAGES, Failure, FailureKind
from server.app import DEFAULT_CANVAS_SIZE
from server.routes import jobs as jobs_routes
from server.schemas import JobParams
from tests.support.api import (  # noqa: F401 - the backend fixture is used by name
    Backend,
    QueueWorker,
    b64,
    backend,
    color_map_png,
    decode_png,
    event_order,
    parse_sse,
    png_bytes,
    run_async,
    service,
)

JOB_PARAM_KEYS = {
    "version",
    "prompt",
    "negative_prompt",
    "n",
    "steps",
    "guidance_scale",
    "seed",
    "sampler",
    "inputs",
    "paint_with_words",
    "sr_noise_level",
    "use_karras_sigmas",
    "response_format",
    "client",
}


async def wait_status(client: httpx.AsyncClient, job_id: str, wanted: set[str], timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        view = response.json()
        if view["status"] in wanted:
            return view
        assert time.monotonic() < deadline, f"job stayed {view['status']}"
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------- generation


@run_async
async def test_sync_generate_returns_png_images_seeds_and_timings(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue):
        response = await svc.client.post("/generate", json={"prompt": "a red fox", "n": 2, "seed": 41, "steps": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "succeeded"
        assert [image["seed"] for image in body["images"]] == [41, 42]
        for image in body["images"]:
            assert decode_png(image["b64_json"]).size == (DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE)
            assert "url" not in image
        timings = body["timings"]
        assert {"queued_at", "started_at", "finished_at", "queue_wait_s", "run_s", "total_s", "sampling_s"} <= set(timings)
        assert timings["total_s"] >= timings["run_s"] >= 0

        # What the worker consumes: the documented params, defaults filled in, nothing big inline.
        record = await svc.queue.get(body["id"])
        assert set(record.params) == JOB_PARAM_KEYS
        params = JobParams.model_validate(record.params)
        assert (params.prompt, params.n, params.steps, params.seed) == ("a red fox", 2, 3, 41)
        assert (params.sampler, params.guidance_scale, params.negative_prompt) == ("heun", 3.0, "")
        assert params.inputs == [] and params.paint_with_words is None


@run_async
async def test_server_picks_a_seed_when_none_is_given_and_reports_each(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue):
        first_seeds = []
        for _ in range(2):
            response = await svc.client.post("/generate", json={"prompt": "a red fox", "n": 3, "steps": 1})
            assert response.status_code == 200, response.text
            seeds = [image["seed"] for image in response.json()["images"]]
            assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2] and seeds[0] >= 0
            # The seed the server picked is recorded with the job (what the worker samples with).
            record = await svc.queue.get(response.json()["id"])
            assert record.params["seed"] == seeds[0]
            first_seeds.append(seeds[0])
        assert first_seeds[0] != first_seeds[1], "each submission gets its own seed"


@run_async
async def test_inputs_travel_as_bytes_and_params_stay_small(backend: Backend) -> None:
    style = png_bytes(16, 16, (0, 255, 0))
    color_map = color_map_png(32)
    request = {
        "prompt": "a Red Circle on the left and a blue square",
        "steps": 2,
        "style_image": "data:image/png;base64," + b64(style),
        "paint_with_words": {
            "color_map": b64(color_map),
            "regions": [
                {"color": "#FF0000", "phrase": "red circle"},
                {"color": "#0000ff", "phrase": "blue square", "strength": 1.5},
            ],
        },
    }
    async with service(backend) as svc:
        response = await svc.client.post("/generate", json=request, headers={"Prefer": "respond-async"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        record = await svc.queue.get(job_id)
        assert record.params["inputs"] == ["color_map", "style_image"]
        assert record.params["paint_with_words"] == {
            "regions": [
                {"color": "#ff0000", "phrase": "red circle", "strength": 0.4},
                {"color": "#0000ff", "phrase": "blue square", "strength": 1.5},
            ]
        }
        assert len(json.dumps(record.params)) < 1000  # no image inline
        assert await svc.queue.load_input(job_id, "style_image") == style
        assert await svc.queue.load_input(job_id, "color_map") == color_map


@run_async
async def test_url_response_format_links_to_downloadable_pngs(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue):
        response = await svc.client.post(
            "/generate", json={"prompt": "a fox", "n": 2, "steps": 1, "response_format": "url"}
        )
        assert response.status_code == 200, response.text
        images = response.json()["images"]
        job_id = response.json()["id"]
        assert [image["url"] for image in images] == [f"/jobs/{job_id}/images/0.png", f"/jobs/{job_id}/images/1.png"]
        for image in images:
            assert "b64_json" not in image
            download = await svc.client.get(image["url"])
            assert download.status_code == 200
            assert download.headers["content-type"] == "image/png"
            assert download.content.startswith(b"\x89PNG")


@run_async
async def test_async_generate_answers_202_then_poll_and_download(backend: Backend) -> None:
    async with service(backend) as svc:
        response = await svc.client.post(
            "/generate", json={"prompt": "a fox", "steps": 2}, headers={"Prefer": "respond-async"}
        )
        assert response.status_code == 202, response.text
        assert response.headers["preference-applied"] == "respond-async"
        body = response.json()
        job_id = body["id"]
        assert body["status"] == "queued"
        assert body["links"] == {
            "self": f"/jobs/{job_id}",
            "events": f"/jobs/{job_id}/events",
            "cancel": f"/jobs/{job_id}/cancel",
        }
        assert response.headers["location"] == f"/jobs/{job_id}"
        queued = (await svc.client.get(f"/jobs/{job_id}")).json()
        assert queued["status"] == "queued" and queued["images"] == [] and queued["error"] is None
        assert (await svc.client.get(f"/jobs/{job_id}/images/0.png")).status_code == 404  # not yet

        async with QueueWorker(svc.queue):
            view = await wait_status(svc.client, job_id, {"succeeded"})
        assert view["progress"] == {"step": 2, "total": 2}
        assert view["images"][0]["url"] == f"/jobs/{job_id}/images/0.png"
        image = await svc.client.get(view["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        assert (await svc.client.get(f"/jobs/{job_id}/images/1.png")).status_code == 404
        assert (await svc.client.get(f"/jobs/{job_id}/images/x.png")).status_code == 404
        assert (await svc.client.get(f"/jobs/{'0' * 32}")).status_code == 404
        assert (await svc.client.get("/jobs/not-a-job:image:0")).status_code == 404
        assert (await svc.client.post(f"/jobs/{'0' * 32}/cancel")).status_code == 404
        assert (await svc.client.get(f"/jobs/{'0' * 32}/events")).status_code == 404


@run_async
async def test_sync_wait_past_the_timeout_answers_202_with_links(backend: Backend) -> None:
    async with service(backend, sync_timeout_s=0.3) as svc:
        response = await svc.client.post("/generate", json={"prompt": "a fox"})
        assert response.status_code == 202
        assert "preference-applied" not in response.headers
        assert response.json()["links"]["self"] == f"/jobs/{response.json()['id']}"
    # Prefer: wait=N shortens the wait: 0.05 s instead of the 10 s sync timeout.
    async with service(backend, sync_timeout_s=10) as svc:
        started = time.monotonic()
        response = await svc.client.post("/generate", json={"prompt": "a fox"}, headers={"Prefer": "wait=0.05"})
        assert response.status_code == 202 and 0.05 <= time.monotonic() - started < 5


@run_async
async def test_failed_jobs_answer_by_failure_kind_with_no_exception_text(backend: Backend) -> None:
    async with service(backend) as svc:
        invalid = Failure.invalid_input("paint_with_words.regions[0].phrase", "phrase was truncated away by the tokenizer")
        async with QueueWorker(svc.queue, mode="fail", failure=invalid):
            response = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "paint_with_words", "regions", 0, "phrase"]

        async with QueueWorker(svc.queue, mode="fail", failure=Failure.of(FailureKind.OUT_OF_MEMORY)):
            response = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1})
            openai = await svc.client.post("/v1/images/generations", json={"prompt": "a fox", "steps": 1})
        assert response.status_code == 503 and response.json()["kind"] == "out_of_memory"
        assert response.headers["Retry-After"]
        assert openai.status_code == 503 and openai.json()["error"]["code"] == "out_of_memory"  # OpenAI's shape
        view = (await svc.client.get(f"/jobs/{response.json()['detail'].split()[1]}")).json()
        assert view["status"] == "failed" and view["failure"]["kind"] == "out_of_memory"
        assert view["error"] == PUBLIC_MESSAGES[FailureKind.OUT_OF_MEMORY]

        async with QueueWorker(svc.queue, mode="fail", failure=Failure.of(FailureKind.INTERNAL)):
            response = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1})
        assert response.status_code == 500 and response.json()["kind"] == "internal"


def test_real_worker_images_equal_the_reference_pipeline_for_the_same_request(backend: Backend, tiny_model) -> None:
    """The real `Worker` (claim -> `build_request` -> engine -> PNG) on a tiny engine,
    behind the API: its images equal `ediffi.pipeline.generate()` for the request
    written out by hand (negative prompt, guidance, sampler, seed, n, style image,
    colour map and regions, a region's default strength) within 2/255."""
    import numpy as np
    import torch

    from ediffi.paint import Region
    from ediffi.pipeline import GenerationRequest, generate
    from engines import Engine, EngineConfig, TorchBackend
    from server.metrics import Metrics
    from server.worker import Worker

    style_pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    style_buffer = io.BytesIO()
    Image.fromarray(style_pixels).save(style_buffer, "PNG")
    style = style_buffer.getvalue()
    color_map = color_map_png(32)  # left half red, right half blue
    body = {
        "prompt": "a red circle on the left and a blue square", "negative_prompt": "a dog",
        "guidance_scale": 4.5, "sampler": "dpmpp_2m", "steps": 3, "seed": 11, "n": 2,
        "style_image": b64(style),
        "paint_with_words": {
            "color_map": b64(color_map),
            "regions": [{"color": "#FF0000", "phrase": "red circle"},
                        {"color": "#0000ff", "phrase": "blue square", "strength": 1.5}],
        },
    }

    async def served_by_the_real_worker(engine: Engine) -> list[np.ndarray]:
        async with service(backend) as svc:
            worker = Worker(svc.settings, svc.queue, engine, Metrics(), worker_id="real-worker")
            worker_task = asyncio.create_task(worker.run())
            try:
                response = await svc.client.post("/generate", json=body)
            finally:
                worker.stop()
                await worker_task
        assert response.status_code == 200, response.text
        images = response.json()["images"]
        assert [image["seed"] for image in images] == [11, 12]
        return [np.asarray(decode_png(image["b64_json"]).convert("RGB"), np.int16) for image in images]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = generate(tiny_model, GenerationRequest(
            prompt=body["prompt"], negative_prompt="a dog", guidance_scale=4.5, sampler="dpmpp_2m", steps=3, seed=11,
            n=2, style_image=Image.open(io.BytesIO(style)), color_map=Image.open(io.BytesIO(color_map)),
            regions=[Region("#ff0000", "red circle"), Region("#0000ff", "blue square", 1.5)],
        ))
        # The reference depends on what the worker must pass on, so the comparison can fail.
        plain = generate(tiny_model, GenerationRequest(prompt=body["prompt"], steps=3, seed=11, sampler="dpmpp_2m"))
        assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(reference[0], np.int16)).max() > 8
        with Engine(TorchBackend(tiny_model, max_batch=8), EngineConfig()) as engine:
            served = asyncio.run(asyncio.wait_for(served_by_the_real_worker(engine), 120))
    finally:
        torch.set_num_threads(previous_threads)
    for image, expected in zip(served, reference, strict=True):
        assert image.shape == np.asarray(expected).shape
        assert np.abs(image - np.asarray(expected, np.int16)).max() <= 2


@run_async
async def test_json_bodies_need_a_json_content_type(backend: Backend) -> None:
    """A form or text body (what ``curl -d`` or a foreign page sends without a preflight) is a 415."""
    body = b'{"prompt":"a red circle on the left","steps":1}'
    async with service(backend) as svc, QueueWorker(svc.queue):
        for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
            headers = {"content-type": content_type} if content_type else {}
            refused = await svc.client.post("/generate", content=body, headers=headers)
            assert refused.status_code == 415, (content_type, refused.text)
            assert "application/json" in refused.json()["detail"]
        # A compressed body is not decoded (a zip bomb's bytes would pass the size cap): 415, not "invalid JSON".
        for encoding in ("gzip", "br", "deflate, gzip"):
            refused = await svc.client.post(
                "/generate", content=gzip.compress(body),
                headers={"content-type": "application/json", "content-encoding": encoding},
            )
            assert refused.status_code == 415, (encoding, refused.text)
            assert "Content-Encoding" in refused.json()["detail"]
        identity = await svc.client.post(
            "/generate", content=body, headers={"content-type": "application/json", "content-encoding": "identity"}
        )
        assert identity.status_code == 200, identity.text
        response = await svc.client.post(
            "/generate", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["b64_json"]


# --------------------------------------------------------------------------- SSE


@run_async
async def test_events_stream_in_order_with_ids_and_resume_after_last_event_id(backend: Backend) -> None:
    async with service(backend) as svc:
        accepted = await svc.client.post(
            "/generate", json={"prompt": "a fox", "steps": 3}, headers={"Prefer": "respond-async"}
        )
        job_id = accepted.json()["id"]
        async with QueueWorker(svc.queue, step_delay_s=0.3):
            response = await svc.client.get(f"/jobs/{job_id}/events")  # ends after the terminal event
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        kinds = [event["event"] for event in events]
        assert kinds[:2] == ["queued", "running"] and kinds[-1] == "succeeded"
        # Which worker runs a job (host name, pid) is the operator's business, not the client's.
        assert "worker" not in events[1]["data"], events[1]
        progress = [event["data"] for event in events if event["event"] == "progress"]
        assert progress and progress[-1] == {"step": 3, "total": 3}
        assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
        assert all(event["id"] for event in events)
        ids = [event_order(event["id"]) for event in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert events[-1]["data"]["images"] == [f"/jobs/{job_id}/images/0.png"]

        # Reconnect after "running": everything after it, nothing before.
        running_id = events[1]["id"]
        resumed = await svc.client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": running_id})
        resumed_events = parse_sse(resumed.text)
        assert resumed_events[0]["event"] != "queued" and resumed_events[-1]["event"] == "succeeded"
        assert all(event_order(event["id"]) > event_order(running_id) for event in resumed_events)

        # Reconnect after the terminal event: the stream ends at once, empty.
        done = await svc.client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": events[-1]["id"]})
        assert done.status_code == 200 and parse_sse(done.text) == []

        for bad_id in ("not-an-id", "1-2-3", "99999999999999999999999-0", "18446744073709551616"):
            bad = await svc.client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad_id})
            assert bad.status_code == 422, bad_id
            assert bad.json()["detail"][0]["loc"] == ["header", "last-event-id"]


@run_async
async def test_progress_events_are_coalesced_to_one_per_250_ms(backend: Backend) -> None:
    """Drives the stream generator itself to time each event as it is produced."""
    async with service(backend) as svc:
        record = await svc.queue.submit({"prompt": "x", "steps": 400, "n": 1, "seed": 0}, {}, 1)
        (job,) = await svc.queue.claim("w", 1)
        await svc.queue.mark_running(job, "w")

        produced: list[float] = []

        async def produce() -> None:
            produced.append(time.monotonic())
            for step in range(1, 121):  # 120 reports, 0.7 s or more
                await svc.queue.progress(record.id, step, 120)
                await asyncio.sleep(0.006)
            await svc.queue.complete(job, [png_bytes()], [0], {})
            produced.append(time.monotonic())

        first = await svc.queue.events(record.id)
        received: list[tuple[float, dict]] = []
        producer = asyncio.create_task(produce())
        async for chunk in jobs_routes._event_stream(svc.queue, record.id, None, first, False):
            for event in parse_sse(chunk):
                received.append((time.monotonic(), event))
        await producer

    progress = [(at, event) for at, event in received if event["event"] == "progress"]
    assert [event["event"] for _, event in received][-1] == "succeeded"
    # 120 reports coalesced to at most one per 250 ms of the producer's measured
    # run (and the last report, flushed with the end).
    producer_s = produced[1] - produced[0]
    assert 1 <= len(progress) <= 2 + producer_s / 0.25, (len(progress), producer_s)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(progress, progress[1:])]
    assert all(gap >= 0.24 for gap in gaps), gaps
    steps = [event["data"]["step"] for _, event in progress]
    assert steps == sorted(steps)
    # Each coalesced event carries the id of the progress report it shows.
    ids = [event_order(event["id"]) for _, event in received]
    assert ids == sorted(ids)


# ------------------------------------------------------------------------ cancel


@run_async
async def test_cancel_a_queued_job_and_a_running_one(backend: Backend) -> None:
    async with service(backend) as svc:
        queued = (await svc.client.post("/generate", json={"prompt": "a"}, headers={"Prefer": "respond-async"})).json()
        response = await svc.client.post(f"/jobs/{queued['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "canceled"
        events = parse_sse((await svc.client.get(f"/jobs/{queued['id']}/events")).text)
        assert [event["event"] for event in events] == ["queued", "canceled"]

        async with QueueWorker(svc.queue, mode="hold") as worker:
            running = (
                await svc.client.post("/generate", json={"prompt": "b", "steps": 1}, headers={"Prefer": "respond-async"})
            ).json()
            await asyncio.wait_for(worker.running.wait(), 5)
            response = await svc.client.post(f"/jobs/{running['id']}/cancel")
            assert response.status_code == 202 and response.json()["status"] == "running"
            view = await wait_status(svc.client, running["id"], {"canceled"})
            assert view["images"] == []
        # Canceling a finished job changes nothing.
        again = await svc.client.post(f"/jobs/{running['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"


@run_async
async def test_a_sync_client_that_disconnects_cancels_its_job(backend: Backend) -> None:
    """A raw ASGI call whose client is gone right after sending the body."""
    async with service(backend) as svc:
        body = json.dumps({"prompt": "a fox"}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/generate",
            "raw_path": b"/generate",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        await svc.app(scope, receive, send)
        assert await svc.queue.depth() == 0  # the only job was canceled, nothing waits for a worker
        canceled = [e for e in await _all_job_events(svc) if e == "canceled"]
        assert canceled == ["canceled"]


async def _all_job_events(svc) -> list[str]:
    from server.queue import InProcessQueue

    if isinstance(svc.queue, InProcessQueue):
        (job_id,) = svc.queue.stored_job_ids()
    else:
        keys = [key async for key in svc.queue.client.scan_iter(match=f"{svc.queue.keys.prefix}job:*:events")]
        (key,) = keys
        job_id = key.decode()[len(svc.queue.keys.prefix) + len("job:") : -len(":events")]
    return [event.type.value for event in await svc.queue.events(job_id)]


# ------------------------------------------------------------------ idempotency


@run_async
async def test_idempotency_key_returns_the_same_job(backend: Backend) -> None:
    async with service(backend) as svc:
        headers = {"Prefer": "respond-async", "Idempotency-Key": "order-123"}
        first = await svc.client.post("/generate", json={"prompt": "a fox"}, headers=headers)
        second = await svc.client.post("/generate", json={"prompt": "a fox"}, headers=headers)
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        assert "idempotent-replayed" not in first.headers and second.headers["idempotent-replayed"] == "true"
        assert await svc.queue.depth() == 1
        submitted = svc.metrics.jobs_submitted._value.get()
        assert submitted == 1

        other = await svc.client.post("/generate", json={"prompt": "a cat"}, headers=headers)
        assert other.status_code == 422
        assert other.json()["detail"][0]["loc"] == ["header", "idempotency-key"]

        # A sync replay of the same key waits for (or returns) the same job's result.
        async with QueueWorker(svc.queue):
            sync = await svc.client.post(
                "/generate", json={"prompt": "a fox"}, headers={"Idempotency-Key": "order-123"}
            )
        assert sync.status_code == 200 and sync.json()["id"] == first.json()["id"]

        bad = await svc.client.post("/generate", json={"prompt": "a fox"}, headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "idempotency-key"]


# ---------------------------------------------------------------------- OpenAI


@run_async
async def test_openai_images_generations(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue):
        response = await svc.client.post(
            "/v1/images/generations",
            json={"prompt": "a fox", "n": 2, "size": "64x64", "response_format": "b64_json", "model": "ediffi",
                  "quality": "standard", "user": "u1", "steps": 2, "seed": 9},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
        assert len(body["data"]) == 2
        for item in body["data"]:
            assert decode_png(item["b64_json"]).size == (64, 64)  # the size asked for

        urls = await svc.client.post("/v1/images/generations", json={"prompt": "a fox", "steps": 1})
        assert urls.status_code == 200, urls.text
        (item,) = urls.json()["data"]
        # Relative without public_base_url: never built from the request's Host header.
        assert item["url"].startswith("/jobs/") and item["url"].endswith("/images/0.png")
        fetched = await svc.client.get(item["url"])
        assert fetched.content.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(fetched.content)).size == (DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE)

        wrong = await svc.client.post("/v1/images/generations", json={"prompt": "a fox", "size": "1024x1024"})
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "size"  # OpenAI's error shape
