"""Shared pieces of the API tests (no tests here): apps on both queue implementations, a
worker stand-in that drives the *real* queue API, image and SSE helpers.

The worker is not written yet, so :class:`QueueWorker` plays its role through
``claim -> mark_running -> progress -> complete`` with real PNG bytes, in a
background task on the test's event loop. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import struct
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from ediffi.capabilities import ModelCapabilities
from ediffi.failure import Failure
from server.app import DEFAULT_CANVAS_SIZE, create_app
from server.metrics import Metrics
from server.queue import ClaimedJob, InProcessQueue, JobQueue, RedisStreamsQueue, queue_limits
from server.settings import Settings

TEST_TIMEOUT_S = 20.0
QUEUE_LIMITS: dict[str, Any] = dict(
    max_queue=50, claim_timeout_s=30.0, max_deliveries=3, result_ttl_s=60.0, heartbeat_ttl_s=10.0
)


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop, bounded in time."""

    @functools.wraps(test)
    def runner(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT_S))

    return runner


def make_settings(**overrides: Any) -> Settings:
    """Small limits so the size tests stay cheap; explicit values win over any EDIFFI_* variables."""
    values: dict[str, Any] = dict(
        redis_url=None,
        api_keys=[],
        allow_anonymous=True,  # these apps run without keys on purpose
        max_image_bytes=64 * 1024,
        max_image_pixels=256 * 256,
        max_regions=4,
        max_prompt_chars=200,
        max_n=4,
        max_steps=50,
        sync_timeout_s=5.0,
        rate_limit_per_minute=1000,
        **QUEUE_LIMITS,
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class Backend:
    """Builds queues of one implementation (``memory`` or ``redis``)."""

    name: str
    redis_url: str | None = None
    key_prefix: str = ""

    def build(self, settings: Settings) -> JobQueue:
        limits = queue_limits(settings)
        if self.name == "redis":
            return RedisStreamsQueue.from_url(self.redis_url, prefix=self.key_prefix, **limits)
        return InProcessQueue(**limits)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return Backend(
            "redis",
            redis_url=request.getfixturevalue("redis_url"),
            key_prefix=request.getfixturevalue("redis_key_prefix"),
        )
    return Backend("memory")


@dataclass
class Service:
    app: FastAPI
    queue: JobQueue
    client: httpx.AsyncClient
    metrics: Metrics
    settings: Settings


@asynccontextmanager
async def service(
    backend: Backend, capabilities: ModelCapabilities | None = None, **overrides: Any
) -> AsyncIterator[Service]:
    """An app on a fresh queue of ``backend`` and an HTTP client talking to it in process
    (``capabilities``: the served model's; None: create_app's default)."""
    settings = make_settings(**overrides)
    queue = backend.build(settings)
    metrics = Metrics()
    app = create_app(settings, queue=queue, metrics=metrics, capabilities=capabilities)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Service(app, queue, client, metrics, settings)
    finally:
        await queue.close()


# --------------------------------------------------------------------- images


def png_bytes(width: int = 8, height: int = 8, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 16, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, "GIF")
    return buffer.getvalue()


def color_map_png(size: int = 32, height: int | None = None) -> bytes:
    """Left half red (#ff0000), right half blue (#0000ff)."""
    height = height or size
    image = Image.new("RGB", (size, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size // 2, height))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(text: str) -> Image.Image:
    data = base64.b64decode(text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ----------------------------------------------------------------------- SSE


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events of a ``text/event-stream`` body: ``{"id", "event", "data"}`` (comments and retry skipped)."""
    import json

    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "event" in fields or "data" in fields:
            events.append(
                {"id": fields.get("id"), "event": fields.get("event", "message"), "data": json.loads(fields["data"])}
            )
    return events


def event_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


# -------------------------------------------------------------------- worker


@dataclass
class QueueWorker:
    """Plays the worker through the real queue API.

    ``mode``: ``succeed``; ``hold`` (run until canceled); ``fail`` (with ``failure``).
    ``step_delay_s`` sleeps between progress reports. Images are solid
    ``image_size`` squares, the app's canvas (the shipped model's 64 px) by default.
    """

    queue: JobQueue
    worker_id: str = "test-worker"
    mode: str = "succeed"
    failure: Failure | None = None
    step_delay_s: float = 0.0
    heartbeat: bool = True
    image_size: int = DEFAULT_CANVAS_SIZE
    claimed: list[ClaimedJob] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while not self.stopping:
            if self.heartbeat:
                await self.queue.heartbeat(self.worker_id, {"slots": 4})
            for job in await self.queue.claim(self.worker_id, max_jobs=4, block_ms=50):
                self.claimed.append(job)
                await self.handle(job)

    async def handle(self, job: ClaimedJob) -> None:
        if not await self.queue.mark_running(job, self.worker_id):
            await self.queue.finish_canceled(job)
            return
        self.running.set()
        total = int(job.params["steps"])
        for step in range(1, total + 1):
            await self.queue.progress(job.job_id, step, total)
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            if await self.queue.is_canceled(job.job_id):
                await self.queue.finish_canceled(job)
                return
        if self.mode == "hold":
            while not await self.queue.is_canceled(job.job_id):
                if self.stopping:
                    await self.queue.release(job)
                    return
                await asyncio.sleep(0.01)
            await self.queue.finish_canceled(job)
            return
        if self.mode == "fail":
            assert self.failure is not None, "mode 'fail' needs a failure"
            await self.queue.fail(job, self.failure)
            return
        seeds = [int(job.params["seed"]) + k for k in range(job.n_images)]
        images = [png_bytes(self.image_size, self.image_size, (k * 40 % 256, 0, 0)) for k in range(job.n_images)]
        await self.queue.complete(job, images, seeds, {"sampling_s": 0.01})

    async def __aenter__(self) -> "QueueWorker":
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Stopped by a flag, not task.cancel(): redis-py 8 with its default 5 s socket
        # timeout sends through asyncio.wait_for, which on Python 3.11 can swallow a
        # cancellation (the task then never stops).
        assert self._task is not None
        self.stopping = True
        await self._task
