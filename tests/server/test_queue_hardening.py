"""The queue under a hostile client or a failing Redis (issue 19 items 3, 6, 7, 13), on real
redis-servers: byte budget and per-key cap enforced atomically at submit, TTLs on everything an
unfinished job stores, Redis error replies as 503, crash attribution, dead consumers removed,
the Redis clock for the rate window, and vanished jobs ending with a terminal answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator
from unittest import mock

import httpx
import pytest
import redis

from ediffi.failure import FailureKind
from server.queue import QueueFull, QueueUnavailable, RedisStreamsQueue
from tests.support.redis_server import RedisServerProcess
from tests.support.api import Backend as ApiBackend
from tests.support.api import QueueWorker, backend, service  # noqa: F401 - backend is a fixture
from tests.server.test_queue_contract import DEFAULT_LIMITS, PNG_A, run_async

STYLE = b"\x89PNG" + b"\x00" * 3996  # 4000 bytes of "upload"


def open_queue(url: str, prefix: str, **limits: Any) -> RedisStreamsQueue:
    return RedisStreamsQueue.from_url(url, prefix=prefix, **{**DEFAULT_LIMITS, **limits})


async def submit(queue: RedisStreamsQueue, inputs: dict[str, bytes] | None = None, **kwargs: Any):
    return await queue.submit({"prompt": "a red fox", "n": 1}, inputs or {}, 1, **kwargs)


async def outcomes(calls) -> tuple[list[Any], list[QueueFull]]:
    """Run submissions concurrently: (records accepted, QueueFull raised)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, QueueFull):
            raise result
    return [r for r in results if not isinstance(r, BaseException)], [r for r in results if isinstance(r, QueueFull)]


# ------------------------------------------------------------- item 3: memory


@run_async
async def test_the_input_byte_budget_is_enforced_atomically_and_given_back_when_a_job_ends(
    redis_url: str, redis_key_prefix: str
) -> None:
    """Before: no budget, all six 4 kB uploads were stored."""
    queue = open_queue(redis_url, redis_key_prefix, max_input_bytes=10_000)
    try:
        accepted, refused = await outcomes(submit(queue, {"style_image": STYLE}) for _ in range(6))
        assert len(accepted) == 2 and len(refused) == 4
        assert {error.limit for error in refused} == {"inputs"} and refused[0].retry_after_s > 0
        assert int(await queue.client.get(queue.keys.input_bytes)) == 8000
        await submit(queue)  # a job without uploads costs no budget
        await queue.cancel(accepted[0].id)  # ending a job gives its bytes back
        assert int(await queue.client.get(queue.keys.input_bytes)) == 4000
        await submit(queue, {"style_image": STYLE})
        job = (await queue.claim("w1", max_jobs=1))[0]
        assert await queue.complete(job, [PNG_A], [1], {})
        assert int(await queue.client.get(queue.keys.input_bytes)) == 4000
    finally:
        await queue.close()


@run_async
async def test_everything_an_unfinished_job_stores_expires_with_its_age_limit(
    redis_url: str, redis_key_prefix: str
) -> None:
    """Before: the inputs, hash, events and Idempotency-Key of a queued job had no TTL
    (the key one of 1 h, shorter than the job could wait)."""
    age_s, result_ttl_s = 600.0, 60.0
    queue = open_queue(redis_url, redis_key_prefix, max_job_age_s=age_s, result_ttl_s=result_ttl_s)
    try:
        record = await submit(queue, {"style_image": STYLE}, idempotency_key="k1")
        keys = queue.keys
        stored = [keys.job(record.id), keys.job_events(record.id), keys.job_input(record.id, "style_image"),
                  keys.idempotency("k1")]
        for key in stored:
            ttl_ms = await queue.client.pttl(key)
            assert result_ttl_s * 1000 < ttl_ms <= age_s * 1000, (key, ttl_ms)
        job = (await queue.claim("w1", max_jobs=1))[0]
        await queue.mark_running(job, "w1")
        assert await queue.client.pttl(keys.job(record.id)) > result_ttl_s * 1000  # running: still its age
        assert await queue.complete(job, [PNG_A], [1], {})
        for key in (keys.job(record.id), keys.job_events(record.id), keys.idempotency("k1")):
            assert 0 < await queue.client.pttl(key) <= result_ttl_s * 1000, key
        assert not await queue.client.exists(keys.job_input(record.id, "style_image"))
    finally:
        await queue.close()


@run_async
async def test_a_job_that_outlives_its_age_gives_its_budget_back(redis_url: str, redis_key_prefix: str) -> None:
    queue = open_queue(redis_url, redis_key_prefix, max_input_bytes=5000, max_job_age_s=0.3)
    try:
        first = await submit(queue, {"style_image": STYLE})
        with pytest.raises(QueueFull):
            await submit(queue, {"style_image": STYLE})
        await asyncio.sleep(0.5)
        assert await queue.get(first.id) is None  # expired unfinished
        await submit(queue, {"style_image": STYLE})  # its 4000 bytes were given back
        assert int(await queue.client.get(queue.keys.input_bytes)) == 4000
    finally:
        await queue.close()


# ---------------------------------------------------------- item 6: fairness


@run_async
async def test_one_key_cannot_fill_the_queue(backend: ApiBackend) -> None:
    """The issue's case: max_queue 4, key A sends 5 at once, then key B submits. Before: A took
    all four places and B got 429. (Both queue implementations.)"""
    async with service(backend, api_keys=["key-a", "key-b"], max_queue=4, max_unfinished_per_key=2) as svc:
        async def post(key: str) -> httpx.Response:
            return await svc.client.post(
                "/generate", json={"prompt": "a fox", "steps": 1},
                headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async"},
            )

        answers = await asyncio.gather(*(post("key-a") for _ in range(5)))
        assert sorted(a.status_code for a in answers) == [202, 202, 429, 429, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and "this caller" in refused.json()["detail"]
        assert [(await post("key-b")).status_code for _ in range(2)] == [202, 202]
        first_of_a = next(a for a in answers if a.status_code == 202).json()["id"]
        await svc.client.post(f"/jobs/{first_of_a}/cancel", headers={"Authorization": "Bearer key-a"})
        assert (await post("key-a")).status_code == 202  # a finished job frees its place


@run_async
async def test_results_over_their_budget_are_429_with_retry_after_until_they_expire(backend: ApiBackend) -> None:
    """Finished jobs' PNGs are held for result_ttl_s; past max_stored_result_bytes new work is refused
    (429, Retry-After) rather than Redis filling up, and the stored images stay downloadable."""
    async with service(backend, max_stored_result_bytes=64, result_ttl_s=3) as svc, QueueWorker(svc.queue):
        done = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1, "response_format": "url"})
        assert done.status_code == 200, done.text  # one 64 px PNG: over 64 bytes
        refused = await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1})
        assert refused.status_code == 429 and "stored results over budget" in refused.json()["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 4
        assert (await svc.client.get(done.json()["images"][0]["url"])).status_code == 200
        await asyncio.sleep(int(refused.headers["Retry-After"]) + 0.5)
        assert (await svc.client.post("/generate", json={"prompt": "a fox", "steps": 1})).status_code == 200


@run_async
async def test_one_anonymous_address_cannot_fill_every_anonymous_callers_budget(backend: ApiBackend) -> None:
    # Without keys, callers are told apart by address (as the rate limit does); they used to share one budget.
    async with service(backend, api_keys=[], allow_anonymous=True, max_queue=16, max_unfinished_per_key=2) as svc:
        async def post(address: str) -> httpx.Response:
            transport = httpx.ASGITransport(app=svc.app, client=(address, 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return await client.post(
                    "/generate", json={"prompt": "a fox", "steps": 1}, headers={"Prefer": "respond-async"}
                )

        assert [(await post("10.5.0.1")).status_code for _ in range(3)] == [202, 202, 429]
        assert [(await post("10.5.0.2")).status_code for _ in range(2)] == [202, 202]


@run_async
async def test_anonymous_idempotency_keys_are_scoped_to_the_client_address(backend: ApiBackend) -> None:
    # As a key's are to the key: another address reusing the key gets its own job, not the first one's
    # (nor a 422 telling it that the key exists with another body).
    async with service(backend, api_keys=[], allow_anonymous=True) as svc:
        async def post(address: str, prompt: str) -> httpx.Response:
            transport = httpx.ASGITransport(app=svc.app, client=(address, 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return await client.post(
                    "/generate", json={"prompt": prompt, "steps": 1},
                    headers={"Prefer": "respond-async", "Idempotency-Key": "order-17"},
                )

        first = await post("10.6.0.1", "a fox")
        replay = await post("10.6.0.1", "a fox")
        assert replay.json()["id"] == first.json()["id"] and replay.headers.get("Idempotent-Replayed") == "true"
        other = await post("10.6.0.2", "a fox")
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
        assert "Idempotent-Replayed" not in other.headers
        assert (await post("10.6.0.3", "a dog")).status_code == 202


# ------------------------------------------------------ item 7: error replies


@pytest.fixture
def tiny_redis() -> AsyncIterator[RedisServerProcess]:
    """A real Redis with 2 MB of memory and no eviction: writes past it answer OOM."""
    server = RedisServerProcess(extra_args=("--maxmemory", "2mb", "--maxmemory-policy", "noeviction"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def fill(url: str) -> None:
    """Write small values until Redis refuses one, then keep it full: a closing connection frees
    a few kB, so the limit is lowered to what the data alone takes (with noeviction, nothing goes)."""
    client = redis.Redis.from_url(url)
    try:
        for k in range(100_000):
            client.set(f"ballast:{k}", b"\x00" * 1000)
    except redis.exceptions.OutOfMemoryError:
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))
        return
    finally:
        client.close()
    raise AssertionError("Redis never ran out of memory")


@run_async
async def test_redis_out_of_memory_is_503_for_the_api_and_a_retry_for_the_queue(tiny_redis) -> None:
    """Before: the OOM reply was a ResponseError; the API answered 500."""
    backend = ApiBackend("redis", redis_url=tiny_redis.url, key_prefix="oom:")
    async with service(backend) as svc:
        fill(tiny_redis.url)
        response = await svc.client.post("/generate", json={"prompt": "a fox"}, headers={"Prefer": "respond-async"})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and str(tiny_redis.port) not in response.text
        with pytest.raises(QueueUnavailable, match="out of memory"):  # what the worker sees and logs
            await svc.queue.claim("w1", max_jobs=1, block_ms=10)


@run_async
async def test_a_read_only_replica_is_503(restartable_redis: RedisServerProcess) -> None:
    """After a failover the old primary answers READONLY. Before: 500."""
    replica = RedisServerProcess()
    replica.start()
    try:
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", restartable_redis.port)
        client.close()
        backend = ApiBackend("redis", redis_url=replica.url, key_prefix="ro:")
        async with service(backend) as svc:
            response = await svc.client.post(
                "/generate", json={"prompt": "a fox"}, headers={"Prefer": "respond-async"}
            )
            assert response.status_code == 503, response.text
            with pytest.raises(QueueUnavailable, match="read-only"):
                await svc.queue.submit({"prompt": "a fox"}, {}, 1)
    finally:
        replica.cleanup()


# ------------------------------------------------------------ item 13: gaps


@run_async
async def test_a_crash_counts_only_against_a_job_its_worker_held_alone(redis_url: str, redis_key_prefix: str) -> None:
    """A worker dies holding a poison job and two innocent ones. The shared crash is charged to
    nobody; each job is handed out alone next (so the next crash has one suspect); the innocent
    ones complete and the poison one fails after max_deliveries crashes of its own. Before: the
    crash counted a delivery against all three, and one more crash failed them all."""
    queue = open_queue(redis_url, redis_key_prefix, claim_timeout_s=0.1, max_deliveries=2)
    settle = 0.2  # > claim_timeout_s: the holder's deliveries look abandoned
    try:
        jobs = [await submit(queue) for _ in range(3)]
        assert len(await queue.claim("dead-1", max_jobs=3)) == 3  # dies holding all three
        await asyncio.sleep(settle)
        alone = [await queue.claim(worker, max_jobs=3) for worker in ("w-a", "w-b", "w-c")]
        assert [len(claimed) for claimed in alone] == [1, 1, 1], alone
        assert all(claimed[0].exclusive and claimed[0].deliveries == 2 for claimed in alone)
        poison, *innocent = [claimed[0] for claimed in alone]
        for job in innocent:
            assert await queue.complete(job, [PNG_A], [1], {})
        await asyncio.sleep(settle)  # w-a dies holding the poison job alone: charged
        again = await queue.claim("w-d", max_jobs=3)
        assert [job.job_id for job in again] == [poison.job_id] and again[0].deliveries == 3
        await asyncio.sleep(settle)  # and again: its second crash of its own reaches the limit
        assert await queue.claim("w-e", max_jobs=3) == []
        records = {job.id: await queue.get(job.id) for job in jobs}
        assert records[poison.job_id].failure.kind == FailureKind.MAX_DELIVERIES
        assert [records[job.job_id].status.value for job in innocent] == ["succeeded", "succeeded"]
    finally:
        await queue.close()


@run_async
async def test_dead_consumers_are_removed_from_the_group(redis_url: str, redis_key_prefix: str) -> None:
    """Before: every worker that ever lived stayed a consumer of the group."""
    queue = open_queue(redis_url, redis_key_prefix, claim_timeout_s=0.1)
    try:
        for worker in ("dead-worker", "live-worker"):  # each ran a job and holds nothing now
            await submit(queue)
            job = (await queue.claim(worker, max_jobs=1))[0]
            assert await queue.complete(job, [PNG_A], [1], {})
        await queue.heartbeat("live-worker", {})  # only one of them is still alive
        await asyncio.sleep(0.2)
        await queue.claim("live-worker", max_jobs=1)
        consumers = await queue.client.xinfo_consumers(queue.keys.jobs_stream, queue.keys.consumer_group)
        assert [c["name"].decode() for c in consumers] == ["live-worker"]
    finally:
        await queue.close()


@run_async
async def test_the_rate_window_is_redis_s_minute_not_the_api_host_s(redis_url: str, redis_key_prefix: str) -> None:
    """An API host whose clock is an hour off counts in the same window as the others.
    Before: each host used its own clock, so a skewed replica had a window of its own."""
    queue = open_queue(redis_url, redis_key_prefix)
    try:
        assert await queue.rate_limit("k", 2)
        with mock.patch("time.time", return_value=time.time() + 3600):  # the skewed host
            assert await queue.rate_limit("k", 2)
            assert not await queue.rate_limit("k", 2)
        redis_minute = int((await queue.client.time())[0]) // 60
        assert int(await queue.client.get(queue.keys.rate("k", redis_minute))) == 3
    finally:
        await queue.close()


@run_async
async def test_a_job_whose_data_vanished_ends_the_sync_wait_and_the_event_stream(
    redis_url: str, redis_key_prefix: str
) -> None:
    """Redis restarted without AOF (its data gone) while clients wait. Before: the sync call
    answered 202 for a job that no longer exists, and the event stream ended with no final event."""
    backend = ApiBackend("redis", redis_url=redis_url, key_prefix=redis_key_prefix)
    async with service(backend, sync_timeout_s=10) as svc:
        async with QueueWorker(svc.queue, mode="hold", heartbeat=True) as worker:
            sync_call = asyncio.create_task(svc.client.post("/generate", json={"prompt": "a fox", "steps": 2}))
            await asyncio.wait_for(worker.running.wait(), 5)
            job_id = worker.claimed[0].job_id
            # (The in-process transport hands the body over when the stream ends.)
            event_stream = asyncio.create_task(svc.client.get(f"/jobs/{job_id}/events"))
            await asyncio.sleep(0.5)
            keys = [key async for key in svc.queue.client.scan_iter(match=f"{redis_key_prefix}*")]
            await svc.queue.client.delete(*keys)  # the data is gone
            response, events = await sync_call, await event_stream
    assert response.status_code == 503, response.text
    assert response.json()["kind"] == "lost" and response.headers["Retry-After"]
    types = [line for line in events.text.splitlines() if line.startswith("event: ")]
    assert types[0] == "event: queued" and types[-1] == "event: failed", events.text
    assert '"kind":"lost"' in events.text.rsplit("event: failed", 1)[1]
