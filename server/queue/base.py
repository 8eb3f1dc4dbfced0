"""The job queue interface shared by the API (client side) and the workers.

Lifecycle (docs/architecture.md §3)::

    queued -> running -> succeeded | failed | canceled
       ^         |
       +---------+  release() on graceful shutdown, or a reclaim after a crash

Terminal states are final: the first terminal transition wins and later ones
(a duplicate ``complete`` after a redelivery, a ``fail`` racing a ``cancel``)
change nothing but acknowledge the delivery.

Delivery guarantees (docs/architecture.md §2 invariant 4, "no job is lost"):

* a delivery is acknowledged only after its outcome (result images, failure,
  cancellation) is stored;
* a delivery whose worker stops renewing it for ``claim_timeout_s`` is handed
  to another worker by :meth:`JobQueue.claim` (``ClaimedJob.reclaimed``);
* each delivery increments ``JobRecord.deliveries``; the delivery after the
  ``max_deliveries``-th fails the job with the failure kind ``max_deliveries``
  instead of running it again, so a job that crashes workers cannot loop.

Workers therefore see a job at least once, possibly twice (a slow worker and
the one that reclaimed its job); ``complete`` is idempotent so clients never
see duplicate or overwritten results.

Everything stored is JSON or raw bytes, never pickle.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from pydantic import BaseModel, Field

from ediffi.failure import Failure, FailureKind, QueueFull  # noqa: F401  (QueueFull: re-exported)


class JobStatus(str, Enum):
    """Where a job is in its lifecycle."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """True for the final states, which never change again."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

#: Progress events: a worker publishes at most one, and the API relays at most one to an SSE
#: client, per this many seconds (newer ones replace older).
PROGRESS_INTERVAL_S = 0.25

# A job event's id as both queues write it: "<ms>-<seq>" (or "<ms>"), each part an unsigned 64-bit integer.
_EVENT_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")


def parse_event_id(text: str) -> tuple[int, int] | None:
    """``(ms, seq)`` of an event id (``seq`` 0 when absent); None when ``text`` is not one."""
    match = _EVENT_ID.match(text)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2) or 0)
    return (ms, seq) if ms < 2**64 and seq < 2**64 else None


class JobProgress(BaseModel):
    """Sampling progress of a running job: ``step`` of ``total`` denoiser steps."""

    step: int = 0
    total: int = 0


class JobRecord(BaseModel):
    """What the queue knows about one job; the API serialises it as is."""

    id: str
    status: JobStatus
    params: dict[str, Any] = Field(description="The validated request, opaque JSON to the queue.")
    progress: JobProgress = Field(default_factory=JobProgress)
    error: str | None = Field(default=None, description="A failed job's failure as one line (field: message).")
    failure: Failure | None = Field(default=None, description="A failed job's structured failure.")
    queued_at: float | None = Field(default=None, description="Epoch seconds of submission.")
    started_at: float | None = Field(default=None, description="Epoch seconds of the latest start.")
    finished_at: float | None = Field(default=None, description="Epoch seconds of the terminal transition.")
    worker: str | None = Field(default=None, description="Worker that ran (or runs) the job.")
    deliveries: int = Field(default=0, description="How many times the job was handed to a worker.")
    n_images: int = Field(description="Images requested; after success, images stored.")
    image_seeds: list[int] = Field(default_factory=list, description="Seed of each result image.")
    timings: dict[str, float] = Field(default_factory=dict, description="Worker-reported timings, seconds.")


class EventType(str, Enum):
    """Kinds of entries on a job's event stream."""

    QUEUED = "queued"
    RUNNING = "running"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class JobEvent(BaseModel):
    """One event of a job. ``id`` is opaque, ordered, and usable as an SSE ``Last-Event-ID``."""

    id: str
    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class ClaimedJob:
    """A job handed to a worker by :meth:`JobQueue.claim`; pass it back to the worker-side methods."""

    job_id: str
    message_id: str  # the delivery: stream entry id (Redis) or queue sequence id (in process)
    params: dict[str, Any]
    n_images: int
    input_names: tuple[str, ...]
    deliveries: int  # including this one
    reclaimed: bool  # taken over from a worker that stopped renewing it
    # Suspected of crashing a worker it shared with other jobs: run it alone (claim nothing
    # more while it runs), so a crash then is attributed to it (and counts toward max_deliveries).
    exclusive: bool = False


@dataclass
class QueueCounters:
    """Cumulative counts of terminal transitions no worker sees (settled inside :meth:`JobQueue.claim`,
    or applied by :meth:`JobQueue.cancel`) and of reclaims, for metrics."""

    reclaimed: int = 0  # deliveries taken over from a silent worker
    failed_max_deliveries: int = 0  # jobs failed instead of delivered again
    skipped_finished: int = 0  # redeliveries of jobs that were already terminal (acked, dropped)
    canceled_on_claim: int = 0  # jobs whose cancel was pending when redelivered
    lost_on_claim: int = 0  # deliveries whose job record was gone (evicted, Redis restarted empty, too old)
    # Client side: queued jobs ``cancel`` finished itself (no worker ever counts them; the API exports them).
    canceled_queued: int = 0

    def snapshot(self) -> dict[str, int]:
        """A copy as a plain dict."""
        return dataclasses.asdict(self)


class QueueError(Exception):
    """Base class of queue errors the API maps to HTTP statuses."""


class QueueUnavailable(QueueError):
    """The queue backend cannot be reached (the API answers 503)."""


def failed_event_data(failure: Failure) -> dict[str, Any]:
    """Data of a job's ``failed`` event: the structured failure plus its one-line form."""
    return {"error": str(failure), **failure.to_dict()}


class JobQueue(abc.ABC):
    """Asynchronous job queue: the API submits and observes jobs, workers claim and finish them.

    Implementations take their limits as constructor arguments (``max_queue``,
    ``claim_timeout_s``, ``max_deliveries``, ``result_ttl_s``,
    ``heartbeat_ttl_s``, ``max_input_bytes``, ``max_unfinished_per_owner``,
    ``max_job_age_s``). Every method may raise :class:`QueueUnavailable`.
    Finished jobs (hash, images, events, idempotency key) expire
    ``result_ttl_s`` after their terminal transition; their inputs are deleted
    at that transition. Unfinished jobs (hash, events, inputs, idempotency
    key) expire ``max_job_age_s`` after submission: a bound on what a job
    nobody runs can hold in memory, far above any real wait.
    """

    counters: QueueCounters

    # ----------------------------------------------------------- client side

    @abc.abstractmethod
    async def submit(
        self,
        params: dict[str, Any],
        inputs: dict[str, bytes],
        n_images: int,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        """Enqueue a job and return its record (status ``queued``).

        ``inputs`` are large byte blobs (style image, color map) stored beside
        the job, fetched by the worker with :meth:`load_input`. With an
        ``idempotency_key`` already used by a live job, that job is returned
        and nothing new is queued (atomic: concurrent submissions under one
        key create one job). Raises :class:`QueueFull` when :meth:`depth`
        has reached ``max_queue``, when ``owner`` (the API key; None: the
        anonymous callers together) has ``max_unfinished_per_key`` unfinished
        jobs, or when the inputs would take the bytes held by unfinished
        jobs' inputs over ``max_input_bytes``. All checks and the enqueue are
        one atomic step.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None if unknown or expired."""

    @abc.abstractmethod
    async def get_image(self, job_id: str, index: int) -> bytes | None:
        """Bytes of result image ``index`` of a succeeded job, or None."""

    @abc.abstractmethod
    async def events(self, job_id: str, after: str | None = None, block_ms: int = 0) -> list[JobEvent]:
        """Events of the job after event id ``after`` (None: from the first).

        If there are none yet, waits up to ``block_ms`` milliseconds for new
        ones (``block_ms <= 0``: does not wait). Raises ValueError for an
        ``after`` that is not an event id.
        """

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> JobRecord | None:
        """Ask a job to stop; return its record after the request, or None if unknown.

        A queued job becomes ``canceled`` at once and is never run. For a
        running job the cancel flag is set; the worker sees it through
        :meth:`is_canceled` at its next tick and calls :meth:`finish_canceled`
        (the record stays ``running`` until then). A finished job is unchanged.
        """

    @abc.abstractmethod
    async def depth(self) -> int:
        """Unfinished jobs in the queue: waiting for a worker plus held by one."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the backend answers; raise :class:`QueueUnavailable` otherwise."""

    @abc.abstractmethod
    async def workers_alive(self) -> int:
        """Workers whose heartbeat has not expired."""

    async def memory(self) -> tuple[int, int] | None:
        """(bytes the backend uses, its limit; 0: none), or None where it keeps no separate memory."""
        return None

    @abc.abstractmethod
    async def stored_bytes(self) -> dict[str, tuple[int, int]]:
        """``{"inputs": (held, budget), "results": (held, budget)}``: the bytes of unfinished jobs'
        uploads and of finished jobs' images (until they expire), each against its submit budget."""

    @abc.abstractmethod
    async def rate_limit(self, key: str, per_minute: int) -> bool:
        """Count one request of ``key`` in the current minute; True if within ``per_minute``.

        A fixed window per calendar minute (epoch seconds // 60): cheap and
        shared by every API replica; a burst of up to twice the rate across a
        minute boundary is accepted.
        """

    @abc.abstractmethod
    async def note_waiting(self, caller: str, job_id: str, ttl_s: float) -> None:
        """Record ``job_id`` as the job ``caller`` now waits for (its latest; forgotten after ``ttl_s``
        at the latest), shared by every API replica: A1111's /progress and /interrupt act on it."""

    @abc.abstractmethod
    async def waiting_job(self, caller: str) -> str | None:
        """The job :meth:`note_waiting` recorded for ``caller``, if it is still recorded."""

    @abc.abstractmethod
    async def forget_waiting(self, caller: str, job_id: str) -> None:
        """Forget ``caller``'s wait if it is still for ``job_id`` (a later wait of the caller stays)."""

    # ----------------------------------------------------------- worker side

    @abc.abstractmethod
    async def claim(self, worker_id: str, max_jobs: int, block_ms: int = 0) -> list[ClaimedJob]:
        """Hand at most ``max_jobs`` jobs to ``worker_id``.

        First takes over deliveries idle longer than ``claim_timeout_s`` (their
        worker died or hung; jobs handed back by :meth:`release` are idle at
        once), then reads new jobs, blocking up to ``block_ms`` only if nothing
        was taken over. Deliveries that must not run are resolved here and
        never returned: a job beyond ``max_deliveries`` is failed, a job with
        a pending cancel is canceled, a job already finished (a redelivery
        after a crash between storing its result and the acknowledgement) is
        acknowledged and dropped, and a job whose record is gone (evicted, lost
        in a Redis restart, past ``max_job_age_s``) is acknowledged, logged as a
        WARNING and counted in ``counters.lost_on_claim``.
        """

    @abc.abstractmethod
    async def load_input(self, job_id: str, name: str) -> bytes | None:
        """Bytes of the job's input ``name``, or None if absent."""

    @abc.abstractmethod
    async def mark_running(self, job: ClaimedJob, worker_id: str) -> bool:
        """Record that ``worker_id`` started the job (status ``running``, ``started_at``).

        Returns False if the job was canceled or finished since it was claimed;
        the worker must then not run it and call :meth:`finish_canceled`,
        which acknowledges the delivery.
        """

    @abc.abstractmethod
    async def keep_alive(self, worker_id: str, jobs: Sequence[ClaimedJob]) -> list[ClaimedJob]:
        """Renew the worker's hold on ``jobs`` so they are not reclaimed.

        Call it more often than ``claim_timeout_s`` (e.g. with every
        :meth:`heartbeat`) for every job the worker holds. Returns the jobs
        the worker no longer holds (taken over by another worker after a
        stall, or already finished): stop working on those.
        """

    @abc.abstractmethod
    async def progress(self, job_id: str, step: int, total: int) -> None:
        """Record progress of a running job and append a ``progress`` event (the caller throttles)."""

    @abc.abstractmethod
    async def is_canceled(self, job_id: str) -> bool:
        """True if the job was asked to stop (or is already canceled)."""

    @abc.abstractmethod
    async def complete(
        self, job: ClaimedJob, images: list[bytes], seeds: list[int], timings: dict[str, float]
    ) -> bool:
        """Store the result images and mark the job ``succeeded``, then acknowledge the delivery.

        Idempotent: if the job is already terminal nothing is stored or
        overwritten (the delivery is still acknowledged). Returns True if this
        call stored the result.
        """

    @abc.abstractmethod
    async def fail(self, job: ClaimedJob, failure: Failure) -> bool:
        """Mark the job ``failed`` with ``failure`` and acknowledge. False if it was already terminal."""

    @abc.abstractmethod
    async def finish_canceled(self, job: ClaimedJob) -> bool:
        """Mark the job ``canceled`` and acknowledge. False if it was already terminal."""

    @abc.abstractmethod
    async def release(self, job: ClaimedJob) -> None:
        """Hand an unfinished job back (graceful shutdown): status ``queued``, claimable at once.

        The release does not count as a delivery attempt.
        """

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None:
        """Report the worker alive for ``heartbeat_ttl_s``, with JSON ``info`` (slots, backend, ...)."""

    # -------------------------------------------------------------- lifecycle

    async def warn_if_evicting(self) -> None:
        """Log one WARNING if the backend may drop job data under memory pressure (checked at process start)."""

    async def close(self) -> None:
        """Release connections; the queue must not be used afterwards."""
