"""The worker: pulls jobs from the queue into the engine and stores results.

One asyncio loop owns the queue client; the engine runs on its own thread
and hands progress and outcomes back with `loop.call_soon_threadsafe`. The
worker makes no batching decision (that is the engine scheduler's job):
it claims only as many jobs as the engine says it can take
(`Engine.free_capacity`, from the scheduler's admission limit), so no job
waits inside one worker out of the others' reach and work spreads across
workers, and it acknowledges a job only after its result is stored (the
queue's `complete`).

Per job: claim -> mark_running -> inputs -> engine.submit -> progress events
(at most every 250 ms) -> complete | fail | finish_canceled. A heartbeat
keeps the worker visible (/readyz) and keeps its jobs from being reclaimed
(`keep_alive`); a job another worker took over is dropped from the engine.
On SIGTERM the worker stops claiming, gives running jobs a grace period to
finish, then releases the rest back to the queue.

Failing parts: every background loop (claim, heartbeat and renewal, cancel
polling) survives any exception, logs it and backs off, so a Redis error
reply or a restart costs a few seconds, never the process or its heartbeat.
A job fails with a structured :class:`~ediffi.failure.Failure` from the
engine. ``max_consecutive_engine_failures`` engine faults in a row
(``internal``, ``out_of_memory``: a broken device fails every job it gets)
make the worker stop claiming, hand its held jobs back, and exit non-zero,
so the orchestrator restarts it instead of it failing the whole queue.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from PIL import Image
from pydantic import ValidationError

from ediffi.failure import Failure, FailureKind, InputError
from ediffi.spec import Region
from ediffi.pipeline import GenerationRequest
from engines.engine import Engine, EngineHooks
from engines.request import RequestOutcome
from server.metrics import Metrics
from server.queue import PROGRESS_INTERVAL_S, ClaimedJob, JobQueue, QueueUnavailable
from server.schemas import JobParams
from server.settings import Settings

log = logging.getLogger(__name__)

CANCEL_POLL_INTERVAL_S = 0.5
# How long a stopping worker waits for its background loops (heartbeat, cancel polls) once canceled.
BACKGROUND_STOP_TIMEOUT_S = 5.0
# Pauses after a failing loop iteration: doubling from the first to the last.
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 5.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class ActiveJob:
    job: ClaimedJob
    done: asyncio.Future
    last_progress_sent: float = 0.0
    pending_progress: tuple[int, int] | None = None
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Claimed but not handed to the engine yet (loading inputs): it counts against the engine's room.
    in_engine: bool = False


def unreadable_params(error: ValidationError) -> Failure:
    """An invalid-input failure naming the first field of a job's parameters this worker cannot read."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "params"
    return Failure.invalid_input(field, f"this worker cannot take it ({first['msg']}): is it older than the API?")


def build_request(params: JobParams, inputs: dict[str, bytes]) -> GenerationRequest:
    """The model-side request of a validated job (docs/architecture.md §4 fields)."""
    open_image = lambda name: Image.open(io.BytesIO(inputs[name])) if name in inputs else None  # noqa: E731
    pww = params.paint_with_words
    return GenerationRequest(
        prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps,
        guidance_scale=params.guidance_scale, seed=params.seed, sampler=params.sampler, n=params.n,
        style_image=open_image("style_image"), color_map=open_image("color_map") if pww else None,
        regions=[Region(r.color, r.phrase, r.strength) for r in pww.regions] if pww else [],
        sr_noise_level=params.sr_noise_level, use_karras_sigmas=params.use_karras_sigmas,
        width=params.width, height=params.height, init_image=open_image("init_image"), mask=open_image("mask"),
        padding_mask_crop=params.padding_mask_crop,
        strength=params.strength,
    )


def engine_timings(outcome: RequestOutcome) -> dict[str, float]:
    """The engine's own durations of a job, seconds: ``engine_wait_s`` (submit to
    admission), ``sampling_s`` (admission to done), ``engine_s`` (submit to done).

    Durations, not the engine's epoch timestamps: those would reuse the job's own
    ``queued_at``/``started_at``/``finished_at`` names and never reach the client."""
    queued, started, finished = outcome.queued_at, outcome.started_at, outcome.finished_at
    timings: dict[str, float] = {}
    if queued is not None and started is not None:
        timings["engine_wait_s"] = max(0.0, started - queued)
    if started is not None and finished is not None:
        timings["sampling_s"] = max(0.0, finished - started)
    if queued is not None and finished is not None:
        timings["engine_s"] = max(0.0, finished - queued)
    return timings


def _row_budget(engine: Engine) -> int | None:
    """The engine scheduler's rows-per-tick budget ("auto" resolved from its warm-up; None:
    unlimited), reported with the heartbeat so a benchmark can pin a reference engine to it."""
    config = getattr(getattr(engine, "scheduler", None), "config", None)
    return getattr(config, "max_rows_per_tick", None)


def engine_metric_hooks(metrics: Metrics) -> EngineHooks:
    return EngineHooks(
        on_batch=lambda t: (
            metrics.batch_size.labels(stage=t.stage, expert=t.expert).observe(t.rows),
            metrics.denoiser_forward.labels(stage=t.stage, expert=t.expert).observe(t.seconds),
        ),
    )


class Backoff:
    """Exponential pauses for a loop whose iterations fail: reset by a success."""

    def __init__(self, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return min(self.max_s, self.first_s * 2 ** (self.failures - 1))


class Worker:
    def __init__(self, settings: Settings, queue: JobQueue, engine: Engine, metrics: Metrics,
                 worker_id: str | None = None, shutdown_grace_s: float | None = None):
        self.settings = settings
        self.queue = queue
        self.engine = engine
        self.metrics = metrics
        self.worker_id = worker_id or new_worker_id()
        self.shutdown_grace_s = settings.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        self.active: dict[str, ActiveJob] = {}
        # Jobs given back (shutdown) or taken over by another worker: their
        # engine cancellation must not mark them canceled in the queue.
        self._released: set[str] = set()
        self._stop = asyncio.Event()
        # Set once the shutdown is done: the background loops end at their next turn even where a
        # cancellation was swallowed under them (a queue client that turns it into an ordinary error).
        self._finished = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.consecutive_engine_failures = 0
        #: Set when the worker gave up on its engine; the process must exit non-zero.
        self.unhealthy = False
        #: Set when a tick ran past ``engine_stall_timeout_s``: the engine's threads cannot be stopped, so the
        #: process must exit without joining them (``os._exit``).
        self.engine_stalled = False
        engine.add_hooks(engine_metric_hooks(metrics))

    def stop(self, reason: str = "") -> None:
        """Ask the worker to stop claiming and shut down (signal-safe); the first call logs
        ``stopping (reason): N jobs running, grace G s``."""
        if not self._stop.is_set():
            grace = 0.0 if self.unhealthy else self.shutdown_grace_s
            log.info("worker %s stopping%s: %d jobs running, grace %g s", self.worker_id,
                     f" ({reason})" if reason else "", len(self.active), grace)
        self._stop.set()

    @property
    def free_slots(self) -> int:
        """Jobs to claim now: as many as the engine can still take (``Engine.free_capacity``, its
        scheduler's admission limit less what it holds) less the jobs claimed and not yet handed
        to it. ``worker_slots`` only bounds the jobs held in all (see :class:`Settings`)."""
        on_the_way = sum(1 for active in self.active.values() if not active.in_engine)
        room = self.engine.free_capacity() - on_the_way
        return max(0, min(room, self.settings.worker_slots - len(self.active)))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        log.info(
            "worker %s claims as many jobs as its engine can take (%d now); EDIFFI_WORKER_SLOTS=%d bounds the jobs "
            "it holds", self.worker_id, self.engine.free_capacity(), self.settings.worker_slots,
        )
        tasks = {
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._cancel_loop()),
            asyncio.create_task(self._stall_watch_loop()),
        }
        try:
            await self._claim_loop()
        finally:
            await self._shutdown()
            self._finished = True
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=BACKGROUND_STOP_TIMEOUT_S)
            if pending:
                log.warning("worker %s: %d background loop(s) did not stop within %g s; exiting without them",
                            self.worker_id, len(pending), BACKGROUND_STOP_TIMEOUT_S)

    # -- claiming ------------------------------------------------------------
    async def _claim_loop(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            if self.free_slots == 0 or any(a.job.exclusive for a in self.active.values()):
                await asyncio.sleep(0.05)  # full, or running a suspect job alone
                continue
            # Block briefly only when idle, so a busy worker keeps its loop responsive.
            block_ms = 500 if not self.active else 50
            try:
                claimed = await self.queue.claim(self.worker_id, self.free_slots, block_ms=block_ms)
            except Exception as exc:  # an error reply or an outage: wait and claim again
                delay = backoff.next_delay()
                log.warning("claim failed (%s: %s); retrying in %.2f s", type(exc).__name__, exc, delay)
                await self._sleep_unless_stopped(delay)
                continue
            backoff.reset()
            self.metrics.sync_queue_counters(self.queue.counters)
            for job in claimed:
                if job.job_id in self.active:
                    # Our own delivery, idle through an outage and handed back to us: it is running here.
                    continue
                how = "reclaimed (its last worker stopped renewing it)" if job.reclaimed else "claimed"
                log.info("job %s %s by worker %s, delivery %d", job.job_id, how, self.worker_id, job.deliveries)
                active = ActiveJob(job, self._loop.create_future())
                self.active[job.job_id] = active
                asyncio.create_task(self._run_job(active))
            self.metrics.active_requests.set(len(self.active))

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _run_job(self, active: ActiveJob) -> None:
        job = active.job
        try:
            if job.exclusive and not await self._wait_to_run_alone(job):
                return
            if not await self.queue.mark_running(job, self.worker_id):
                await self._finish(job, "canceled")
                return
            record = await self.queue.get(job.job_id)
            if record is not None:
                self.metrics.observe_job_started(record)
            try:
                params = JobParams.model_validate(job.params)
            except ValidationError as exc:
                # A job this worker's version cannot read (a newer API's sampler, field or schema version,
                # met during a rolling upgrade): the request's fault, named, not an internal error.
                await self._finish(job, "failed", unreadable_params(exc))
                return
            inputs = {}
            for name in job.input_names:
                data = await self.queue.load_input(job.job_id, name)
                if data is None:  # expired with the job's age limit, or lost with Redis's data
                    await self._finish(job, "failed", Failure.of(FailureKind.LOST))
                    return
                inputs[name] = data
            try:
                request = build_request(params, inputs)
                self.engine.submit(
                    request, on_progress=lambda done, total: self._from_engine(self._on_progress, active, done, total),
                    on_done=lambda outcome: self._from_engine(self._on_done, active, outcome),
                    request_id=active.engine_id,
                )
                active.in_engine = True
            except InputError as exc:
                await self._finish(job, "failed", Failure.invalid_input(exc.field, exc.message))
                return
            outcome: RequestOutcome = await active.done
            await self._flush_progress(active)
            if outcome.ok:
                pngs = await asyncio.to_thread(outcome.png_bytes)
                timings = engine_timings(outcome)
                await self._store_outcome(job, "succeeded", images=pngs, seeds=outcome.seeds, timings=timings)
            elif outcome.status in ("canceled", "expired") and active.job.job_id not in self._released:
                await self._store_outcome(job, "canceled")
            elif outcome.status == "failed":
                await self._store_outcome(job, "failed", outcome.failure or Failure.of(FailureKind.INTERNAL))
            self._count_engine_outcome(outcome)
        except QueueUnavailable as exc:
            # The job stays pending in the queue and is reclaimed later: nothing is lost.
            log.warning("job %s: queue unavailable (%s); it will be reclaimed", job.job_id, exc)
            self.engine.cancel(active.engine_id)
        except Exception:  # a bug must fail the job, not hang it; its text stays in the log
            log.exception("job %s failed", job.job_id)
            try:
                await self._finish(job, "failed", Failure.of(FailureKind.INTERNAL))
            except Exception:
                log.exception("job %s: could not record its failure; it will be reclaimed", job.job_id)
        finally:
            self.active.pop(job.job_id, None)
            self.metrics.active_requests.set(len(self.active))

    async def _wait_to_run_alone(self, job: ClaimedJob) -> bool:
        """A suspect job (its last worker crashed holding it with others) runs alone, so that a
        crash while it runs is attributed to it: wait for the jobs already here to finish (the
        claim loop takes nothing new meanwhile). False if the worker stops first: handed back."""
        while any(job_id != job.job_id for job_id in self.active):
            if self._stop.is_set():
                await self._hand_back(job)
                return False
            await asyncio.sleep(0.05)
        return True

    def _count_engine_outcome(self, outcome: RequestOutcome) -> None:
        """Track engine faults in a row; past the limit, stop claiming and leave (exit non-zero)."""
        if outcome.ok:
            self.consecutive_engine_failures = 0
            return
        if outcome.failure is None or not outcome.failure.is_engine_fault:
            return  # the request's own fault or a cancel says nothing about the engine
        self.consecutive_engine_failures += 1
        limit = self.settings.max_consecutive_engine_failures
        if self.consecutive_engine_failures >= limit and not self.unhealthy:
            log.error(
                "%d engine failures in a row (last: %s); stopping so the orchestrator restarts this worker",
                self.consecutive_engine_failures, outcome.failure.kind.value,
            )
            self.unhealthy = True
            self.stop("engine failures")

    async def _store_outcome(self, job: ClaimedJob, status: str, failure: Failure | None = None, **result) -> None:
        """Store a computed outcome, retrying through a Redis outage (with backoff) while this
        worker still holds the job: recomputing it elsewhere would run it twice. Gives up when
        another worker took the job over, or when shutdown hands it back."""
        backoff = Backoff()
        while True:
            try:
                await self._finish(job, status, failure, **result)
                return
            except QueueUnavailable as exc:
                if job.job_id in self._released:  # taken over, or handed back at shutdown
                    raise
                delay = backoff.next_delay()
                log.warning("job %s: outcome not stored (%s); retrying in %.2f s", job.job_id, exc, delay)
                await asyncio.sleep(delay)

    async def _finish(self, job: ClaimedJob, status: str, failure: Failure | None = None, *,
                      images: list[bytes] | None = None, seeds: list[int] | None = None,
                      timings: dict | None = None) -> None:
        """Store a terminal outcome; log it (job and worker ids only: never the prompt or inputs)."""
        detail = ""
        if status == "succeeded":
            applied = await self.queue.complete(job, images or [], seeds or [], timings or {})
            detail = f", {len(images or [])} image(s)"
        elif status == "failed":
            failure = failure or Failure.of(FailureKind.INTERNAL)
            applied = await self.queue.fail(job, failure)
            detail = f", reason {failure.kind.value}"  # the bounded kind; a message may quote the request
        else:
            applied = await self.queue.finish_canceled(job)
        record = await self.queue.get(job.job_id)
        if applied:
            log.info("job %s %s on worker %s%s", job.job_id, status, self.worker_id, detail)
            if record is not None:
                self.metrics.observe_job_finished(record)
        elif record is None:
            # The job's record is gone (Redis restarted without persistence, or the job outlived
            # its age limit): nobody can ever read this outcome. No transition counted it, so it
            # is counted here under the failure kind made for exactly this loss.
            log.warning("job %s: %s outcome of worker %s dropped: the job is no longer in the queue "
                        "(Redis lost its data, or the job expired); counted as failed, reason lost",
                        job.job_id, status, self.worker_id)
            self.metrics.job_failed(Failure.of(FailureKind.LOST))
        else:  # a cancel, or another worker that took the job over, got there first
            log.info("job %s: %s outcome of worker %s not stored, the job is already %s",
                     job.job_id, status, self.worker_id, record.status.value)

    # -- engine callbacks (device thread -> loop) ----------------------------
    def _from_engine(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _on_done(self, active: ActiveJob, outcome: RequestOutcome) -> None:
        if not active.done.done():
            active.done.set_result(outcome)

    def _on_progress(self, active: ActiveJob, done: int, total: int) -> None:
        active.pending_progress = (done, total)
        if time.monotonic() - active.last_progress_sent >= PROGRESS_INTERVAL_S:
            asyncio.create_task(self._flush_progress(active))

    async def _flush_progress(self, active: ActiveJob) -> None:
        progress, active.pending_progress = active.pending_progress, None
        if progress is None:
            return
        active.last_progress_sent = time.monotonic()
        try:
            await self.queue.progress(active.job.job_id, *progress)
        except Exception as exc:  # progress is advisory; the result is what must not be lost
            log.warning("progress of job %s not stored: %s", active.job.job_id, exc)

    # -- background loops ----------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(max_s=self.settings.heartbeat_interval_s)
        while not self._finished:
            # Two steps, each on its own: a full Redis refuses the heartbeat (a write that
            # grows memory) but may still take the renewals that keep our jobs ours.
            failed = False
            try:
                await self.queue.heartbeat(self.worker_id, {"slots": self.settings.worker_slots,
                                                            "active": len(self.active), "engine": self.engine.name,
                                                            "row_budget": _row_budget(self.engine)})
                self.metrics.worker_heartbeats.inc()
            except Exception as exc:  # never let the heartbeat stop for good
                failed = True
                log.warning("heartbeat failed (%s: %s)", type(exc).__name__, exc)
            try:
                lost = await self.queue.keep_alive(self.worker_id, [a.job for a in self.active.values()])
                for job in lost:  # no longer ours: stop spending compute on it
                    active = self.active.get(job.job_id)
                    if active is None or job.job_id in self._released:  # gone, or handed back by us
                        continue
                    if await self.queue.get(job.job_id) is not None:
                        log.warning("job %s taken over by another worker; worker %s stops computing it",
                                    job.job_id, self.worker_id)
                        self._released.add(job.job_id)
                    # else the job vanished with Redis's data: not released, so its canceled outcome
                    # goes to _finish, which finds no record and logs and counts the loss once.
                    self.engine.cancel(active.engine_id)
            except Exception as exc:
                failed = True
                log.warning("renewing held jobs failed (%s: %s)", type(exc).__name__, exc)
            if failed:
                delay = backoff.next_delay()
            else:
                backoff.reset()
                delay = self.settings.heartbeat_interval_s
            await asyncio.sleep(delay)

    async def _cancel_loop(self) -> None:
        """Client cancellations reach the engine within one poll interval;
        the engine drops the request before its next tick's compute."""
        backoff = Backoff()
        while not self._finished:
            delay = CANCEL_POLL_INTERVAL_S
            try:
                for job_id, active in list(self.active.items()):
                    if await self.queue.is_canceled(job_id):
                        self.engine.cancel(active.engine_id)
                backoff.reset()
            except Exception as exc:
                delay = max(delay, backoff.next_delay())
                log.warning("cancel poll failed (%s: %s); retrying in %.2f s", type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)

    async def _stall_watch_loop(self) -> None:
        """Every process sign of life (threads, heartbeats, claim renewals, /metrics) stays fine while the
        device thread sits in a call that never returns; the time inside one tick does not. Past the limit
        the worker gives up: its jobs go back to the queue and the process exits for a restart."""
        limit = self.settings.engine_stall_timeout_s
        while not self._stop.is_set():
            running = self.engine.tick_running_s()
            if running > limit:
                log.error(
                    "engine stalled: one tick has run for %.0f s (EDIFFI_ENGINE_STALL_TIMEOUT_S=%g); worker %s "
                    "gives back its %d jobs and exits", running, limit, self.worker_id, len(self.active),
                )
                self.engine_stalled = self.unhealthy = True
                self.stop("engine stalled")
                return
            await asyncio.sleep(min(1.0, limit / 4))

    async def _shutdown(self) -> None:
        """Graceful stop: let running jobs finish for a grace period, then
        release the rest so another worker picks them up at once. An unhealthy
        worker releases at once: its engine would only fail them."""
        deadline = time.monotonic() + (0.0 if self.unhealthy else self.shutdown_grace_s)
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for job_id, active in list(self.active.items()):
            self.engine.cancel(active.engine_id)
            try:
                await self._hand_back(active.job)
            except Exception as exc:
                log.warning("job %s not released (%s); it will be reclaimed", job_id, exc)
        while self.active and time.monotonic() < deadline + 5 and not self.engine_stalled:
            await asyncio.sleep(0.05)  # the engine's canceled outcomes (a stalled engine sends none)

    async def _hand_back(self, job: ClaimedJob) -> None:
        """Release a job to the queue at shutdown; its engine cancellation must not mark it canceled."""
        self._released.add(job.job_id)
        await self.queue.release(job)
        log.info("job %s released by worker %s on shutdown", job.job_id, self.worker_id)
