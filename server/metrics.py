"""Every Prometheus metric of the service, defined once (docs/architecture.md §4).

Naming: prefix ``ediffi_``, base units (seconds, bytes), ``_total`` counters,
``_seconds`` histograms, and no per-request labels (no job ids, prompts or
raw paths: the HTTP ``endpoint`` label is the route *template*, e.g.
``/jobs/{job_id}``). Every label takes a bounded set of values.

One :class:`Metrics` per process, on its own registry, so tests build fresh
ones and the embedded ``ediffi serve`` shares one instance between its API
and its worker. A process registers only the metrics of its ``roles``
(``ediffi api``: api, ``ediffi worker``: worker, ``ediffi serve``: both):
a metric nobody in the process updates would be exported as a constant 0 and
corrupt every ``max()``/``min()``/``avg()`` across targets (a worker's
``ediffi_workers_alive 0`` beside the API's real count, say). The metrics of
the other role still exist as attributes, unregistered, so code shared by
both roles may update them. One metric is both roles': ``ediffi_jobs_completed_total``,
of which the API exports only ``status="canceled"`` (the queued jobs it cancels
never reach a worker). Who updates what:

=========================================== ========== ============================================
metric                                      labels     role: updated by
=========================================== ========== ============================================
ediffi_http_requests_total                  endpoint,  API (middleware), every request
                                            method,
                                            status
ediffi_http_request_duration_seconds        endpoint   API (middleware), until the response ends
ediffi_jobs_submitted_total                            API, each newly queued job (not replays)
ediffi_queue_depth                                     API on every /metrics scrape (and on submit)
ediffi_workers_alive                                   API on every /metrics scrape and /readyz
ediffi_queue_up                                        API: 1 if the queue answered the last check
ediffi_queue_memory_used_bytes                         API on every /metrics scrape: Redis's used_memory
ediffi_queue_memory_limit_bytes                        API on every /metrics scrape: its maxmemory (0: none)
ediffi_queue_stored_bytes                   kind       API on every /metrics scrape: bytes held against a
                                                       budget, kind inputs (unfinished jobs' uploads) or
                                                       results (finished jobs' images, until they expire)
ediffi_queue_stored_budget_bytes            kind       API on every /metrics scrape: that budget (429 beyond)
ediffi_job_latency_seconds                             worker: finished_at - queued_at of a job
ediffi_queue_wait_seconds                              worker: started_at - queued_at of a job
ediffi_active_requests                                 worker: jobs it holds in its engine now
ediffi_batch_size                           stage,     worker: rows of each denoiser forward pass
                                            expert
ediffi_denoiser_forward_seconds             stage,     worker: wall time of each forward pass
                                            expert
ediffi_images_generated_total                          worker: images stored by ``complete``
ediffi_jobs_completed_total                 status     worker: terminal transitions it made
                                                       (succeeded, failed, canceled); API:
                                                       ``canceled`` only, the queued jobs it
                                                       canceled (no worker sees those), so over
                                                       all targets submitted = sum of outcomes
ediffi_jobs_failed_total                    reason     worker: failures, ``reason`` in
                                                       :data:`FAILURE_REASONS`; ``lost`` also
                                                       counts outcomes dropped, and queued jobs
                                                       skipped, because the job's record was gone
                                                       (evicted, a Redis restart without
                                                       persistence, past its age limit)
ediffi_jobs_reclaimed_total                            worker: jobs taken over from a dead worker
ediffi_worker_heartbeats_total                         worker: heartbeats sent
process_*, python_info, python_gc_*                    both: prometheus_client's process
                                                       (RSS, CPU seconds, open fds), platform
                                                       and garbage-collector collectors
=========================================== ========== ============================================

Helpers for the worker: :meth:`Metrics.observe_job_finished`,
:meth:`Metrics.job_failed` (a failure's kind is its label) and
:meth:`Metrics.sync_queue_counters` (turns :class:`~server.queue.QueueCounters`
into counter increments).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ediffi.failure import Failure, FailureKind

if TYPE_CHECKING:
    from server.queue import JobRecord, QueueCounters

__all__ = ["CONTENT_TYPE_LATEST", "FAILURE_REASONS", "ROLES", "Metrics"]

#: The only values of ``ediffi_jobs_failed_total{reason}``: the failure kinds a failed job can carry.
FAILURE_REASONS = tuple(kind.value for kind in FailureKind if kind is not FailureKind.CANCELED)

#: Process roles: what ``ediffi api`` and ``ediffi worker`` update; ``ediffi serve`` is both.
ROLES = ("api", "worker")

# Seconds: from a fast 64 px job to a long wait in a full queue.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """All service metrics; those of ``roles`` on one registry (a fresh one unless ``registry`` is given)."""

    def __init__(self, registry: CollectorRegistry | None = None, roles: Iterable[str] = ROLES) -> None:
        self.roles = frozenset(roles)
        if not self.roles or not self.roles <= set(ROLES):
            raise ValueError(f"roles must be a non-empty subset of {ROLES}, not {sorted(self.roles)}")
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # Operators' RSS, CPU and open-fd panels; the default registry would have them, ours must ask.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        # registry=None: the metric works but is not exported (see the module docstring).
        r = self.registry if "api" in self.roles else None

        # --- API ------------------------------------------------------------
        self.http_requests = Counter(
            "ediffi_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            "ediffi_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["endpoint"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.jobs_submitted = Counter(
            "ediffi_jobs_submitted_total", "Jobs newly queued by the API (idempotent replays excluded).", registry=r
        )
        self.queue_depth = Gauge(
            "ediffi_queue_depth", "Unfinished jobs in the queue (waiting plus held by workers).", registry=r
        )
        self.workers_alive = Gauge("ediffi_workers_alive", "Workers whose heartbeat has not expired.", registry=r)
        self.queue_up = Gauge("ediffi_queue_up", "1 if the queue backend answered the last check, else 0.", registry=r)
        self.queue_memory_used = Gauge(
            "ediffi_queue_memory_used_bytes", "Memory Redis uses (INFO memory used_memory).", registry=r
        )
        self.queue_memory_limit = Gauge(
            "ediffi_queue_memory_limit_bytes", "Redis's maxmemory; 0: no limit.", registry=r
        )
        self.queue_stored = Gauge(
            "ediffi_queue_stored_bytes",
            "Bytes held against a submit budget: inputs (unfinished jobs' uploads), results (finished jobs' images).",
            ["kind"], registry=r,
        )
        self.queue_stored_budget = Gauge(
            "ediffi_queue_stored_budget_bytes", "The submit budget of each kind of stored bytes (429 beyond).",
            ["kind"], registry=r,
        )

        # --- Worker ---------------------------------------------------------
        r = self.registry if "worker" in self.roles else None
        self.job_latency = Histogram(
            "ediffi_job_latency_seconds",
            "End-to-end job latency, queued_at to finished_at.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ediffi_queue_wait_seconds",
            "Time a job waited for a worker, queued_at to started_at.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_requests = Gauge(
            "ediffi_active_requests", "Requests (jobs) the worker's engine holds right now.", registry=r
        )
        self.batch_size = Histogram(
            "ediffi_batch_size",
            "Rows per denoiser forward pass, by stage and expert.",
            ["stage", "expert"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.denoiser_forward = Histogram(
            "ediffi_denoiser_forward_seconds",
            "Wall time of one denoiser forward pass, by stage and expert.",
            ["stage", "expert"],
            buckets=_FORWARD_BUCKETS,
            registry=r,
        )
        self.images_generated = Counter("ediffi_images_generated_total", "Result images stored.", registry=r)
        # Both roles: the API finishes the queued jobs it cancels (see the module docstring).
        self.jobs_completed = Counter(
            "ediffi_jobs_completed_total",
            "Jobs that reached a terminal state, by status (succeeded, failed, canceled).",
            ["status"],
            registry=self.registry,
        )
        self.jobs_failed = Counter(
            "ediffi_jobs_failed_total",
            "Failed jobs by failure kind (" + ", ".join(FAILURE_REASONS) + ").",
            ["reason"],
            registry=r,
        )
        self.jobs_reclaimed = Counter(
            "ediffi_jobs_reclaimed_total", "Jobs taken over from a worker that stopped renewing them.", registry=r
        )
        self.worker_heartbeats = Counter("ediffi_worker_heartbeats_total", "Worker heartbeats sent.", registry=r)

        # Label values known up front show as 0 instead of being absent.
        for reason in FAILURE_REASONS:
            self.jobs_failed.labels(reason=reason)
        # The API alone updates only "canceled": no stand-in zeros for the worker's statuses.
        for status in ("succeeded", "failed", "canceled") if "worker" in self.roles else ("canceled",):
            self.jobs_completed.labels(status=status)
        self._synced_counters: dict[str, int] = {}
        self._followed_counters: list["QueueCounters"] = []

    # ------------------------------------------------------------- helpers

    def job_failed(self, failure: Failure | None) -> None:
        """Count one failed job (terminal transition made by this process)."""
        kind = failure.kind if failure is not None else FailureKind.INTERNAL
        self.jobs_failed.labels(reason=kind.value).inc()
        self.jobs_completed.labels(status="failed").inc()

    def observe_job_finished(self, record: "JobRecord") -> None:
        """Observe a job this process finished: latency histograms, status, images.

        Call once per terminal transition the worker applied (``complete`` /
        ``fail`` / ``finish_canceled`` returned True), with the record read
        back from the queue (it carries ``queued_at``/``started_at``/``finished_at``).
        """
        status = record.status.value
        if record.queued_at is not None and record.finished_at is not None:
            self.job_latency.observe(max(0.0, record.finished_at - record.queued_at))
        if status == "succeeded":
            self.images_generated.inc(record.n_images)
            self.jobs_completed.labels(status="succeeded").inc()
        elif status == "failed":
            self.job_failed(record.failure)
        elif status == "canceled":
            self.jobs_completed.labels(status="canceled").inc()

    def observe_job_started(self, record: "JobRecord") -> None:
        """Observe a job's queue wait when the worker marks it running."""
        if record.queued_at is not None and record.started_at is not None:
            self.queue_wait.observe(max(0.0, record.started_at - record.queued_at))

    def follow_queue_counters(self, counters: "QueueCounters") -> None:
        """Sync ``counters`` (the API process's queue) on every :meth:`render`: the API has no loop
        of its own that would (a worker syncs after each claim; ``ediffi serve`` needs neither)."""
        self._followed_counters.append(counters)

    def sync_queue_counters(self, counters: "QueueCounters") -> None:
        """Add what the queue's own counters gained since the last call (one queue per process).

        ``reclaimed`` -> ``ediffi_jobs_reclaimed_total``; ``failed_max_deliveries``
        -> ``ediffi_jobs_failed_total{reason="max_deliveries"}`` (and
        ``jobs_completed_total{status="failed"}``); ``lost_on_claim`` -> the same with
        ``reason="lost"``; ``canceled_on_claim`` and ``canceled_queued`` (the client side's
        cancels of queued jobs) -> ``jobs_completed_total{status="canceled"}``.
        """
        snapshot = counters.snapshot()
        delta = {name: value - self._synced_counters.get(name, 0) for name, value in snapshot.items()}
        self._synced_counters = snapshot
        if delta.get("reclaimed", 0) > 0:
            self.jobs_reclaimed.inc(delta["reclaimed"])
        if delta.get("failed_max_deliveries", 0) > 0:
            self.jobs_failed.labels(reason=FailureKind.MAX_DELIVERIES.value).inc(delta["failed_max_deliveries"])
            self.jobs_completed.labels(status="failed").inc(delta["failed_max_deliveries"])
        if delta.get("lost_on_claim", 0) > 0:
            self.jobs_failed.labels(reason=FailureKind.LOST.value).inc(delta["lost_on_claim"])
            self.jobs_completed.labels(status="failed").inc(delta["lost_on_claim"])
        canceled = delta.get("canceled_on_claim", 0) + delta.get("canceled_queued", 0)
        if canceled > 0:
            self.jobs_completed.labels(status="canceled").inc(canceled)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (followed queue counters synced first)."""
        for counters in self._followed_counters:
            self.sync_queue_counters(counters)
        return generate_latest(self.registry)
