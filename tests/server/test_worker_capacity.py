"""One owner of capacity: the engine's scheduler decides how many requests are active,
the engine says how many more it can take, and the worker claims no more than that."""

from __future__ import annotations

import asyncio
import time

import pytest

from ediffi.failure import QueueFull
from ediffi.pipeline import GenerationRequest
from engines import Engine, EngineConfig, EngineHooks, TorchBackend
from server.metrics import Metrics
from server.queue import JobStatus, make_queue
from server.settings import Settings
from server.worker import Worker

PROMPT = "a red circle on the left"


def tiny_engine(model, **config) -> Engine:
    return Engine(TorchBackend(model, max_batch=8), EngineConfig(max_rows_per_tick=None, **config))


async def run_until_terminal(worker: Worker, queue, submitted: list, timeout_s: float) -> list:
    """Run ``worker`` until every submitted job is terminal (or ``timeout_s``), stop it, close the
    queue; the jobs' last records."""
    run = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout_s
    records = []
    while time.monotonic() < deadline:
        records = [await queue.get(r.id) for r in submitted]
        if all(record.status.is_terminal for record in records):
            break
        await asyncio.sleep(0.05)
    worker.stop()
    await run
    await queue.close()
    return records


def test_free_capacity_is_the_admission_limit_less_what_the_engine_holds(tiny_model):
    engine = tiny_engine(tiny_model, max_active_requests=3)
    assert engine.free_capacity() == 3
    engine.submit(GenerationRequest(PROMPT, steps=1))
    engine.submit(GenerationRequest(PROMPT, steps=1, seed=1))
    assert engine.free_capacity() == 1
    engine.run_until_idle()
    assert engine.free_capacity() == 3

    one_at_a_time = tiny_engine(tiny_model, policy="none", max_active_requests=3)
    assert one_at_a_time.free_capacity() == 1  # the `none` policy admits one request at a time

    bounded_waiting = tiny_engine(tiny_model, max_active_requests=8, max_waiting=2)
    for seed in range(bounded_waiting.free_capacity()):
        bounded_waiting.submit(GenerationRequest(PROMPT, steps=1, seed=seed))
    assert bounded_waiting.free_capacity() == 0
    with pytest.raises(QueueFull) as err:  # the one QueueFull class, from the engine too
        bounded_waiting.submit(GenerationRequest(PROMPT, steps=1, seed=9))
    assert err.value.limit == "engine" and err.value.maximum == 2
    bounded_waiting.run_until_idle()


def test_worker_claims_no_more_jobs_than_the_engine_can_take(tiny_model, redis_url, redis_key_prefix):
    admission_limit, jobs = 2, 6
    settings = Settings(redis_url=redis_url, worker_slots=8, heartbeat_interval_s=0.2)
    engine = tiny_engine(tiny_model, max_active_requests=admission_limit)
    ticks: list[int] = []  # requests left waiting after each tick's admission
    engine.add_hooks(EngineHooks(on_tick=lambda tick: ticks.append(tick.waiting)))
    engine.start()
    # After each claim: requests in the engine + jobs claimed and not handed to it yet.
    taken_after_claims: list[int] = []

    async def scenario() -> list[JobStatus]:
        queue = make_queue(settings, key_prefix=redis_key_prefix)
        worker = Worker(settings, queue, engine, Metrics(), shutdown_grace_s=5.0)
        claim = queue.claim

        async def recording_claim(worker_id: str, max_jobs: int, block_ms: int = 0):
            claimed = await claim(worker_id, max_jobs, block_ms=block_ms)
            on_the_way = sum(1 for active in worker.active.values() if not active.in_engine)
            taken_after_claims.append(engine.num_requests + on_the_way + len(claimed))
            return claimed

        queue.claim = recording_claim  # type: ignore[method-assign]  # observes the real Redis queue
        records = [
            await queue.submit(
                {"prompt": PROMPT, "n": 1, "steps": 6, "guidance_scale": 3.0, "seed": seed, "sampler": "heun"}, {}, 1
            )
            for seed in range(jobs)
        ]
        return [record.status for record in await run_until_terminal(worker, queue, records, timeout_s=120)]

    try:
        statuses = asyncio.run(scenario())
    finally:
        engine.stop()
    assert statuses == [JobStatus.SUCCEEDED] * jobs
    # Never more than the scheduler admits (worker_slots, 8, would have let it take all 6 at once) ...
    assert max(taken_after_claims) == admission_limit, taken_after_claims
    # ... and no job ever waited inside the engine behind its admission limit, out of other workers' reach.
    assert ticks and max(ticks) == 0, ticks


@pytest.mark.timeout(60)
def test_a_worker_stops_even_when_a_queue_call_turns_its_cancellation_into_an_error(tiny_model):
    """At shutdown the worker cancels its background loops; a client library that turns the
    cancellation of a call in flight into an ordinary error (which the heartbeat loop survives, as it
    must survive Redis errors) left that loop running for good, and the worker never returned."""
    from server.queue import queue_limits
    from server.queue.memory import InProcessQueue

    class CancellationSwallowingQueue(InProcessQueue):
        async def heartbeat(self, worker_id, info):
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                raise ConnectionError("connection closed by the cancellation") from None
            return await super().heartbeat(worker_id, info)

    engine = tiny_engine(tiny_model).start()
    settings = Settings(redis_url=None, heartbeat_interval_s=0.01)

    async def scenario() -> float:
        queue = CancellationSwallowingQueue(**queue_limits(settings))
        worker = Worker(settings, queue, engine, Metrics(), shutdown_grace_s=0.0)
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        worker.stop()
        started = time.monotonic()
        await asyncio.wait_for(run, 20)
        await queue.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 10
    finally:
        engine.stop()


def test_a_job_whose_parameters_this_worker_cannot_read_fails_naming_the_field(tiny_model, redis_url, redis_key_prefix):
    """A newer API's job (a sampler this worker's version does not know) fails as invalid input naming
    `sampler`, not as an internal error (before: FailureKind.INTERNAL, which also says nothing to the
    client); a job beside it still succeeds."""
    from ediffi.failure import FailureKind

    settings = Settings(redis_url=redis_url, worker_slots=2, heartbeat_interval_s=0.2)
    engine = tiny_engine(tiny_model)
    engine.start()

    async def scenario():
        queue = make_queue(settings, key_prefix=redis_key_prefix)
        worker = Worker(settings, queue, engine, Metrics(), shutdown_grace_s=5.0)
        base = {"prompt": PROMPT, "n": 1, "steps": 2, "guidance_scale": 3.0, "seed": 0}
        unknown = await queue.submit({**base, "sampler": "lms_from_the_future"}, {}, 1)
        known = await queue.submit({**base, "sampler": "euler"}, {}, 1)
        return await run_until_terminal(worker, queue, [unknown, known], timeout_s=60)

    try:
        refused, served = asyncio.run(scenario())
    finally:
        engine.stop()
    assert refused.status == JobStatus.FAILED and served.status == JobStatus.SUCCEEDED
    assert refused.failure.kind == FailureKind.INVALID_INPUT and refused.failure.field == "sampler", refused.failure
    assert "older than the API" in refused.failure.message
