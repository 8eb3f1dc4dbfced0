"""Operating the API: API keys and rate limits, a full queue, Redis going down and coming back,
readiness, metrics, the lifespan-owned queue, and no model (no torch) in the API process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.metrics import Metrics
from server.queue import RedisStreamsQueue
from tests.support.redis_server import RedisServerProcess
from tests.support.api import (  # noqa: F401 - the backend fixture is used by name
    QUEUE_LIMITS,
    Backend,
    QueueWorker,
    backend,
    make_settings,
    run_async,
    service,
)

REPO = Path(__file__).resolve().parents[2]
ASYNC = {"Prefer": "respond-async"}


# ------------------------------------------------------------------ API keys


@run_async
async def test_api_keys_401_403_and_both_header_forms(backend: Backend) -> None:
    async with service(backend, api_keys=["key-a", "key-b"]) as svc:
        missing = await svc.client.post("/generate", json={"prompt": "a"}, headers=ASYNC)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await svc.client.post("/generate", json={"prompt": "a"}, headers={**ASYNC, "X-API-Key": "nope"})
        assert wrong.status_code == 403
        assert (await svc.client.get(f"/jobs/{'0' * 32}")).status_code == 401

        bearer = await svc.client.post(
            "/generate", json={"prompt": "a"}, headers={**ASYNC, "Authorization": "Bearer key-a"}
        )
        assert bearer.status_code == 202
        job_id = bearer.json()["id"]
        header = await svc.client.get(f"/jobs/{job_id}", headers={"X-API-Key": "key-a"})
        assert header.status_code == 200
        # Another key does not see this key's jobs.
        other = await svc.client.get(f"/jobs/{job_id}", headers={"X-API-Key": "key-b"})
        assert other.status_code == 404
        assert (await svc.client.post(f"/jobs/{job_id}/cancel", headers={"X-API-Key": "key-b"})).status_code == 404

        for path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
            assert (await svc.client.get(path)).status_code == 200, path
        # /readyz is open too, and answers on readiness, not on the key:
        # no worker heartbeat yet, then one.
        unready = await svc.client.get("/readyz")
        assert unready.status_code == 503, unready.text
        assert unready.json()["reason"] == "no worker heartbeat"
        async with QueueWorker(svc.queue):
            while not await svc.queue.workers_alive():  # its first heartbeat; run_async bounds the wait
                await asyncio.sleep(0.01)
            ready = await svc.client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["workers_alive"] == 1


@run_async
async def test_per_key_rate_limit_answers_429_with_retry_after(backend: Backend) -> None:
    async with service(backend, api_keys=["key-a", "key-b"], rate_limit_per_minute=2) as svc:
        # The window is the calendar minute: start early in one, so that all
        # three calls (well under a second) count in the same window.
        if time.time() % 60 > 57:
            await asyncio.sleep(60.05 - time.time() % 60)
        statuses = []
        for _ in range(3):
            response = await svc.client.post("/generate", json={"prompt": "a"}, headers={**ASYNC, "X-API-Key": "key-a"})
            statuses.append(response.status_code)
        seconds_left = 60 - time.time() % 60
        assert statuses == [202, 202, 429], statuses
        assert seconds_left - 1 <= int(response.headers["retry-after"]) <= seconds_left + 1
        assert "rate limit" in response.json()["detail"]
        other = await svc.client.post("/generate", json={"prompt": "a"}, headers={**ASYNC, "X-API-Key": "key-b"})
        assert other.status_code == 202  # the limit is per key
        # Polling is not rate limited.
        job_id = other.json()["id"]
        for _ in range(4):
            assert (await svc.client.get(f"/jobs/{job_id}", headers={"X-API-Key": "key-b"})).status_code == 200


@run_async
async def test_full_queue_answers_429_with_retry_after(backend: Backend) -> None:
    async with service(backend, max_queue=2) as svc:
        for _ in range(2):
            assert (await svc.client.post("/generate", json={"prompt": "a"}, headers=ASYNC)).status_code == 202
        full = await svc.client.post("/generate", json={"prompt": "a"}, headers=ASYNC)
        assert full.status_code == 429
        assert int(full.headers["retry-after"]) >= 1
        assert "queue full" in full.json()["detail"]
        openai = await svc.client.post("/v1/images/generations", json={"prompt": "a"})
        assert openai.status_code == 429


# -------------------------------------------------------------- Redis outage


@run_async
async def test_redis_down_answers_503_then_recovers(restartable_redis: RedisServerProcess) -> None:
    settings = make_settings(sync_timeout_s=5.0)
    queue = RedisStreamsQueue.from_url(restartable_redis.url, **QUEUE_LIMITS)
    app = create_app(settings, queue=queue, metrics=Metrics())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            accepted = await client.post("/generate", json={"prompt": "a"}, headers=ASYNC)
            assert accepted.status_code == 202

            restartable_redis.stop()
            for method, path, body in [
                ("POST", "/generate", {"prompt": "a"}),
                ("POST", "/v1/images/generations", {"prompt": "a"}),
                ("GET", f"/jobs/{accepted.json()['id']}", None),
                ("GET", f"/jobs/{accepted.json()['id']}/events", None),
            ]:
                response = await client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                body = response.json()
                message = body["error"]["message"] if path.startswith("/v1/") else body["detail"]  # OpenAI's shape
                assert message.startswith("job queue unavailable: ")
                assert int(response.headers["retry-after"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"].startswith("job queue unavailable")
            assert (await client.get("/healthz")).status_code == 200
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "ediffi_queue_up 0.0" in metrics.text

            restartable_redis.start()  # empty (no persistence in tests): the queue rebuilds itself
            async with QueueWorker(queue):
                response = await client.post("/generate", json={"prompt": "a", "steps": 1})
                assert response.status_code == 200, response.text
                assert (await client.get("/readyz")).status_code == 200
    finally:
        await queue.close()


@run_async
async def test_a_hung_redis_answers_503_instead_of_hanging(restartable_redis: RedisServerProcess) -> None:
    # SIGSTOP: connections stay open and nothing answers (a frozen VM, a stuck fork, a full-disk stall).
    settings = make_settings(sync_timeout_s=5.0)
    queue = RedisStreamsQueue.from_url(restartable_redis.url, command_timeout_s=1.0, **QUEUE_LIMITS)
    app = create_app(settings, queue=queue, metrics=Metrics())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            accepted = await client.post("/generate", json={"prompt": "a"}, headers=ASYNC)
            assert accepted.status_code == 202
            job = accepted.json()["id"]
            restartable_redis.pause()
            try:
                for method, path, body in [
                    ("POST", "/generate", {"prompt": "a"}),
                    ("GET", f"/jobs/{job}", None),
                    ("GET", f"/jobs/{job}/events", None),
                ]:
                    started = time.monotonic()
                    response = await asyncio.wait_for(client.request(method, path, json=body), 10)
                    assert response.status_code == 503, (path, response.text)
                    assert int(response.headers["retry-after"]) >= 1
                    assert time.monotonic() - started < 5, path
            finally:
                restartable_redis.resume()
            assert (await client.get(f"/jobs/{job}")).status_code == 200  # and back once it answers
    finally:
        await queue.close()


@contextlib.asynccontextmanager
async def waiting_on_redis(redis_server: RedisServerProcess, sync_timeout_s: float):
    """An API on ``redis_server`` (1/2 s command timeout) and a synchronous ``POST /generate`` whose job
    is queued: yields (client, queue, the request's task)."""
    queue = RedisStreamsQueue.from_url(redis_server.url, command_timeout_s=0.5, **QUEUE_LIMITS)
    app = create_app(make_settings(sync_timeout_s=sync_timeout_s), queue=queue, metrics=Metrics())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            waiting = asyncio.create_task(client.post("/generate", json={"prompt": "a fox", "steps": 2}))
            while await queue.depth() == 0:
                await asyncio.sleep(0.05)
            yield client, queue, waiting
    finally:
        await queue.close()


@run_async
async def test_a_synchronous_request_rides_out_a_redis_blip_after_its_job_was_accepted(
    restartable_redis: RedisServerProcess,
) -> None:
    # The job is in Redis: a 503 mid-wait (no id) made clients resubmit and orphaned the first result.
    async with waiting_on_redis(restartable_redis, sync_timeout_s=30.0) as (_client, queue, waiting):
        await asyncio.sleep(0.3)  # the request is waiting on its job's events
        restartable_redis.pause()
        await asyncio.sleep(2.0)  # several timed-out reads
        restartable_redis.resume()
        async with QueueWorker(queue):
            response = await asyncio.wait_for(waiting, 20)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded" and response.json()["images"][0]["b64_json"]


@run_async
async def test_a_synchronous_request_whose_queue_stays_down_is_told_its_job_id(
    restartable_redis: RedisServerProcess,
) -> None:
    async with waiting_on_redis(restartable_redis, sync_timeout_s=2.0) as (client, _queue, waiting):
        restartable_redis.pause()
        try:
            response = await asyncio.wait_for(waiting, 10)
        finally:
            restartable_redis.resume()
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        job_id = response.headers["location"].removeprefix("/jobs/")
        assert job_id in response.json()["detail"]
        assert (await client.get(f"/jobs/{job_id}")).json()["status"] == "queued"  # nothing was lost


# ------------------------------------------------------- readiness and metrics


@run_async
async def test_metrics_report_how_full_redis_is(restartable_redis: RedisServerProcess) -> None:
    # A Redis at maxmemory refuses every new job: the API's scrape says how close it is, for
    # EdiffiQueueMemoryHigh to warn before.
    import redis.asyncio

    admin = redis.asyncio.Redis.from_url(restartable_redis.url)
    await admin.config_set("maxmemory", str(64 * 1024 * 1024))
    await admin.aclose()
    queue = RedisStreamsQueue.from_url(restartable_redis.url, **QUEUE_LIMITS)
    app = create_app(make_settings(), queue=queue, metrics=Metrics(roles=("api",)))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            families = {f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    finally:
        await queue.close()
    (used,) = families["ediffi_queue_memory_used_bytes"].samples
    (limit,) = families["ediffi_queue_memory_limit_bytes"].samples
    assert limit.value == 64 * 1024 * 1024 and 0 < used.value < limit.value


@run_async
async def test_metrics_report_the_stored_bytes_against_their_budgets(backend: Backend) -> None:
    """Uploads of unfinished jobs and finished jobs' images, each beside its submit budget (429 beyond),
    and the images no longer counted once they expire."""
    async with service(
        backend, max_queued_input_bytes=10_000, max_stored_result_bytes=20_000, result_ttl_s=1
    ) as svc:
        async def stored() -> dict[tuple[str, str], float]:
            families = {f.name: f for f in text_string_to_metric_families((await svc.client.get("/metrics")).text)}
            return {
                (family, sample.labels["kind"]): sample.value
                for family in ("ediffi_queue_stored_bytes", "ediffi_queue_stored_budget_bytes")
                for sample in families[family].samples
            }

        assert await stored() == {
            ("ediffi_queue_stored_bytes", "inputs"): 0, ("ediffi_queue_stored_bytes", "results"): 0,
            ("ediffi_queue_stored_budget_bytes", "inputs"): 10_000,
            ("ediffi_queue_stored_budget_bytes", "results"): 20_000,
        }
        async with QueueWorker(svc.queue):
            done = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1, "response_format": "url"})
            assert done.status_code == 200, done.text
        image = await svc.client.get(done.json()["images"][0]["url"])
        assert (await stored())[("ediffi_queue_stored_bytes", "results")] == len(image.content)
        await asyncio.sleep(1.2)  # past the result TTL
        assert (await stored())[("ediffi_queue_stored_bytes", "results")] == 0


@run_async
async def test_readyz_needs_a_worker_heartbeat(backend: Backend) -> None:
    async with service(backend) as svc:
        response = await svc.client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "workers_alive": 0, "queue_depth": 0,
                                   "reason": "no worker heartbeat"}
        await svc.queue.heartbeat("w1", {"slots": 1})
        response = await svc.client.get("/readyz")
        assert response.status_code == 200
        assert response.json()["status"] == "ready" and response.json()["workers_alive"] == 1
        assert (await svc.client.get("/healthz")).json() == {"status": "ok"}


METRIC_NAMES = [
    "ediffi_http_requests_total",
    "ediffi_http_request_duration_seconds",
    "ediffi_jobs_submitted_total",
    "ediffi_job_latency_seconds",
    "ediffi_queue_wait_seconds",
    "ediffi_queue_depth",
    "ediffi_active_requests",
    "ediffi_batch_size",
    "ediffi_denoiser_forward_seconds",
    "ediffi_images_generated_total",
    "ediffi_jobs_failed_total",
    "ediffi_jobs_completed_total",
    "ediffi_jobs_reclaimed_total",
    "ediffi_worker_heartbeats_total",
    "ediffi_workers_alive",
]


@run_async
async def test_metrics_expose_every_name_with_route_templates_only() -> None:
    async with service(Backend("memory")) as svc:
        job = (await svc.client.post("/generate", json={"prompt": "a"}, headers=ASYNC)).json()
        await svc.client.post("/generate", json={"prompt": "a"}, headers=ASYNC)
        await svc.client.get(f"/jobs/{job['id']}")
        await svc.client.get("/jobs/" + "f" * 32)
        await svc.client.get("/no/such/path")
        await svc.queue.heartbeat("w1", {})
        svc.metrics.batch_size.labels(stage="base", expert="0").observe(4)
        svc.metrics.denoiser_forward.labels(stage="base", expert="0").observe(0.01)
        response = await svc.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        for name in METRIC_NAMES:
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert 'ediffi_http_requests_total{endpoint="/jobs/{job_id}",method="GET",status="200"} 1.0' in text
        assert 'ediffi_http_requests_total{endpoint="/jobs/{job_id}",method="GET",status="404"} 1.0' in text
        assert 'ediffi_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text
        assert 'ediffi_http_requests_total{endpoint="/generate",method="POST",status="202"} 2.0' in text
        assert "ediffi_jobs_submitted_total 2.0" in text
        assert "ediffi_queue_depth 2.0" in text and "ediffi_workers_alive 1.0" in text
        assert job["id"] not in text  # no per-request labels
        assert 'ediffi_jobs_failed_total{reason="max_deliveries"} 0.0' in text


def test_metrics_helpers_bound_failure_reasons_and_sync_queue_counters() -> None:
    from ediffi.failure import Failure, FailureKind
    from server.queue import QueueCounters

    metrics = Metrics()
    metrics.job_failed(Failure.of(FailureKind.OUT_OF_MEMORY))
    metrics.job_failed(Failure.invalid_input("prompt", "too long"))
    text = metrics.render().decode()
    assert 'ediffi_jobs_failed_total{reason="out_of_memory"} 1.0' in text
    assert 'ediffi_jobs_failed_total{reason="invalid_input"} 1.0' in text
    assert 'ediffi_jobs_failed_total{reason="internal"} 0.0' in text
    metrics = Metrics()
    counters = QueueCounters(reclaimed=2, failed_max_deliveries=1)
    metrics.sync_queue_counters(counters)
    counters.reclaimed = 3
    metrics.sync_queue_counters(counters)
    text = metrics.render().decode()
    assert "ediffi_jobs_reclaimed_total 3.0" in text
    assert 'ediffi_jobs_failed_total{reason="max_deliveries"} 1.0' in text


# --------------------------------------------------------- lifespan and import


@run_async
async def test_the_lifespan_opens_and_closes_the_queue_from_settings(redis_url: str, redis_key_prefix: str) -> None:
    for settings, prefix in ((make_settings(), None), (make_settings(redis_url=redis_url), redis_key_prefix)):
        app = create_app(settings, key_prefix=prefix)
        async with app.router.lifespan_context(app):
            queue = app.state.queue
            assert isinstance(queue, RedisStreamsQueue) == bool(settings.redis_url)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.post("/generate", json={"prompt": "a"}, headers=ASYNC)).status_code == 202
        assert app.state.queue is None


def test_the_api_imports_no_torch_and_mounts_static_files_only_if_present(tmp_path: Path) -> None:
    code = (
        "import sys; from server.app import create_app; from server.settings import Settings; "
        "create_app(Settings(api_keys=[], allow_anonymous=True)); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)

    (tmp_path / "index.html").write_text("<h1>eDiff-I</h1>")
    app = create_app(make_settings(), static_dir=tmp_path)

    async def fetch() -> tuple[httpx.Response, ...]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (
                await client.get("/"),
                await client.get("/healthz"),
                await client.get("/generate"),
                await client.delete("/v1/images/generations"),
                await client.get("/no-such-file.js"),
                await client.head("/healthz"),
                await client.head("/readyz"),
                await client.post("/sdapi/v1/extra-single-image", json={}),
            )

    index, health, get_generate, delete_openai, missing, head_health, head_ready, post_unknown = asyncio.run(fetch())
    # A path no route has is 404 whatever the method (A1111's extras, not served; was "405, Allow: GET, HEAD").
    assert post_unknown.status_code == 404, post_unknown.text
    # Load balancers probe with HEAD: the probes answer it as GET (no worker here: not ready).
    assert head_health.status_code == 200 and head_ready.status_code == 503
    assert index.status_code == 200 and "eDiff-I" in index.text
    assert health.status_code == 200
    # An API path with the wrong method is 405 naming the allowed one, not the static mount's 404.
    assert get_generate.status_code == 405 and get_generate.headers["allow"] == "POST", get_generate.text
    assert delete_openai.status_code == 405 and delete_openai.headers["allow"] == "POST"
    assert missing.status_code == 404
