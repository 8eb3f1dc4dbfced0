"""Every Redis key name the service uses, in one place (as arq does).

All keys share a configurable prefix (default ``"ediffi:"``) so several
deployments, or several tests, can share one Redis without colliding.

Layout (with the default prefix)::

    ediffi:jobs                     stream of job ids (field ``job_id``); consumer group ``workers``
    ediffi:job:{id}                 hash: status, params (JSON), progress, error, timestamps, worker, ...
    ediffi:job:{id}:input:{name}    raw bytes of one large input (style image, color map)
    ediffi:job:{id}:image:{k}       raw PNG bytes of result image k (TTL result_ttl_s)
    ediffi:job:{id}:events          stream of lifecycle/progress events (SSE replay)
    ediffi:job:{id}:cancel          present while a cancel of a running job is pending
    ediffi:idem:{key}               job id submitted under an Idempotency-Key (SET NX)
    ediffi:worker:{id}              worker heartbeat, JSON info (TTL heartbeat_ttl_s)
    ediffi:workers                  sorted set: worker id -> heartbeat expiry (ms, Redis clock)
    ediffi:rate:{key}:{minute}      fixed-window request counter of one API key
    ediffi:inputs:bytes             bytes of the inputs of unfinished jobs (the submit budget)
    ediffi:inputs:jobs              hash: job id -> its input bytes counted in inputs:bytes
    ediffi:inputs:deadlines         sorted set: job id by the epoch ms its unfinished life ends
    ediffi:owner:{key}:jobs         sorted set: unfinished jobs of one API key, by the same deadline
    ediffi:results:bytes            bytes of the result images finished jobs hold (the submit budget)
    ediffi:results:jobs             hash: job id -> its image bytes counted in results:bytes
    ediffi:results:deadlines        sorted set: job id by the epoch ms its images expire
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PREFIX = "ediffi:"


@dataclass(frozen=True)
class RedisKeys:
    """Builds key names under one prefix. Pure string formatting, no I/O."""

    prefix: str = DEFAULT_PREFIX

    @property
    def jobs_stream(self) -> str:
        """The stream every submitted job is appended to (one entry per job)."""
        return f"{self.prefix}jobs"

    @property
    def consumer_group(self) -> str:
        """Name of the workers' consumer group on :attr:`jobs_stream` (a name, not a key)."""
        return "workers"

    @property
    def released_consumer(self) -> str:
        """Consumer that holds jobs handed back on graceful shutdown until another worker takes them."""
        return "released"

    def job(self, job_id: str) -> str:
        """Hash with the job's status, params and timestamps."""
        return f"{self.prefix}job:{job_id}"

    def job_input(self, job_id: str, name: str) -> str:
        """Raw bytes of one named input of a job."""
        return f"{self.prefix}job:{job_id}:input:{name}"

    def job_image(self, job_id: str, index: int) -> str:
        """Raw bytes of result image ``index`` (0-based) of a job."""
        return f"{self.prefix}job:{job_id}:image:{index}"

    def job_events(self, job_id: str) -> str:
        """Stream of the job's events; entry ids double as SSE event ids."""
        return f"{self.prefix}job:{job_id}:events"

    def job_cancel(self, job_id: str) -> str:
        """Flag set when a running job is asked to stop; the worker checks it every tick."""
        return f"{self.prefix}job:{job_id}:cancel"

    def idempotency(self, key: str) -> str:
        """Job id that was created under a client's Idempotency-Key."""
        return f"{self.prefix}idem:{key}"

    def worker_heartbeat(self, worker_id: str) -> str:
        """Heartbeat of one worker; it expires when the worker stops renewing it."""
        return f"{self.prefix}worker:{worker_id}"

    @property
    def worker_heartbeat_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat key (tools only: the service never scans)."""
        return f"{self.prefix}worker:*"

    @property
    def worker_heartbeats(self) -> str:
        """Sorted set of worker ids scored by heartbeat expiry (ms): live workers without a SCAN."""
        return f"{self.prefix}workers"

    def rate(self, key: str, minute: int) -> str:
        """Request counter of one API key during one minute (epoch seconds // 60)."""
        return f"{self.rate_prefix(key)}{minute}"

    def waiting(self, caller: str) -> str:
        """The job a caller's synchronous A1111 request waits for (JobQueue.note_waiting)."""
        return f"{self.prefix}waiting:{caller}"

    def rate_prefix(self, key: str) -> str:
        """The rate counters of one API key without the minute (the rate script appends Redis's own)."""
        return f"{self.prefix}rate:{key}:"

    def byte_budget(self, kind: Literal["inputs", "results"]) -> tuple[str, str, str]:
        """The keys of one submit budget, ``inputs`` (unfinished jobs' uploads) or ``results`` (finished
        jobs' images): (total bytes, hash job id -> its bytes, sorted set of job ids by deadline ms)."""
        return f"{self.prefix}{kind}:bytes", f"{self.prefix}{kind}:jobs", f"{self.prefix}{kind}:deadlines"

    @property
    def input_bytes(self) -> str:
        """Total bytes of the inputs of unfinished jobs (checked against the budget at submit)."""
        return self.byte_budget("inputs")[0]

    def owner_jobs(self, owner: str) -> str:
        """Unfinished jobs of one API key (or of anonymous callers)."""
        return f"{self.prefix}owner:{owner}:jobs"
