"""Job queue: the interface, its two implementations, and the factory that picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ediffi.failure import Failure, FailureKind
from server.queue.base import (
    PROGRESS_INTERVAL_S,
    TERMINAL_STATUSES,
    ClaimedJob,
    EventType,
    JobEvent,
    JobProgress,
    JobQueue,
    JobRecord,
    JobStatus,
    QueueCounters,
    QueueError,
    QueueFull,
    QueueUnavailable,
    failed_event_data,
    parse_event_id,
)
from server.queue.memory import InProcessQueue
from server.queue.redis_streams import RedisStreamsQueue

if TYPE_CHECKING:
    from server.settings import Settings

__all__ = [
    "PROGRESS_INTERVAL_S",
    "TERMINAL_STATUSES",
    "ClaimedJob",
    "EventType",
    "Failure",
    "FailureKind",
    "InProcessQueue",
    "JobEvent",
    "JobProgress",
    "JobQueue",
    "JobRecord",
    "JobStatus",
    "QueueCounters",
    "QueueError",
    "QueueFull",
    "QueueUnavailable",
    "RedisStreamsQueue",
    "make_queue",
    "queue_limits",
    "failed_event_data",
    "parse_event_id",
]


def queue_limits(settings: "Settings") -> dict[str, Any]:
    """The constructor limits of either queue implementation, from the settings."""
    return dict(
        max_queue=settings.max_queue,
        claim_timeout_s=settings.claim_timeout_s,
        max_deliveries=settings.max_deliveries,
        result_ttl_s=settings.result_ttl_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        max_input_bytes=settings.max_queued_input_bytes,
        max_result_bytes=settings.max_stored_result_bytes,
        max_unfinished_per_owner=settings.max_unfinished_per_key,
        max_job_age_s=settings.max_job_age_s,
    )


def make_queue(settings: "Settings", *, key_prefix: str | None = None) -> JobQueue:
    """The queue the settings ask for: Redis Streams if ``redis_url`` is set, else in process.

    Call it inside the event loop that will use the queue (once per process);
    ``key_prefix`` overrides the default Redis key prefix (tests, shared Redis).
    """
    limits = queue_limits(settings)
    if settings.redis_url:
        if key_prefix is not None:
            limits["prefix"] = key_prefix
        return RedisStreamsQueue.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            blocking_connections=settings.redis_blocking_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
            command_timeout_s=settings.redis_command_timeout_s,
            **limits,
        )
    return InProcessQueue(**limits)
