"""The in-process job queue of the embedded ``ediffi serve`` (no Redis).

It mirrors :class:`~server.queue.redis_streams.RedisStreamsQueue` on purpose,
so one contract test suite pins both: an ordered log of entries (the stream),
a pending list of deliveries with their owner and delivery time (the consumer
group's PEL), take-over of deliveries idle longer than ``claim_timeout_s``, a
per-job delivery count with a ``max_deliveries`` limit, per-job event logs,
TTLs measured on the monotonic clock and purged lazily on every call.

All state belongs to one asyncio event loop; no method awaits anything but
the wake-up conditions, so each method body runs without interleaving, which
is what Redis's single-threaded scripts give the other implementation. It is
not thread-safe: a worker running on another thread must submit its calls to
the queue's loop (``asyncio.run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ediffi.failure import Failure
from server.keys import RedisKeys
from server.queue.base import (
    ClaimedJob,
    EventType,
    JobEvent,
    JobProgress,
    JobQueue,
    JobRecord,
    JobStatus,
    QueueCounters,
    QueueFull,
    failed_event_data,
    parse_event_id,
)

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
_RELEASED_CONSUMER = RedisKeys().released_consumer


@dataclass
class _StoredJob:
    """Everything kept for one job: the Redis hash, inputs, images, events and cancel flag together."""

    record: JobRecord
    message_id: str
    inputs: dict[str, bytes]
    idempotency_key: str | None
    owner: str | None = None
    images: list[bytes] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    cancel_requested: bool = False
    released: bool = False
    expires_at: float | None = None  # monotonic; None while unfinished


@dataclass
class _Delivery:
    """A pending (delivered, unacknowledged) entry: who holds it and since when."""

    job_id: str
    consumer: str
    delivered_at: float  # monotonic; renewed by keep_alive, backdated by release


def _input_bytes(jobs: Sequence[_StoredJob]) -> int:
    return sum(len(data) for stored in jobs for data in stored.inputs.values())


def _result_bytes(jobs: Sequence[_StoredJob]) -> int:
    return sum(len(image) for stored in jobs for image in stored.images)


class _Wakeup:
    """Wakes every waiter at once, without a lock. Waiters check the state, then wait here; nothing can run in
    between (no await), so no wake-up is missed. It replaces ``asyncio.Condition``: a waiter cancelled inside
    ``wait_for(condition.wait())`` (a client that went away: Starlette cancels it through an anyio cancel
    scope) could leave the condition's lock taken for good, wedging every reader and writer of the queue."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Until the next :meth:`notify` or ``timeout_s``, whichever comes first."""
        event = self._event
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass


class InProcessQueue(JobQueue):
    """:class:`JobQueue` in memory, for one process and one event loop."""

    def __init__(
        self,
        *,
        max_queue: int,
        claim_timeout_s: float,
        max_deliveries: int,
        result_ttl_s: float,
        heartbeat_ttl_s: float,
        max_input_bytes: int = 512 * 1024 * 1024,
        max_result_bytes: int = 1 << 62,
        max_unfinished_per_owner: int = 1_000_000,
        max_job_age_s: float = 24 * 3600,
    ) -> None:
        self._max_queue = max_queue
        self._max_input_bytes = max_input_bytes
        self._max_result_bytes = max_result_bytes
        self._max_unfinished_per_owner = max_unfinished_per_owner
        self._max_job_age_s = max_job_age_s
        self._claim_timeout_s = claim_timeout_s
        self._max_deliveries = max_deliveries
        self._result_ttl_s = result_ttl_s
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._jobs: dict[str, _StoredJob] = {}
        # The stream: entries of unfinished jobs, by message id, in order of submission.
        self._entries: OrderedDict[str, str] = OrderedDict()  # message id -> job id
        self._undelivered: OrderedDict[str, None] = OrderedDict()  # message ids never delivered
        self._pending: dict[str, _Delivery] = {}  # message id -> delivery
        self._message_seq = itertools.count(1)
        self._event_seq = itertools.count(1)
        self._expiry_heap: list[tuple[float, str]] = []
        self._idempotency: dict[str, tuple[str, float]] = {}  # key -> (job id, expires_at)
        self._heartbeats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._rate_windows: dict[tuple[str, int], int] = {}
        self._waiting: dict[str, tuple[str, float]] = {}  # caller -> (job id, monotonic expiry)
        # Wake-ups: a new or released entry for blocked claims, a new event for blocked readers.
        self._entry_added = _Wakeup()
        self._event_added = _Wakeup()
        self.counters = QueueCounters()

    # ------------------------------------------------------------ client side

    async def submit(
        self,
        params: dict[str, Any],
        inputs: dict[str, bytes],
        n_images: int,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        self._purge_expired()
        if idempotency_key is not None and idempotency_key in self._idempotency:
            existing_id, _ = self._idempotency[idempotency_key]
            if existing_id in self._jobs:
                return self._copy(self._jobs[existing_id].record)
        depth = len(self._entries)
        if depth >= self._max_queue:
            raise QueueFull(depth, self._max_queue)
        unfinished = self._unfinished()
        owned = sum(1 for stored in unfinished if stored.owner == owner)
        if owned >= self._max_unfinished_per_owner:
            raise QueueFull(owned, self._max_unfinished_per_owner, limit="key")
        holding = self._holding_results()
        results = _result_bytes(holding)
        if results > self._max_result_bytes:
            first_expiry = min(stored.expires_at for stored in holding if stored.expires_at is not None)
            raise QueueFull(
                results, self._max_result_bytes, retry_after_s=max(1.0, first_expiry - time.monotonic()),
                limit="results",
            )
        new_bytes = sum(len(data) for data in inputs.values())
        held = _input_bytes(unfinished)
        if new_bytes and held + new_bytes > self._max_input_bytes:
            raise QueueFull(held, self._max_input_bytes, limit="inputs")
        job_id = uuid.uuid4().hex
        message_id = f"{next(self._message_seq)}-0"
        record = JobRecord(
            id=job_id,
            status=JobStatus.QUEUED,
            params=json.loads(json.dumps(params)),  # a private copy, and proof it is JSON
            n_images=n_images,
            queued_at=time.time(),
        )
        stored = _StoredJob(
            record=record, message_id=message_id, inputs=dict(inputs), idempotency_key=idempotency_key, owner=owner
        )
        self._jobs[job_id] = stored
        self._entries[message_id] = job_id
        self._undelivered[message_id] = None
        if idempotency_key is not None:
            # As long as the job may still be queued or running; its terminal transition shortens it.
            self._idempotency[idempotency_key] = (job_id, time.monotonic() + self._max_job_age_s)
        await self._append_event(stored, EventType.QUEUED, {})
        self._entry_added.notify()
        return self._copy(record)

    async def get(self, job_id: str) -> JobRecord | None:
        self._purge_expired()
        stored = self._jobs.get(job_id)
        return self._copy(stored.record) if stored else None

    async def get_image(self, job_id: str, index: int) -> bytes | None:
        self._purge_expired()
        stored = self._jobs.get(job_id)
        if stored is None or not 0 <= index < len(stored.images):
            return None
        return stored.images[index]

    async def events(self, job_id: str, after: str | None = None, block_ms: int = 0) -> list[JobEvent]:
        after_seq = 0
        if after is not None:
            event_id = parse_event_id(after)
            if event_id is None:
                raise ValueError(f"not an event id: {after!r}")
            after_seq = event_id[0]
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            self._purge_expired()
            stored = self._jobs.get(job_id)
            found = [e for e in stored.events if int(e.id.split("-")[0]) > after_seq] if stored else []
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return [event.model_copy(deep=True) for event in found]
            await self._event_added.wait(remaining)

    async def cancel(self, job_id: str) -> JobRecord | None:
        self._purge_expired()
        stored = self._jobs.get(job_id)
        if stored is None:
            return None
        if stored.record.status == JobStatus.QUEUED:
            await self._finish(stored, JobStatus.CANCELED, EventType.CANCELED, {})
            self.counters.canceled_queued += 1  # no worker finishes it, so none counts it
            # Like XDEL: no worker receives it any more; a worker already holding it acks it.
            self._entries.pop(stored.message_id, None)
            self._undelivered.pop(stored.message_id, None)
        elif stored.record.status == JobStatus.RUNNING:
            stored.cancel_requested = True
        return self._copy(stored.record)

    async def depth(self) -> int:
        self._purge_expired()
        return len(self._entries)

    async def ping(self) -> None:
        return None

    async def workers_alive(self) -> int:
        now = time.monotonic()
        for worker_id in [w for w, (expires_at, _) in self._heartbeats.items() if expires_at <= now]:
            del self._heartbeats[worker_id]
        return len(self._heartbeats)

    async def rate_limit(self, key: str, per_minute: int) -> bool:
        minute = int(time.time() // 60)
        for window in [w for w in self._rate_windows if w[1] < minute]:
            del self._rate_windows[window]
        count = self._rate_windows.get((key, minute), 0) + 1
        self._rate_windows[(key, minute)] = count
        return count <= per_minute

    async def note_waiting(self, caller: str, job_id: str, ttl_s: float) -> None:
        now = time.monotonic()
        for gone in [c for c, (_, expires) in self._waiting.items() if expires <= now]:  # callers who left
            del self._waiting[gone]
        self._waiting[caller] = (job_id, now + ttl_s)

    async def waiting_job(self, caller: str) -> str | None:
        job_id, expires = self._waiting.get(caller, (None, 0.0))
        if job_id is not None and time.monotonic() >= expires:
            del self._waiting[caller]
            return None
        return job_id

    async def forget_waiting(self, caller: str, job_id: str) -> None:
        if self._waiting.get(caller, (None,))[0] == job_id:
            del self._waiting[caller]

    # ------------------------------------------------------------ worker side

    async def claim(self, worker_id: str, max_jobs: int, block_ms: int = 0) -> list[ClaimedJob]:
        if max_jobs <= 0:
            return []
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        claimed: list[ClaimedJob] = []
        for message_id in self._take_over_idle(worker_id, max_jobs):
            job = await self._accept_delivery(message_id, taken_over=True)
            if job is not None:
                claimed.append(job)
        if claimed:
            # Like the Redis queue: taken-over jobs go out at once, topped up without blocking.
            deadline = 0.0
        while len(claimed) < max_jobs:
            while self._undelivered and len(claimed) < max_jobs:
                message_id = self._next_turn()
                self._pending[message_id] = _Delivery(self._entries[message_id], worker_id, time.monotonic())
                job = await self._accept_delivery(message_id, taken_over=False)
                if job is not None:
                    claimed.append(job)
            remaining = deadline - time.monotonic()
            if claimed or remaining <= 0:
                break
            await self._entry_added.wait(remaining)
        return claimed

    async def stored_bytes(self) -> dict[str, tuple[int, int]]:
        self._purge_expired()
        return {
            "inputs": (_input_bytes(self._unfinished()), self._max_input_bytes),
            "results": (_result_bytes(self._holding_results()), self._max_result_bytes),
        }

    def _unfinished(self) -> list[_StoredJob]:
        """The jobs of the stream's entries (queued or held by a worker)."""
        return [self._jobs[job_id] for job_id in self._entries.values() if job_id in self._jobs]

    def _holding_results(self) -> list[_StoredJob]:
        """Finished jobs still keeping images (until they expire): the result budget's holdings."""
        return [stored for stored in self._jobs.values() if stored.images and stored.expires_at is not None]

    def _next_turn(self) -> str:
        """Take the undelivered entry to hand out next: the oldest of the owner (API key or client
        address) with the fewest jobs out on workers, so one caller's backlog does not hold back
        another caller's job queued after it; the Redis queue's claim does the same (``_TURN_LUA``)."""
        out: Counter[str | None] = Counter()
        for delivery in self._pending.values():
            stored = self._jobs.get(delivery.job_id)
            if stored is not None and stored.record.status in _UNFINISHED:
                out[stored.owner] += 1
        chosen, fewest = "", -1
        for message_id in self._undelivered:
            stored = self._jobs.get(self._entries[message_id])
            count = out[stored.owner] if stored is not None else 0  # gone: settled at once in its turn
            if fewest < 0 or count < fewest:
                chosen, fewest = message_id, count
                if count == 0:
                    break
        del self._undelivered[chosen]
        return chosen

    async def load_input(self, job_id: str, name: str) -> bytes | None:
        self._purge_expired()
        stored = self._jobs.get(job_id)
        return stored.inputs.get(name) if stored else None

    async def mark_running(self, job: ClaimedJob, worker_id: str) -> bool:
        stored = self._jobs.get(job.job_id)
        if stored is None or stored.record.status not in _UNFINISHED:
            return False
        stored.record.status = JobStatus.RUNNING
        stored.record.worker = worker_id
        stored.record.started_at = time.time()
        await self._append_event(stored, EventType.RUNNING, {"worker": worker_id, "deliveries": job.deliveries})
        return True

    async def keep_alive(self, worker_id: str, jobs: Sequence[ClaimedJob]) -> list[ClaimedJob]:
        now = time.monotonic()
        lost: list[ClaimedJob] = []
        for job in jobs:
            delivery = self._pending.get(job.message_id)
            if delivery is None or delivery.consumer != worker_id:
                lost.append(job)
            else:
                delivery.delivered_at = now
        return lost

    async def progress(self, job_id: str, step: int, total: int) -> None:
        stored = self._jobs.get(job_id)
        if stored is None or stored.record.status != JobStatus.RUNNING:
            return
        stored.record.progress = JobProgress(step=step, total=total)
        await self._append_event(stored, EventType.PROGRESS, {"step": step, "total": total})

    async def is_canceled(self, job_id: str) -> bool:
        self._purge_expired()
        stored = self._jobs.get(job_id)
        # A vanished (expired) job has nobody waiting for it: stop too.
        return stored is None or stored.cancel_requested or stored.record.status == JobStatus.CANCELED

    async def complete(
        self, job: ClaimedJob, images: list[bytes], seeds: list[int], timings: dict[str, float]
    ) -> bool:
        stored = self._jobs.get(job.job_id)
        applied = stored is not None and stored.record.status in _UNFINISHED
        if applied:
            stored.images = list(images)
            stored.record.n_images = len(images)
            stored.record.image_seeds = list(seeds)
            stored.record.timings = dict(timings)
            await self._finish(
                stored,
                JobStatus.SUCCEEDED,
                EventType.SUCCEEDED,
                {"n_images": len(images), "seeds": list(seeds), "timings": dict(timings)},
            )
        self._ack(job.message_id)  # only now: the result is stored
        return applied

    async def fail(self, job: ClaimedJob, failure: Failure) -> bool:
        applied = await self._fail(job.job_id, failure)
        self._ack(job.message_id)
        return applied

    async def finish_canceled(self, job: ClaimedJob) -> bool:
        stored = self._jobs.get(job.job_id)
        applied = stored is not None and stored.record.status in _UNFINISHED
        if applied:
            await self._finish(stored, JobStatus.CANCELED, EventType.CANCELED, {})
        self._ack(job.message_id)
        return applied

    async def release(self, job: ClaimedJob) -> None:
        stored = self._jobs.get(job.job_id)
        delivery = self._pending.get(job.message_id)
        if stored is None or stored.record.status not in _UNFINISHED:
            self._ack(job.message_id)
            return
        stored.record.status = JobStatus.QUEUED
        stored.record.worker = None
        stored.released = True
        await self._append_event(stored, EventType.QUEUED, {"released": True})
        if delivery is not None:
            # Same choice as the Redis queue: hand the delivery to "released", idle for ever,
            # so the next claim of any worker takes it over first.
            delivery.consumer = _RELEASED_CONSUMER
            delivery.delivered_at = float("-inf")
        self._entry_added.notify()

    async def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        payload = json.loads(json.dumps({**info, "worker_id": worker_id, "at": time.time()}))
        self._heartbeats[worker_id] = (time.monotonic() + self._heartbeat_ttl_s, payload)

    # ---------------------------------------------------------- test support

    def stored_job_ids(self) -> set[str]:
        """Ids of every job still held in memory, expired ones purged first."""
        self._purge_expired()
        return set(self._jobs)

    # --------------------------------------------------------------- helpers

    def _take_over_idle(self, worker_id: str, max_jobs: int) -> list[str]:
        """Move up to ``max_jobs`` deliveries idle longer than the claim timeout to ``worker_id``."""
        now = time.monotonic()
        taken: list[str] = []
        for message_id in sorted(self._pending, key=lambda m: int(m.split("-")[0])):
            if len(taken) >= max_jobs:
                break
            delivery = self._pending[message_id]
            if now - delivery.delivered_at < self._claim_timeout_s:
                continue
            if message_id not in self._entries:  # deleted (canceled while held): drop from the PEL
                del self._pending[message_id]
                continue
            delivery.consumer = worker_id
            delivery.delivered_at = now
            taken.append(message_id)
        return taken

    async def _accept_delivery(self, message_id: str, *, taken_over: bool) -> ClaimedJob | None:
        """Count a delivery and return the job if it may run; otherwise settle and ack it."""
        stored = self._jobs.get(self._entries.get(message_id, ""))
        if stored is None or stored.record.status not in _UNFINISHED:
            self.counters.skipped_finished += 1
            self._ack(message_id)
            return None
        if stored.cancel_requested:
            await self._finish(stored, JobStatus.CANCELED, EventType.CANCELED, {})
            self.counters.canceled_on_claim += 1
            self._ack(message_id)
            return None
        released, stored.released = stored.released, False
        if not released:
            stored.record.deliveries += 1
        if stored.record.deliveries > self._max_deliveries:
            await self._fail(stored.record.id, Failure.max_deliveries(self._max_deliveries))
            self.counters.failed_max_deliveries += 1
            self._ack(message_id)
            return None
        reclaimed = taken_over and not released
        if reclaimed:
            self.counters.reclaimed += 1
        return ClaimedJob(
            job_id=stored.record.id,
            message_id=message_id,
            params=json.loads(json.dumps(stored.record.params)),
            n_images=stored.record.n_images,
            input_names=tuple(sorted(stored.inputs)),
            deliveries=stored.record.deliveries,
            reclaimed=reclaimed,
        )

    async def _fail(self, job_id: str, failure: Failure) -> bool:
        stored = self._jobs.get(job_id)
        if stored is None or stored.record.status not in _UNFINISHED:
            return False
        stored.record.error = str(failure)
        stored.record.failure = failure
        await self._finish(stored, JobStatus.FAILED, EventType.FAILED, failed_event_data(failure))
        return True

    async def _finish(self, stored: _StoredJob, status: JobStatus, event: EventType, data: dict[str, Any]) -> None:
        """Terminal transition: status, timestamp, event; inputs dropped; expiry scheduled."""
        stored.record.status = status
        stored.record.finished_at = time.time()
        stored.inputs.clear()
        stored.cancel_requested = False
        stored.expires_at = time.monotonic() + self._result_ttl_s
        heapq.heappush(self._expiry_heap, (stored.expires_at, stored.record.id))
        if stored.idempotency_key is not None and stored.idempotency_key in self._idempotency:
            self._idempotency[stored.idempotency_key] = (stored.record.id, stored.expires_at)
        await self._append_event(stored, event, data)

    def _ack(self, message_id: str) -> None:
        """Acknowledge a delivery and delete its entry (the log holds only unfinished jobs)."""
        self._pending.pop(message_id, None)
        self._entries.pop(message_id, None)
        self._undelivered.pop(message_id, None)

    async def _append_event(self, stored: _StoredJob, event_type: EventType, data: dict[str, Any]) -> None:
        event_id = f"{next(self._event_seq)}-0"
        stored.events.append(JobEvent(id=event_id, type=event_type, data=json.loads(json.dumps(data))))
        self._event_added.notify()

    def _purge_expired(self) -> None:
        """Drop finished jobs and idempotency keys whose TTL has passed."""
        now = time.monotonic()
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _, job_id = heapq.heappop(self._expiry_heap)
            stored = self._jobs.get(job_id)
            if stored is not None and stored.expires_at is not None and stored.expires_at <= now:
                del self._jobs[job_id]
        for key in [k for k, (_, expires_at) in self._idempotency.items() if expires_at <= now]:
            del self._idempotency[key]

    @staticmethod
    def _copy(record: JobRecord) -> JobRecord:
        """Callers get copies: the stored record changes only through the queue."""
        return record.model_copy(deep=True)
