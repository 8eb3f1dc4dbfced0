"""The jobs resource: ``GET /jobs/{id}``, its images, its Server-Sent Events, and cancel.

Job ids are the queue's (32 lower-case hex digits); anything else is a 404
without touching the queue. With API keys on, a key sees only the jobs it
submitted (another key's job is a 404, as if it did not exist). An open event
stream takes one of the caller's ``max_streams_per_key`` slots until it ends
(429 with ``Retry-After`` when none is free).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import Principal, PrincipalDep, WaitSlotsDep, authenticate
from server.deps import QueueDep
from ediffi.failure import Failure, FailureKind
from server.queue import (
    TERMINAL_STATUSES,
    EventType,
    JobEvent,
    JobQueue,
    JobRecord,
    JobStatus,
    PROGRESS_INTERVAL_S,
    QueueUnavailable,
    failed_event_data,
    parse_event_id,
)
from server.schemas import ErrorMessage, FailureView, FieldErrors, ImageLink, JobLinks, JobView, Progress
from server.validation import field_error, raise_invalid

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: Server-Sent Events: a comment line this often keeps idle connections (and proxies) open.
KEEPALIVE_S = 15.0
#: Server-Sent Events: how long a client waits before reconnecting (the ``retry:`` field), ms.
RECONNECT_MS = 2000
#: Longest single blocking read on the queue. Stays under redis-py's default 5 s socket
#: timeout, which would otherwise turn a quiet job into a "queue unavailable" error.
MAX_BLOCK_S = 4.0
#: What a client is told when the queue backend fails (details go to the log only, never to clients).
QUEUE_UNAVAILABLE_DETAIL = "job queue unavailable: the queue backend is not answering"
#: ``Retry-After`` of a 503 for an unavailable queue, seconds.
UNAVAILABLE_RETRY_AFTER_S = 5
_TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED})

NOT_FOUND = {404: {"model": ErrorMessage, "description": "Unknown or expired job"}}
AUTH_ERRORS = {
    401: {"model": ErrorMessage, "description": "API key missing (keys configured)"},
    403: {"model": ErrorMessage, "description": "API key not accepted"},
}
UNAVAILABLE = {503: {"model": ErrorMessage, "description": "Job queue unavailable; retry after Retry-After"}}

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(authenticate)], responses={**AUTH_ERRORS})


# -------------------------------------------------------------------- helpers


def job_links(job_id: str) -> JobLinks:
    return JobLinks(self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events", cancel=f"/jobs/{job_id}/cancel")


def image_path(job_id: str, index: int) -> str:
    return f"/jobs/{job_id}/images/{index}.png"


def image_seeds(record: JobRecord) -> list[int]:
    """Seeds of the job's images: as the worker reported them, else ``seed + k``."""
    if record.image_seeds:
        return list(record.image_seeds)
    seed = record.params.get("seed")
    n = record.params.get("n", record.n_images)
    return [int(seed) + k for k in range(int(n))] if isinstance(seed, int) else []


def job_timings(record: JobRecord) -> dict[str, float]:
    """Lifecycle timestamps (epoch s), derived durations (s) and the worker's own timings."""
    timings: dict[str, float] = {}
    for name in ("queued_at", "started_at", "finished_at"):
        value = getattr(record, name)
        if value is not None:
            timings[name] = value
    if record.queued_at is not None and record.started_at is not None:
        timings["queue_wait_s"] = max(0.0, record.started_at - record.queued_at)
    if record.started_at is not None and record.finished_at is not None:
        timings["run_s"] = max(0.0, record.finished_at - record.started_at)
    if record.queued_at is not None and record.finished_at is not None:
        timings["total_s"] = max(0.0, record.finished_at - record.queued_at)
    for name, value in record.timings.items():
        if isinstance(value, (int, float)) and name not in timings:
            timings[name] = float(value)
    return timings


def job_view(record: JobRecord) -> JobView:
    images: list[ImageLink] = []
    if record.status == JobStatus.SUCCEEDED:
        seeds = image_seeds(record)
        images = [
            ImageLink(url=image_path(record.id, k), seed=seeds[k] if k < len(seeds) else 0)
            for k in range(record.n_images)
        ]
    return JobView(
        id=record.id,
        status=record.status.value,
        progress=Progress(step=record.progress.step, total=record.progress.total),
        n=record.n_images,
        error=record.error,
        failure=FailureView(**record.failure.to_dict()) if record.failure is not None else None,
        images=images,
        timings=job_timings(record),
        links=job_links(record.id),
    )


def owner_of(record: JobRecord) -> str | None:
    client = record.params.get("client")
    return client.get("owner") if isinstance(client, dict) else None


async def load_job(queue: JobQueue, job_id: str, principal: Principal) -> JobRecord:
    """The caller's job, or 404 (unknown, expired, malformed id, or another key's job)."""
    if not _JOB_ID.match(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    record = await queue.get(job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    owner = owner_of(record)
    if principal.key_id is not None and owner is not None and owner != principal.key_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    return record


class ClientDisconnected(Exception):
    """The HTTP client went away while a synchronous request waited for its job."""


def lost_job(job_id: str) -> JobRecord:
    """The record a job whose data vanished unfinished is answered with: failed, kind ``lost``."""
    failure = Failure.of(FailureKind.LOST)
    return JobRecord(
        id=job_id, status=JobStatus.FAILED, params={}, n_images=0, error=str(failure), failure=failure
    )


# A waiting request retries an unanswered queue after these seconds, doubling up to the last.
WAIT_RETRY_S = (0.25, 2.0)


def accepted_job_unavailable(job_id: str) -> HTTPException:
    """The 503 of a synchronous request whose job was accepted but whose queue stopped answering
    until the wait's deadline: it names the job, so the client polls it instead of submitting again."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"{QUEUE_UNAVAILABLE_DETAIL}; job {job_id} was accepted and may still finish: poll /jobs/{job_id}",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S), "Location": f"/jobs/{job_id}"},
    )


async def wait_for_terminal(
    queue: JobQueue, job_id: str, timeout_s: float, request: Request | None = None
) -> JobRecord | None:
    """Wait on the job's event stream until it is terminal; None on timeout.

    A job whose data vanished before it finished (Redis restarted without
    persistence, or its age limit passed) ends as a ``lost`` failure
    (:func:`lost_job`). A queue that stops answering is retried until the
    deadline (the job is stored: a restart with persistence or a failover
    keeps it), then :class:`QueueUnavailable` is raised. Raises
    :class:`ClientDisconnected` if ``request``'s client goes away.
    """
    deadline = time.monotonic() + timeout_s
    retry_s = WAIT_RETRY_S[0]

    async def answered(call: Callable[[], Awaitable[Any]]) -> Any:
        nonlocal retry_s
        while True:
            try:
                result = await call()
            except QueueUnavailable:
                if time.monotonic() + retry_s >= deadline:
                    raise
                log.warning("job %s: the queue is not answering a synchronous wait; retrying in %.2f s", job_id, retry_s)
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, WAIT_RETRY_S[1])
                continue
            retry_s = WAIT_RETRY_S[0]
            return result

    record = await answered(lambda: queue.get(job_id))
    if record is None:
        return lost_job(job_id)
    if record.status in TERMINAL_STATUSES:
        return record
    last_id: str | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        block_ms = max(1, int(min(remaining, 1.0) * 1000))
        events = await answered(lambda: queue.events(job_id, after=last_id, block_ms=block_ms))
        for event in events:
            last_id = event.id
            if event.type in _TERMINAL_EVENTS:
                return await answered(lambda: queue.get(job_id)) or lost_job(job_id)
        if request is not None and await request.is_disconnected():
            raise ClientDisconnected()
        if not events and await answered(lambda: queue.get(job_id)) is None:  # its data vanished while we waited
            return lost_job(job_id)


# --------------------------------------------------------------------- routes


@router.get("/{job_id}", response_model=JobView, responses={**NOT_FOUND, **UNAVAILABLE})
async def get_job(job_id: str, principal: PrincipalDep, queue: QueueDep) -> JobView:
    """Status, progress, timings and (once succeeded) image links of a job."""
    return job_view(await load_job(queue, job_id, principal))


@router.get(
    "/{job_id}/images/{index:int}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG image"},
        **NOT_FOUND,
        **UNAVAILABLE,
    },
)
async def get_image(job_id: str, index: int, principal: PrincipalDep, queue: QueueDep) -> Response:
    """Result image ``index`` (0-based) of a succeeded job, as PNG."""
    record = await load_job(queue, job_id, principal)
    if record.status != JobStatus.SUCCEEDED or not 0 <= index < record.n_images:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="image not found")
    data = await queue.get_image(job_id, index)
    if data is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="image not found (expired)")
    return Response(
        content=data,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600, immutable"},
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Running: the worker stops at its next step"},
        **NOT_FOUND,
        **UNAVAILABLE,
    },
)
async def cancel_job(job_id: str, principal: PrincipalDep, queue: QueueDep) -> JSONResponse:
    """Cancel a job: a queued job is canceled at once (200); a running one at the worker's next step (202).

    A finished job is left as it is (200, its status unchanged).
    """
    await load_job(queue, job_id, principal)
    record = await queue.cancel(job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    code = status.HTTP_202_ACCEPTED if record.status == JobStatus.RUNNING else status.HTTP_200_OK
    return JSONResponse(job_view(record).model_dump(mode="json"), status_code=code)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: queued, running, progress {step, total}, "
            "succeeded | failed | canceled; the stream ends after the terminal event.",
        },
        422: {"model": FieldErrors, "description": "Malformed Last-Event-ID"},
        429: {"model": ErrorMessage, "description": "Too many open streams and waits of this caller; see Retry-After"},
        **NOT_FOUND,
        **UNAVAILABLE,
    },
)
async def job_events(
    job_id: str,
    principal: PrincipalDep,
    queue: QueueDep,
    wait_slots: WaitSlotsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Progress of a job as Server-Sent Events (``text/event-stream``).

    Each event has ``id:`` (the queue's event id), ``event:`` (its type) and a
    JSON ``data:`` line. Reconnecting with ``Last-Event-ID`` resumes after that
    event. Progress comes at most every 250 ms (newer progress replaces older).
    """
    record = await load_job(queue, job_id, principal)
    after = last_event_id.strip() if last_event_id and last_event_id.strip() else None
    first: list[JobEvent] | None = None
    if after is None or parse_event_id(after) is not None:
        try:
            first = await queue.events(job_id, after=after, block_ms=0)
        except ValueError:
            first = None
    if first is None:
        raise_invalid([field_error(("header", "last-event-id"), "not an event id", "event_id")])
        first = []
    terminal_now = record.status in TERMINAL_STATUSES
    wait_slots.try_acquire(principal)
    return _SlotHoldingStream(
        _event_stream(queue, job_id, after, first, terminal_now),
        release=lambda: wait_slots.release(principal),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _SlotHoldingStream(StreamingResponse):
    """A streaming response that gives its caller's wait slot back however it ends (even unsent)."""

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()

    def give_back(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


# ------------------------------------------------------------ event stream


def _sse_lost(job_id: str) -> str:
    """A final ``failed`` event (kind ``lost``, no id: it is not on the job's stream) for a vanished job."""
    data = failed_event_data(Failure.of(FailureKind.LOST))
    return f"event: {EventType.FAILED.value}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# Event fields kept on the job's stream for operators (the worker's host name and pid), never sent to clients.
INTERNAL_EVENT_FIELDS = frozenset({"worker"})


def _sse(event: JobEvent, job_id: str) -> str:
    data: dict[str, Any] = {key: value for key, value in event.data.items() if key not in INTERNAL_EVENT_FIELDS}
    if event.type == EventType.SUCCEEDED:
        data["images"] = [image_path(job_id, k) for k in range(int(data.get("n_images", 0)))]
    return f"id: {event.id}\nevent: {event.type.value}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _event_stream(
    queue: JobQueue, job_id: str, after: str | None, first: list[JobEvent], terminal_now: bool
) -> AsyncIterator[str]:
    """Relay the job's events, coalescing progress to one per :data:`PROGRESS_INTERVAL_S`."""
    yield f"retry: {RECONNECT_MS}\n\n"
    last_id = after
    pending: JobEvent | None = None  # newest progress not sent yet
    last_progress_at = float("-inf")
    last_sent_at = time.monotonic()
    events = first
    if not events and terminal_now:
        return  # resumed after the terminal event: nothing more will come
    try:
        while True:
            for event in events:
                last_id = event.id
                if event.type == EventType.PROGRESS:
                    pending = event
                    continue
                # A state change supersedes any progress not sent yet.
                pending = None
                yield _sse(event, job_id)
                last_sent_at = time.monotonic()
                if event.type in _TERMINAL_EVENTS:
                    return
            now = time.monotonic()
            if pending is not None and now - last_progress_at >= PROGRESS_INTERVAL_S:
                yield _sse(pending, job_id)
                pending = None
                last_progress_at = last_sent_at = now
            if pending is not None:
                wait_s = PROGRESS_INTERVAL_S - (now - last_progress_at)
            else:
                wait_s = KEEPALIVE_S - (now - last_sent_at)
            wait_s = min(wait_s, MAX_BLOCK_S)
            events = await queue.events(job_id, after=last_id, block_ms=max(1, int(wait_s * 1000)))
            if events or pending is not None:
                continue
            if time.monotonic() - last_sent_at >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent_at = time.monotonic()
            record = await queue.get(job_id)
            if record is None:  # vanished before its terminal event: say so, and end
                yield _sse_lost(job_id)
                return
            if record.status in TERMINAL_STATUSES:
                # The terminal event may have been written between two reads; fetch it once more.
                events = await queue.events(job_id, after=last_id, block_ms=0)
                if not events:
                    return
    except QueueUnavailable as exc:
        # Headers are sent: say why in-band and end; the client reconnects with Last-Event-ID.
        log.warning("event stream of job %s ended: job queue unavailable: %s", job_id, exc)
        yield f"event: error\ndata: {json.dumps({'detail': QUEUE_UNAVAILABLE_DETAIL})}\n\n"
