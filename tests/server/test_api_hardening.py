"""A hostile client must not take the API down (issue 19, API side), with REAL processes:
``python -m ediffi api`` children on a real ``redis-server``, driven over real sockets.

Most tests need no model run: the job they use stays queued, and a stand-in worker keeps
``/readyz`` green by sending heartbeats through the real queue API
(:meth:`RedisStreamsQueue.heartbeat`, what a worker sends). Image URLs need a finished
job, so that test runs one real worker.

- 110 event streams on one job from one key: beyond ``max_streams_per_key`` 429 with
  ``Retry-After`` (sync waits too, and nothing is queued); with the cap lifted, the
  separate pool for blocking reads keeps another key's requests and ``/readyz`` at 200
  and every open stream still gets its events;
- no API keys: the API refuses to start unless ``EDIFFI_ALLOW_ANONYMOUS=true``, then says
  so in its log and rate-limits anonymous callers by address;
- ``XMETHOD<random>`` and random paths create no new metric series;
- the key is checked before the body is read (401 while a 10 MB body is still unsent);
  ``max_inflight_requests`` caps requests in flight (503) but not the probes; one key's
  stalled uploads hold at most ``max_inflight_per_caller`` of them (429 past it), so other
  keys stay served, and the body deadline and a disconnect give the slots back;
- ``/readyz`` and ``/metrics`` never SCAN, count live workers, and tell an anonymous
  caller nothing about the Redis behind them;
- image URLs never come from the ``Host`` header;
- a body that is not JSON (text/plain, form, none) is a 415 and queues nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.queue import RedisStreamsQueue
from tests.support.process import (
    BASE_SETTINGS,
    KEYS,
    ApiProcess,
    Cluster,
    PersistentRedis,
    service_env,
)

pytestmark = [pytest.mark.timeout(240)]

KEY_A = "key-a-" + "a" * 26
KEY_B = "key-b-" + "b" * 26
ASYNC = {"Prefer": "respond-async"}
BODY = {"prompt": "a red circle on the left", "steps": 1}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def redis_server() -> Iterator[PersistentRedis]:
    server = PersistentRedis(persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


class ApiFactory:
    """Starts ``python -m ediffi api`` children on one Redis; stops them all at the end."""

    def __init__(self, redis_url: str, model_dir: Path, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.started: list[ApiProcess] = []

    def env(self, **settings: Any) -> dict[str, str]:
        values = {**BASE_SETTINGS, **settings}
        env = service_env(self.redis_url, self.model_dir, {k: v for k, v in values.items() if v is not None})
        for name, value in settings.items():  # None: leave the setting unset
            if value is None:
                env.pop(f"EDIFFI_{name.upper()}", None)
        return env

    def start(self, wait: bool = True, **settings: Any) -> ApiProcess:
        api = ApiProcess(self.env(**settings), self.log_dir, name=f"api{len(self.started) + 1}")
        self.started.append(api)
        if wait:
            api.wait_ready(path="/healthz")
        return api

    def close(self) -> None:
        for api in self.started:
            api.stop()


@pytest.fixture
def api_factory(redis_server: PersistentRedis, tiny_model_dir: Path, tmp_path: Path) -> Iterator[ApiFactory]:
    factory = ApiFactory(redis_server.url, tiny_model_dir, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@asynccontextmanager
async def stand_in_worker(redis_url: str, count: int = 1) -> AsyncIterator[RedisStreamsQueue]:
    """``count`` live worker heartbeats, sent through the real queue API every 0.5 s."""
    queue = RedisStreamsQueue.from_url(
        redis_url, max_queue=1000, claim_timeout_s=3, max_deliveries=3, result_ttl_s=600,
        heartbeat_ttl_s=BASE_SETTINGS["heartbeat_ttl_s"],
    )
    ids = [f"stand-in-{uuid.uuid4().hex[:8]}" for _ in range(count)]

    async def beat() -> None:
        while True:
            for worker_id in ids:
                await queue.heartbeat(worker_id, {"slots": 0})
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        await asyncio.sleep(0.1)
        yield queue
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.close()


class EventStream:
    """An open ``GET /jobs/{id}/events`` response, read incrementally."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.seen = ""
        self._chunks = response.aiter_text()

    async def read_until(self, marker: str) -> str:
        """Read until ``marker`` has arrived (or the stream ended); everything read so far."""
        while marker not in self.seen:
            try:
                self.seen += await self._chunks.__anext__()
            except StopAsyncIteration:
                break
        return self.seen

    async def aclose(self) -> None:
        await self.response.aclose()


async def open_stream(client: httpx.AsyncClient, job_id: str, key: str) -> EventStream:
    """GET /jobs/{id}/events; for a 200, read until the ``queued`` event has arrived."""
    request = client.build_request("GET", f"/jobs/{job_id}/events", headers=auth(key))
    stream = EventStream(await client.send(request, stream=True))
    if stream.status_code == 200:
        await stream.read_until("event: queued")
    return stream


# ----------------------------------------------------------- 1. streams and waits


@pytest.mark.parametrize(
    "limits",
    [
        {"max_streams_per_key": 8},
        # Both per-caller caps lifted: the bounded pool of blocking reads alone keeps others served.
        {"max_streams_per_key": 500, "max_inflight_per_caller": 500, "redis_blocking_connections": 8},
    ],
    ids=["per-key-cap", "cap-lifted-bounded-blocking-pool"],
)
def test_110_streams_from_one_key_leave_other_keys_and_readyz_served(
    api_factory: ApiFactory, limits: dict[str, Any]
) -> None:
    api = api_factory.start(api_keys=f"{KEY_A},{KEY_B}", **limits)
    capped = limits["max_streams_per_key"] < 110

    async def scenario() -> None:
        async with stand_in_worker(api_factory.redis_url) as queue, httpx.AsyncClient(
            base_url=api.url, timeout=60, limits=httpx.Limits(max_connections=300, max_keepalive_connections=300)
        ) as client:
            job_a = (await client.post("/generate", json=BODY, headers={**ASYNC, **auth(KEY_A)})).json()["id"]
            job_b = (await client.post("/generate", json=BODY, headers={**ASYNC, **auth(KEY_B)})).json()["id"]
            streams = await asyncio.gather(*(open_stream(client, job_a, KEY_A) for _ in range(110)))
            try:
                codes = Counter(r.status_code for r in streams)
                # For 5 s (longer than one blocking read), another key's reads and the probe keep working.
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:
                    other, ready = await asyncio.gather(
                        client.get(f"/jobs/{job_b}", headers=auth(KEY_B)), client.get("/readyz")
                    )
                    assert other.status_code == 200, (other.status_code, other.text, codes)
                    assert ready.status_code == 200, (ready.status_code, ready.text, codes)
                    await asyncio.sleep(0.1)
                if capped:
                    assert codes == {200: 8, 429: 102}, codes
                    refused = [r for r in streams if r.status_code == 429]
                    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
                    # A sync wait counts against the same cap: 429, and nothing is queued.
                    depth = await queue.depth()
                    sync = await client.post("/generate", json=BODY, headers=auth(KEY_A))
                    assert sync.status_code == 429 and int(sync.headers["retry-after"]) >= 1, sync.text
                    assert await queue.depth() == depth
                    # Another key is not affected by A's streams.
                    assert (await open_stream(client, job_b, KEY_B)).status_code == 200
                else:
                    assert codes == {200: 110}, codes
                # Every open stream is still served: canceling the job reaches each of them.
                assert (await client.post(f"/jobs/{job_a}/cancel", headers=auth(KEY_A))).status_code == 200
                open_streams = [r for r in streams if r.status_code == 200]
                texts = await asyncio.wait_for(
                    asyncio.gather(*(r.read_until("event: canceled") for r in open_streams)), 60
                )
                assert all("event: canceled" in text for text in texts)
            finally:
                await asyncio.gather(*(r.aclose() for r in streams), return_exceptions=True)
            if capped:  # the slots came back when the streams ended
                await asyncio.sleep(0.5)
                again = await open_stream(client, job_a, KEY_A)
                assert again.status_code == 200
                await again.aclose()

    asyncio.run(scenario())


# --------------------------------------------------------------- 2. authentication


def test_api_without_keys_refuses_to_start_unless_anonymous_is_allowed(api_factory: ApiFactory) -> None:
    api = api_factory.start(wait=False, api_keys=None, allow_anonymous=None)
    try:
        code = api.process.wait(timeout=60)
    except Exception:
        raise AssertionError(f"the API started without API keys\n{api.log_tail()}") from None
    log = api.log_tail()
    assert code != 0, log
    assert "EDIFFI_API_KEYS" in log and "EDIFFI_ALLOW_ANONYMOUS" in log, log
    # A key copied unchanged from .env.example / secret.example.yaml is no key either.
    placeholder = api_factory.start(wait=False, api_keys="change-me-to-your-client-keys")
    assert placeholder.process.wait(timeout=60) != 0
    assert "placeholder" in placeholder.log_tail()


def test_anonymous_api_says_so_and_rate_limits_callers_by_address(api_factory: ApiFactory) -> None:
    api = api_factory.start(api_keys=None, allow_anonymous="true", rate_limit_per_minute=2)
    assert "AUTHENTICATION IS OFF" in api.log_tail(), api.log_tail()
    with httpx.Client(base_url=api.url, timeout=30) as client:
        codes = [client.post("/generate", json=BODY, headers=ASYNC).status_code for _ in range(6)]
    # A minute boundary may reset the window once: at most two windows' worth get through.
    assert codes.count(202) <= 4 and codes.count(429) >= 2, codes
    assert set(codes) <= {202, 429}, codes


# ------------------------------------------------------------------ 4. metric labels


def label_values(text: str, metric: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and label in sample.labels
    }


def test_request_methods_and_paths_create_no_new_metric_series(api_factory: ApiFactory) -> None:
    api = api_factory.start(api_keys=KEY_A)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for k in range(5):
            method = f"XMETHOD{uuid.uuid4().hex[:8]}"
            for path in ("/healthz", "/generate", f"/jobs/{uuid.uuid4().hex}", f"/random-{k}"):
                client.request(method, path, headers=auth(KEY_A))
            client.get(f"/no-such-path-{uuid.uuid4().hex}")
        text = client.get("/metrics").text
    methods = label_values(text, "ediffi_http_requests_total", "method")
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert "other" in methods
    endpoints = label_values(text, "ediffi_http_requests_total", "endpoint")
    assert not any("random" in e or "no-such" in e for e in endpoints), endpoints
    statuses = label_values(text, "ediffi_http_requests_total", "status")
    assert all(s.isdigit() or s.endswith("xx") for s in statuses), statuses


# -------------------------------------------------- 5. key before body, bounded load


def test_key_is_checked_before_a_large_body_is_read(api_factory: ApiFactory) -> None:
    api = api_factory.start(api_keys=KEY_A)
    declared = 10 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", api.port), timeout=20) as sock:
        sock.sendall(
            (
                f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
            + b'{"prompt": "' + b"x" * 1024  # 1 KB of the 10 MB: the rest never comes
        )
        try:
            head = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            raise AssertionError("no answer while the body was incomplete: the API waited for the body") from None
    assert head.startswith("HTTP/1.1 401"), head
    assert "www-authenticate: bearer" in head.lower(), head


def read_until_closed(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (the head and body may come apart)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def open_upload(port: int, key: str, sent: bytes = b'{"prompt":') -> socket.socket:
    """A ``POST /generate`` upload by ``key`` that sends its headers and ``sent`` of a 100-byte body, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n".encode() + sent
    )
    return sock


def test_stalled_bodies_get_408_and_give_their_inflight_slots_back(api_factory: ApiFactory) -> None:
    # A client that sends headers and part of a body, then nothing: without a body deadline, 4 such
    # connections held all 4 in-flight slots (every other caller got 503) for as long as they stayed open.
    api = api_factory.start(api_keys=KEY_A, max_inflight_requests=4, body_timeout_s=1)
    sockets = [open_upload(api.port, KEY_A) for _ in range(4)]
    try:
        answers = [read_until_closed(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    for answer in answers:
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "not received within 1 s" in answer, answer
    with httpx.Client(base_url=api.url, timeout=20) as client:
        answer = client.get("/jobs/" + "0" * 32, headers=auth(KEY_A))
    assert answer.status_code == 404, answer.text  # served, not 503: the slots are free again


def answers_so_far(socks: list[socket.socket], wait_s: float = 0.5) -> list[str | None]:
    """After ``wait_s``, the head of each socket's answer, or None where none came (the request is still held)."""
    time.sleep(wait_s)
    heads: list[str | None] = []
    for sock in socks:
        sock.settimeout(0.01)
        try:
            heads.append(sock.recv(4096).decode(errors="replace"))
        except TimeoutError:
            heads.append(None)
        finally:
            sock.settimeout(20)
    return heads


def test_one_callers_stalled_uploads_leave_other_callers_served(api_factory: ApiFactory) -> None:
    # Before: one key's stalled uploads took every in-flight slot of the process (8 here, 256 by default);
    # every other key's GET /v1/models and POST /generate got 503 "server busy" until they ended.
    per_caller = 4
    api = api_factory.start(
        api_keys=f"{KEY_A},{KEY_B}", max_inflight_requests=8, max_inflight_per_caller=per_caller, body_timeout_s=4
    )

    def take_every_slot() -> tuple[list[socket.socket], list[str]]:
        """A opens 10 stalled uploads: ``per_caller`` are held, the rest answered at once (before their body)."""
        uploads = [open_upload(api.port, KEY_A, sent=b"") for _ in range(10)]
        heads = answers_so_far(uploads)
        held = [sock for sock, head in zip(uploads, heads) if head is None]
        for sock, head in zip(uploads, heads):
            if head is not None:
                sock.close()
        return held, [head for head in heads if head is not None]

    def assert_refused_for_its_share(refused: list[str]) -> None:
        assert len(refused) == 10 - per_caller, refused
        for head in refused:
            assert head.startswith("HTTP/1.1 429"), head
            assert "retry-after: " in head.lower(), head
            assert f"at most {per_caller} at once" in head, head

    held, refused = take_every_slot()
    try:
        with httpx.Client(base_url=api.url, timeout=20) as client:
            models = client.get("/v1/models", headers=auth(KEY_B))
            assert models.status_code == 200, models.text
            submitted = client.post("/generate", json=BODY, headers={**ASYNC, **auth(KEY_B)})
            assert submitted.status_code == 202, submitted.text
            assert len(held) == per_caller, refused
            assert_refused_for_its_share(refused)
            # A's own quick requests wait for its share too.
            assert client.get("/v1/models", headers=auth(KEY_A)).status_code == 429
        # The body deadline gives A's slots back (408) ...
        for sock in held:
            assert read_until_closed(sock).startswith("HTTP/1.1 408")
    finally:
        for sock in held:
            sock.close()
    # ... all of them: A holds its whole share again, and no more.
    held, refused = take_every_slot()
    try:
        assert len(held) == per_caller, refused
        assert_refused_for_its_share(refused)
    finally:
        for sock in held:  # a client that goes away mid-body gives its slots back too
            sock.close()
    time.sleep(0.5)
    held, refused = take_every_slot()
    try:
        assert len(held) == per_caller, refused
        assert_refused_for_its_share(refused)
    finally:
        for sock in held:
            sock.close()
    with httpx.Client(base_url=api.url, timeout=20) as client:
        time.sleep(0.5)
        assert client.get("/v1/models", headers=auth(KEY_A)).status_code == 200


def test_inflight_limit_answers_503_but_probes_still_answer(api_factory: ApiFactory) -> None:
    api = api_factory.start(api_keys=f"{KEY_A},{KEY_B}", max_inflight_requests=4, max_streams_per_key=50)

    async def scenario() -> None:
        async with stand_in_worker(api_factory.redis_url), httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            job = (await client.post("/generate", json=BODY, headers={**ASYNC, **auth(KEY_A)})).json()["id"]
            streams = [await open_stream(client, job, KEY_A) for _ in range(4)]
            try:
                assert [r.status_code for r in streams] == [200] * 4
                busy = await client.get(f"/jobs/{job}", headers=auth(KEY_B))
                assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.text
                for path in ("/healthz", "/readyz", "/metrics"):
                    assert (await client.get(path)).status_code == 200, path
            finally:
                await asyncio.gather(*(r.aclose() for r in streams), return_exceptions=True)
            await asyncio.sleep(0.5)
            assert (await client.get(f"/jobs/{job}", headers=auth(KEY_B))).status_code == 404  # served again

    asyncio.run(scenario())


# ------------------------------------------------------------ 10. probes and leaks


def test_readyz_and_metrics_count_workers_without_scan(api_factory: ApiFactory, redis_server: PersistentRedis) -> None:
    api = api_factory.start(api_keys=KEY_A)
    import redis as redis_sync

    admin = redis_sync.Redis.from_url(redis_server.url)

    async def scenario() -> None:
        async with stand_in_worker(api_factory.redis_url, count=2), httpx.AsyncClient(
            base_url=api.url, timeout=30
        ) as client:
            admin.config_resetstat()
            for _ in range(5):
                ready = await client.get("/readyz")
                assert ready.status_code == 200 and ready.json()["workers_alive"] == 2, ready.text
                assert "ediffi_workers_alive 2.0" in (await client.get("/metrics")).text
            stats = admin.info("commandstats")
            assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
            assert "cmdstat_keys" not in stats
        # Heartbeats stopped: after their TTL the workers no longer count.
        await asyncio.sleep(BASE_SETTINGS["heartbeat_ttl_s"] + 0.5)
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json().get("workers_alive") == 0, ready.text

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_queue_failures_tell_callers_nothing_about_internals(
    api_factory: ApiFactory, redis_server: PersistentRedis
) -> None:
    api = api_factory.start(api_keys=KEY_A)
    redis_server.stop()
    with httpx.Client(base_url=api.url, timeout=30) as client:
        answers = [
            client.get("/readyz"),
            client.get(f"/jobs/{uuid.uuid4().hex}", headers=auth(KEY_A)),
            client.post("/generate", json=BODY, headers={**ASYNC, **auth(KEY_A)}),
        ]
    for response in answers:
        assert response.status_code == 503, response.text
        text = response.text
        for secret in ("127.0.0.1", str(redis_server.port), "Error", "111", "redis", "Connection"):
            assert secret not in text, (secret, text)
        assert "job queue unavailable" in text
    assert str(redis_server.port) in api.log_tail(20000), "the cause must reach the operator's log"


# --------------------------------------------------------------------- 12. 415


def test_non_json_bodies_get_415_and_queue_nothing(api_factory: ApiFactory, redis_server: PersistentRedis) -> None:
    api = api_factory.start(api_keys=None, allow_anonymous="true")
    import redis as redis_sync

    admin = redis_sync.Redis.from_url(redis_server.url)
    body = json.dumps(BODY).encode()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            for path in ("/generate", "/v1/images/generations"):
                for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                     None):
                    headers = {**ASYNC, "Origin": "https://evil.example"}
                    if content_type:
                        headers["Content-Type"] = content_type
                    response = client.post(path, content=body, headers=headers)
                    assert response.status_code == 415, (path, content_type, response.status_code, response.text)
            assert admin.xlen(KEYS.jobs_stream) == 0
            ok = client.post("/generate", content=body,
                             headers={**ASYNC, "Content-Type": "application/json; charset=utf-8"})
            assert ok.status_code == 202, ok.text
    finally:
        admin.close()


# ----------------------------------------------------------------- 11. image URLs


@pytest.mark.slow
def test_image_urls_never_come_from_the_host_header(tiny_model_dir: Path, tmp_path: Path) -> None:
    cluster = Cluster(tiny_model_dir, tmp_path, persistent=False)
    public = None
    try:
        cluster.start(workers=1)
        public = ApiProcess(service_env(cluster.redis_server.url, tiny_model_dir,
                                        {**cluster.settings, "public_base_url": "https://images.example.com/api"}),
                            tmp_path, name="api-public")
        public.wait_ready()
        hostile = {"Host": "attacker.example", "X-Forwarded-Host": "attacker.example"}
        for url, expected_prefix in ((cluster.api.url, "/jobs/"), (public.url, "https://images.example.com/api/jobs/")):
            with httpx.Client(base_url=url, timeout=120) as client:
                response = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 1},
                                       headers=hostile)
                assert response.status_code == 200, response.text
                (item,) = response.json()["data"]
                assert "attacker" not in item["url"], item
                assert item["url"].startswith(expected_prefix) and item["url"].endswith("/images/0.png"), item
    finally:
        if public is not None:
            public.stop()
        cluster.close()
