"""The worker logs every job transition it makes, with the job and worker ids and never the
prompt, and warns (and counts) when an outcome is dropped because the job vanished from Redis.

Before, a worker logged nothing about its jobs: an operator could not tell from its log which
jobs it ran, which it handed back, nor that a result was thrown away after a Redis restart
without persistence (that loss was not counted by any metric either).

Real Redis, a real worker and a tiny engine in this process (for ``caplog``). A gate in the
engine's tick hook holds a job mid-run so the test can act on it while it runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time

import pytest
import redis

from engines import Engine, EngineConfig, EngineHooks, TorchBackend
from server.metrics import Metrics
from server.queue import JobQueue, JobStatus, make_queue
from server.settings import Settings
from server.worker import Worker
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.timeout(120)

#: A prompt the log must never contain.
PROMPT = "a red circle zq-private-prompt-71"
PARAMS = {"prompt": PROMPT, "n": 1, "steps": 4, "guidance_scale": 3.0, "seed": 1, "sampler": "euler"}


class GatedEngine(Engine):
    """A tiny engine whose ticks wait while ``gate`` is closed; ``canceled`` is set once the
    worker asked it to cancel a request."""

    def __init__(self, model) -> None:
        super().__init__(TorchBackend(model, max_batch=8), EngineConfig(max_rows_per_tick=None))
        self.gate = threading.Event()
        self.gate.set()
        self.canceled = threading.Event()
        self.add_hooks(EngineHooks(on_tick=lambda _tick: self.gate.wait(60)))

    def cancel(self, request_id: str) -> bool:
        self.canceled.set()
        return super().cancel(request_id)


@pytest.fixture
def engine(tiny_model):
    engine = GatedEngine(tiny_model).start()
    yield engine
    engine.gate.set()
    engine.stop()


def settings_for(redis_url: str, **overrides) -> Settings:
    return Settings(redis_url=redis_url, heartbeat_interval_s=0.1, **overrides)


async def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition()`` (a plain or an async function) until it is true."""
    deadline = time.monotonic() + timeout_s
    while not (await result if inspect.isawaitable(result := condition()) else result):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def status_is(queue: JobQueue, job_id: str, *statuses: JobStatus) -> bool:
    record = await queue.get(job_id)
    return record is not None and record.status in statuses


def worker_lines(caplog, job_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "server.worker" and job_id in r.getMessage()]


def logged(caplog, job_id: str, *words: str) -> bool:
    return any(all(word in line for word in words) for line in worker_lines(caplog, job_id))


def test_each_job_transition_is_one_line_with_job_and_worker_ids(
    engine, redis_url, redis_key_prefix, caplog
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_for(redis_url, claim_timeout_s=1.0)

    async def scenario() -> dict[str, str]:
        queue = make_queue(settings, key_prefix=redis_key_prefix)
        worker = Worker(settings, queue, engine, Metrics(roles=("worker",)), worker_id="w-logs", shutdown_grace_s=0.0)
        jobs: dict[str, str] = {}
        # Claimed by a worker that then dies (never renews it): ours takes it over after claim_timeout_s.
        jobs["reclaimed"] = (await queue.submit(PARAMS, {}, 1)).id
        (dead_claim,) = await queue.claim("w-dead", 1)
        assert dead_claim.job_id == jobs["reclaimed"]
        jobs["ok"] = (await queue.submit(PARAMS, {}, 1)).id
        # Its input is gone before any worker reads it: it fails as lost.
        jobs["lost"] = (await queue.submit(PARAMS, {"style_image": b"never read"}, 1)).id
        with redis.Redis.from_url(redis_url) as client:
            client.delete(queue.keys.job_input(jobs["lost"], "style_image"))

        run = asyncio.create_task(worker.run())
        for name in ("reclaimed", "ok", "lost"):
            await wait_for(lambda: status_is(queue, jobs[name], JobStatus.SUCCEEDED, JobStatus.FAILED), name)

        # Canceled by its client while the gate holds it mid-run. (An earlier job's take-over may already
        # have made the worker cancel its copy in the engine: only this cancel counts from here.)
        engine.gate.clear()
        engine.canceled.clear()
        jobs["canceled"] = (await queue.submit(PARAMS, {}, 1)).id
        await wait_for(lambda: status_is(queue, jobs["canceled"], JobStatus.RUNNING), "running")
        await queue.cancel(jobs["canceled"])
        await wait_for(engine.canceled.is_set, "the worker cancels it")
        engine.gate.set()
        await wait_for(lambda: status_is(queue, jobs["canceled"], JobStatus.CANCELED), "canceled")

        # Still running when the worker stops: handed back to the queue.
        engine.gate.clear()
        jobs["released"] = (await queue.submit(PARAMS, {}, 1)).id
        await wait_for(lambda: status_is(queue, jobs["released"], JobStatus.RUNNING), "running")
        worker.stop()
        await wait_for(lambda: status_is(queue, jobs["released"], JobStatus.QUEUED), "released")
        engine.gate.set()
        # Bounded, so a worker that does not stop fails here, saying so, not at the test's timeout.
        await asyncio.wait({run}, timeout=30)
        assert run.done(), "the worker did not return within 30 s of stop()"
        await run
        await asyncio.wait_for(queue.close(), 30)
        return jobs

    jobs = asyncio.run(scenario())
    assert logged(caplog, jobs["ok"], "claimed by worker w-logs")
    assert logged(caplog, jobs["ok"], "succeeded on worker w-logs", "1 image")
    assert logged(caplog, jobs["lost"], "failed on worker w-logs", "reason lost")
    assert logged(caplog, jobs["reclaimed"], "reclaimed", "by worker w-logs")
    assert logged(caplog, jobs["reclaimed"], "succeeded on worker w-logs")
    assert logged(caplog, jobs["canceled"], "canceled on worker w-logs")
    assert logged(caplog, jobs["released"], "released by worker w-logs on shutdown")
    for job_id in jobs.values():
        transitions = [r for r in caplog.records if r.name == "server.worker" and job_id in r.getMessage()]
        assert all(r.levelno == logging.INFO for r in transitions), [r.getMessage() for r in transitions]
    assert "zq-private" not in caplog.text


def test_an_outcome_the_queue_lost_is_warned_about_and_counted(
    engine, restartable_redis: RedisServerProcess, caplog
) -> None:
    """Redis restarts empty (no persistence) while a job runs: its outcome has nowhere to go."""
    caplog.set_level(logging.INFO)
    settings = settings_for(restartable_redis.url)
    metrics = Metrics(roles=("worker",))

    async def scenario() -> str:
        queue = make_queue(settings)
        worker = Worker(settings, queue, engine, metrics, worker_id="w-drop")
        run = asyncio.create_task(worker.run())
        engine.gate.clear()
        job_id = (await queue.submit(PARAMS, {}, 1)).id
        await wait_for(lambda: status_is(queue, job_id, JobStatus.RUNNING), "running")
        await asyncio.to_thread(restartable_redis.restart)
        engine.gate.set()
        await wait_for(lambda: logged(caplog, job_id, "dropped"), "the drop logged")
        worker.stop()
        await run
        await queue.close()
        return job_id

    job_id = asyncio.run(scenario())
    (warning,) = [r for r in caplog.records if r.name == "server.worker" and job_id in r.getMessage()
                  and "dropped" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "w-drop" in warning.getMessage()
    assert 'ediffi_jobs_failed_total{reason="lost"} 1.0' in metrics.render().decode()
    assert "zq-private" not in caplog.text


def test_jobs_the_queue_settles_on_claim_are_logged(redis_url, redis_key_prefix, caplog) -> None:
    """A job failed at its delivery limit, or canceled while its dead worker held it, is settled
    inside ``claim`` and never reaches the worker: the queue logs those transitions."""
    caplog.set_level(logging.INFO)
    settings = settings_for(redis_url, claim_timeout_s=0.2, max_deliveries=1)

    async def scenario() -> tuple[str, str]:
        queue = make_queue(settings, key_prefix=redis_key_prefix)
        exceeded = (await queue.submit(PARAMS, {}, 1)).id
        assert [job.job_id for job in await queue.claim("w-dead-1", 1)] == [exceeded]
        canceled = (await queue.submit(PARAMS, {}, 1)).id
        (held,) = await queue.claim("w-dead-2", 1)
        assert await queue.mark_running(held, "w-dead-2")
        await queue.cancel(canceled)  # running: only flagged, for its (dead) worker to see
        await asyncio.sleep(0.4)  # both now idle past claim_timeout_s
        assert await queue.claim("w-next", 2) == []
        assert await status_is(queue, exceeded, JobStatus.FAILED)
        assert await status_is(queue, canceled, JobStatus.CANCELED)
        await queue.close()
        return exceeded, canceled

    exceeded, canceled = asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "server.queue.redis_streams"]
    assert f"job {exceeded} failed on worker w-next, reason max_deliveries" in lines, lines
    assert any(line.startswith(f"job {canceled} canceled on worker w-next") for line in lines), lines
    assert "zq-private" not in caplog.text


def test_a_queued_job_whose_record_vanished_is_warned_about_and_counted_lost(
    engine, redis_url, redis_key_prefix, caplog
) -> None:
    """A queued job's record is gone when a worker receives it (evicted under a maxmemory-policy
    other than noeviction, a Redis restart without persistence, or past max_job_age_s): nobody
    can ever run it or read an outcome. Before, the queue acked it silently (no log line, no
    metric); a redelivery of a job that did finish is no loss and stays quiet."""
    caplog.set_level(logging.INFO)
    settings = settings_for(redis_url, claim_timeout_s=0.3)
    metrics = Metrics(roles=("worker",))

    async def scenario() -> tuple[str, str, str]:
        queue = make_queue(settings, key_prefix=redis_key_prefix)
        vanished = (await queue.submit(PARAMS, {}, 1)).id
        finished = (await queue.submit(PARAMS, {}, 1)).id
        # ``finished``: its outcome was stored but its worker died before the acknowledgement.
        claims = await queue.claim("w-dead", 2)
        assert {job.job_id for job in claims} == {vanished, finished}
        with redis.Redis.from_url(redis_url) as client:
            client.hset(queue.keys.job(finished), "status", JobStatus.SUCCEEDED.value)
            client.delete(queue.keys.job(vanished))  # what an eviction does
        ok = (await queue.submit(PARAMS, {}, 1)).id
        worker = Worker(settings, queue, engine, metrics, worker_id="w-next", shutdown_grace_s=0.0)
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: status_is(queue, ok, JobStatus.SUCCEEDED), "ok runs")
        await wait_for(lambda: _depth_is_zero(queue), "both stale entries acked")
        worker.stop()
        await run
        await queue.close()
        return vanished, finished, ok

    vanished, finished, ok = asyncio.run(scenario())
    warnings = [r for r in caplog.records if vanished in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records if vanished in r.getMessage()]
    assert "lost" in warnings[0].getMessage() and "w-next" in warnings[0].getMessage()
    assert not [r for r in caplog.records if finished in r.getMessage() and r.levelno >= logging.WARNING]
    scrape = metrics.render().decode()
    assert 'ediffi_jobs_failed_total{reason="lost"} 1.0' in scrape
    assert 'ediffi_jobs_completed_total{status="failed"} 1.0' in scrape
    assert 'ediffi_jobs_completed_total{status="succeeded"} 1.0' in scrape  # ok only, not the stale redelivery


async def _depth_is_zero(queue: JobQueue) -> bool:
    return await queue.depth() == 0
