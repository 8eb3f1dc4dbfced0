"""The job queue contract, run against both implementations (in process and real Redis).

Each test is written once and parametrised over the backends, so the
embedded server and the production deployment cannot drift apart. Timeouts
and TTLs are shrunk; nothing is mocked. Where a test asserts something has
NOT happened yet (a job not yet reclaimable, a worker or a result still
there), the timeout is WINDOW_S, a second, far longer than any stall of a loaded
machine between two consecutive calls; the waits past a timeout are measured
from the event that started it. Sub-second timeouts remain only where the
test merely waits past them (a lower bound).
"""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from server.queue import (
    ClaimedJob,
    EventType,
    Failure,
    FailureKind,
    InProcessQueue,
    JobQueue,
    JobStatus,
    QueueFull,
    QueueUnavailable,
    RedisStreamsQueue,
    make_queue,
)
from server.settings import Settings
from tests.support.redis_server import RedisServerProcess, free_port

TEST_TIMEOUT_S = 15.0
DEFAULT_LIMITS: dict[str, Any] = dict(
    max_queue=100, claim_timeout_s=30.0, max_deliveries=3, result_ttl_s=60.0, heartbeat_ttl_s=10.0
)
#: A timeout the test must still be inside of a few calls later.
WINDOW_S = 1.0
PNG_A = b"\x89PNG fake image A"
PNG_B = b"\x89PNG fake image B"


async def sleep_past(started: float, timeout_s: float) -> None:
    """Sleep until a little more than ``timeout_s`` has passed since ``started`` (monotonic)."""
    await asyncio.sleep(max(0.0, started + timeout_s + 0.1 - time.monotonic()))


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop (pytest sees the same fixture arguments)."""

    @functools.wraps(test)
    def runner(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT_S))

    return runner


@dataclass
class Backend:
    """Builds queues of one implementation and looks at its raw storage."""

    name: str
    redis_url: str | None = None
    key_prefix: str = ""

    def build(self, **limits: Any) -> JobQueue:
        merged = {**DEFAULT_LIMITS, **limits}
        if self.name == "redis":
            return RedisStreamsQueue.from_url(self.redis_url, prefix=self.key_prefix, **merged)
        return InProcessQueue(**merged)

    @asynccontextmanager
    async def open(self, **limits: Any) -> AsyncIterator[JobQueue]:
        """A queue for the duration of the block (built inside the running event loop)."""
        queue = self.build(**limits)
        try:
            yield queue
        finally:
            await queue.close()

    async def stored_keys(self, queue: JobQueue, job_id: str) -> list[str]:
        """Raw storage still held for ``job_id``: Redis keys naming it, or the in-memory entry."""
        if isinstance(queue, RedisStreamsQueue):
            keys = [key async for key in queue.client.scan_iter(match=f"{self.key_prefix}*{job_id}*")]
            return sorted(key.decode() for key in keys)
        assert isinstance(queue, InProcessQueue)
        return [job_id] if job_id in queue.stored_job_ids() else []


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return Backend(
            "redis",
            redis_url=request.getfixturevalue("redis_url"),
            key_prefix=request.getfixturevalue("redis_key_prefix"),
        )
    return Backend("memory")


async def submit_job(queue: JobQueue, n_images: int = 1, **kwargs: Any):
    return await queue.submit({"prompt": "a red fox", "n": n_images}, {}, n_images, **kwargs)


async def claim_one(queue: JobQueue, worker_id: str, block_ms: int = 0) -> ClaimedJob:
    claimed = await queue.claim(worker_id, max_jobs=1, block_ms=block_ms)
    assert len(claimed) == 1, f"{worker_id} expected one job, got {claimed}"
    return claimed[0]


# ------------------------------------------------------------------ submitting


@run_async
async def test_submit_then_get_returns_the_queued_record(backend: Backend) -> None:
    async with backend.open() as queue:
        before = time.time()
        record = await queue.submit({"prompt": "a red fox", "steps": 20}, {"style_image": b"\x00\x01"}, 2)
        assert record.status == JobStatus.QUEUED
        assert record.params == {"prompt": "a red fox", "steps": 20}
        assert record.n_images == 2 and record.deliveries == 0 and record.error is None
        assert record.queued_at is not None and before <= record.queued_at <= time.time()
        assert record.started_at is None and record.finished_at is None

        fetched = await queue.get(record.id)
        assert fetched == record
        assert await queue.get("no-such-job") is None
        assert await queue.load_input(record.id, "style_image") == b"\x00\x01"
        assert await queue.depth() == 1


@run_async
async def test_same_idempotency_key_returns_the_same_job(backend: Backend) -> None:
    async with backend.open() as queue:
        first = await submit_job(queue, idempotency_key="key-1")
        again = await submit_job(queue, idempotency_key="key-1")
        other = await submit_job(queue, idempotency_key="key-2")
        plain = await submit_job(queue)
        assert again.id == first.id
        assert len({first.id, other.id, plain.id}) == 3
        assert await queue.depth() == 3


@run_async
async def test_concurrent_submissions_under_one_key_create_one_job(backend: Backend) -> None:
    async with backend.open() as queue:
        records = await asyncio.gather(*(submit_job(queue, idempotency_key="same") for _ in range(10)))
        assert len({record.id for record in records}) == 1
        assert await queue.depth() == 1


@run_async
async def test_full_queue_raises_queue_full_but_replays_idempotent_submissions(backend: Backend) -> None:
    async with backend.open(max_queue=2) as queue:
        first = await submit_job(queue, idempotency_key="k")
        await submit_job(queue)
        with pytest.raises(QueueFull) as excinfo:
            await submit_job(queue)
        assert excinfo.value.retry_after_s > 0
        assert (await submit_job(queue, idempotency_key="k")).id == first.id
        assert await queue.depth() == 2


@run_async
async def test_submit_keeps_uploads_within_the_byte_budget_and_each_owner_within_its_cap(backend: Backend) -> None:
    async with backend.open(max_input_bytes=100, max_unfinished_per_owner=2) as queue:
        held = await queue.submit({"n": 1}, {"style_image": b"x" * 60}, 1, owner="a")
        with pytest.raises(QueueFull) as excinfo:
            await queue.submit({"n": 1}, {"style_image": b"x" * 60}, 1, owner="b")
        assert excinfo.value.limit == "inputs"
        await submit_job(queue, owner="a")
        with pytest.raises(QueueFull) as excinfo:
            await submit_job(queue, owner="a")
        assert excinfo.value.limit == "key"
        await submit_job(queue, owner="b")  # another owner still gets in
        await queue.cancel(held.id)  # a finished job gives back its bytes and its place
        await queue.submit({"n": 1}, {"style_image": b"x" * 60}, 1, owner="a")


@run_async
async def test_stored_results_over_their_budget_refuse_submissions_until_they_expire(backend: Backend) -> None:
    """Finished jobs' images count against max_result_bytes for as long as they are kept
    (result_ttl_s): over it, a submission is refused with a Retry-After that ends when the oldest
    expire, and accepted again after; what is stored is never dropped early."""
    async with backend.open(max_result_bytes=30, result_ttl_s=WINDOW_S) as queue:
        await submit_job(queue)
        job = await claim_one(queue, "w1")
        started = time.monotonic()
        await queue.complete(job, [PNG_A], [1], {})  # 17 bytes: within the budget
        await submit_job(queue)
        second = await claim_one(queue, "w1")
        await queue.complete(second, [PNG_A, PNG_B], [1, 2], {})  # 51 bytes held in all: over it
        with pytest.raises(QueueFull) as excinfo:
            await submit_job(queue)
        assert excinfo.value.limit == "results" and excinfo.value.used == 3 * len(PNG_A)
        assert 1.0 <= excinfo.value.retry_after_s <= WINDOW_S + 1
        assert await queue.get_image(second.job_id, 1) == PNG_B  # kept: the budget refuses work, drops nothing
        await sleep_past(started, WINDOW_S)
        await submit_job(queue)  # both expired: the budget is free again


@run_async
async def test_depth_counts_queued_and_in_flight_jobs(backend: Backend) -> None:
    async with backend.open() as queue:
        for _ in range(3):
            await submit_job(queue)
        job = await claim_one(queue, "w1")
        assert await queue.depth() == 3
        await queue.complete(job, [PNG_A], [1], {})
        assert await queue.depth() == 2


# -------------------------------------------------------------------- claiming


@run_async
async def test_claim_respects_max_jobs_and_hands_out_each_job_once(backend: Backend) -> None:
    async with backend.open() as queue:
        submitted = [(await submit_job(queue)).id for _ in range(5)]
        first = await queue.claim("w1", max_jobs=2)
        second = await queue.claim("w2", max_jobs=10)
        assert len(first) == 2 and len(second) == 3
        assert [job.job_id for job in first + second] == submitted  # FIFO
        assert all(job.deliveries == 1 and not job.reclaimed for job in first + second)
        assert await queue.claim("w3", max_jobs=10) == []
        assert await queue.claim("w3", max_jobs=0) == []


@run_async
async def test_one_callers_backlog_does_not_hold_back_another_callers_job(backend: Backend) -> None:
    """Claims go to the caller (owner) with the fewest jobs out on workers, oldest first among
    equals: b's one job, queued behind a's six, is the second handed out, not the seventh."""
    async with backend.open() as queue:
        a_jobs = [(await submit_job(queue, owner="a")).id for _ in range(6)]
        b_job = (await submit_job(queue, owner="b")).id
        first = await claim_one(queue, "w1")
        second = await claim_one(queue, "w1")
        assert (first.job_id, second.job_id) == (a_jobs[0], b_job)
        assert second.deliveries == 1 and not second.reclaimed
        # a's jobs then go out in their own order, and nothing was lost or counted twice on the way
        rest = await queue.claim("w2", max_jobs=10)
        assert [job.job_id for job in rest] == a_jobs[1:]
        assert all(job.deliveries == 1 for job in rest)
        assert await queue.depth() == 7


@run_async
async def test_claims_alternate_between_callers_with_backlogs(backend: Backend) -> None:
    async with backend.open() as queue:
        owners = {}
        for owner in ("a", "a", "a", "b", "b", "b", "c"):
            owners[(await submit_job(queue, owner=owner)).id] = owner
        order = [owners[job.job_id] for job in await queue.claim("w1", max_jobs=7)]
        # Round by round: each caller with work waiting gets one more out (within a round, the order
        # of equals is the stream's, which turns given up reorder in Redis).
        assert order[:3] == ["a", "b", "c"]
        assert sorted(order[3:5]) == sorted(order[5:]) == ["a", "b"]


@run_async
async def test_a_caller_alone_is_served_at_once_however_many_jobs_it_has_out(backend: Backend) -> None:
    """Fairness never idles a worker: with nobody else waiting, max_jobs jobs go out in one claim."""
    async with backend.open() as queue:
        submitted = [(await submit_job(queue, owner="a")).id for _ in range(5)]
        await claim_one(queue, "w1")
        assert [job.job_id for job in await queue.claim("w1", max_jobs=4)] == submitted[1:]


@run_async
async def test_a_job_that_gave_its_turn_can_still_be_canceled(backend: Backend) -> None:
    async with backend.open() as queue:
        a_jobs = [(await submit_job(queue, owner="a")).id for _ in range(3)]
        b_job = (await submit_job(queue, owner="b")).id
        await claim_one(queue, "w1")  # a's first; a's second then gives its turn to b's
        assert (await claim_one(queue, "w1")).job_id == b_job
        assert (await queue.cancel(a_jobs[1])).status == JobStatus.CANCELED
        assert [job.job_id for job in await queue.claim("w1", max_jobs=10)] == [a_jobs[2]]
        assert await queue.depth() == 3  # a's first, b's, a's third: the canceled one is gone


@run_async
async def test_claim_blocks_until_a_job_arrives(backend: Backend) -> None:
    async with backend.open() as queue:
        started = time.monotonic()
        assert await queue.claim("w1", max_jobs=1, block_ms=200) == []
        assert time.monotonic() - started >= 0.15

        waiting = asyncio.create_task(queue.claim("w1", max_jobs=1, block_ms=5000))
        await asyncio.sleep(0.1)
        record = await submit_job(queue)
        claimed = await asyncio.wait_for(waiting, 2)
        assert [job.job_id for job in claimed] == [record.id]


@run_async
async def test_mark_running_records_worker_and_start(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await queue.submit({"prompt": "x"}, {"mask": b"m"}, 1)
        job = await claim_one(queue, "w1")
        assert job.params == {"prompt": "x"} and job.n_images == 1 and job.input_names == ("mask",)
        assert await queue.mark_running(job, "w1")
        running = await queue.get(record.id)
        assert running.status == JobStatus.RUNNING and running.worker == "w1"
        assert running.started_at is not None and running.deliveries == 1


# ------------------------------------------------------------------ completing


@run_async
async def test_complete_stores_images_and_acknowledges(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=0.1) as queue:
        record = await queue.submit({"prompt": "x"}, {"style_image": b"style"}, 2)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        assert await queue.complete(job, [PNG_A, PNG_B], [11, 12], {"total_s": 1.5})

        done = await queue.get(record.id)
        assert done.status == JobStatus.SUCCEEDED
        assert done.image_seeds == [11, 12] and done.n_images == 2 and done.timings == {"total_s": 1.5}
        assert done.finished_at is not None and done.finished_at >= done.started_at
        assert await queue.get_image(record.id, 0) == PNG_A
        assert await queue.get_image(record.id, 1) == PNG_B
        assert await queue.get_image(record.id, 2) is None
        assert await queue.load_input(record.id, "style_image") is None  # inputs go at the end
        # Acknowledged: gone from the queue, not delivered again even after the claim timeout.
        assert await queue.depth() == 0
        await asyncio.sleep(0.2)
        assert await queue.claim("w2", max_jobs=5) == []
        assert queue.counters.skipped_finished == 0


@run_async
async def test_duplicate_completion_after_redelivery_keeps_the_first_result(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=0.1) as queue:
        record = await submit_job(queue)
        slow = await claim_one(queue, "slow-worker")
        await queue.mark_running(slow, "slow-worker")
        await asyncio.sleep(0.2)  # the slow worker misses its keep-alive
        taken = await claim_one(queue, "fast-worker")
        assert taken.job_id == record.id and taken.reclaimed and taken.deliveries == 2

        assert await queue.complete(taken, [PNG_A], [1], {})
        assert not await queue.complete(slow, [PNG_B], [2], {})
        assert not await queue.fail(slow, Failure.of(FailureKind.INTERNAL))

        done = await queue.get(record.id)
        assert done.status == JobStatus.SUCCEEDED and done.image_seeds == [1] and done.error is None
        assert await queue.get_image(record.id, 0) == PNG_A
        events = await queue.events(record.id)
        assert [e.type for e in events].count(EventType.SUCCEEDED) == 1
        await asyncio.sleep(0.2)
        assert await queue.claim("w3", max_jobs=5) == []


@run_async
async def test_fail_records_the_structured_failure(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await queue.submit({"prompt": "x"}, {"mask": b"m"}, 1)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        failure = Failure.invalid_input("paint_with_words.regions[0].phrase", "not in the prompt")
        assert await queue.fail(job, failure)
        failed = await queue.get(record.id)
        assert failed.status == JobStatus.FAILED and failed.failure == failure
        assert failed.error == "paint_with_words.regions[0].phrase: not in the prompt"
        assert failed.finished_at is not None
        assert await queue.load_input(record.id, "mask") is None
        assert (await queue.events(record.id))[-1].data == {
            "error": failed.error,
            "kind": "invalid_input",
            "message": "not in the prompt",
            "field": "paint_with_words.regions[0].phrase",
        }
        assert await queue.depth() == 0


# ------------------------------------------------------- crashes and retries


@run_async
async def test_job_of_a_dead_worker_is_reclaimed_after_the_claim_timeout(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=WINDOW_S) as queue:
        record = await submit_job(queue)
        first = await claim_one(queue, "dead-worker")
        claimed_at = time.monotonic()
        await queue.mark_running(first, "dead-worker")
        assert await queue.claim("w2", max_jobs=1) == []  # not idle long enough yet

        await sleep_past(claimed_at, WINDOW_S)
        second = await claim_one(queue, "w2")
        assert second.job_id == record.id and second.reclaimed and second.deliveries == 2
        assert queue.counters.reclaimed == 1
        assert await queue.mark_running(second, "w2")
        assert (await queue.get(record.id)).worker == "w2"
        assert await queue.keep_alive("dead-worker", [first]) == [first]  # it lost the job


@run_async
async def test_keep_alive_stops_a_live_workers_jobs_from_being_reclaimed(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=WINDOW_S) as queue:
        await submit_job(queue)
        job = await claim_one(queue, "w1")
        claimed_at = time.monotonic()
        while time.monotonic() - claimed_at < 1.5 * WINDOW_S:  # outlive the claim timeout
            await asyncio.sleep(WINDOW_S / 5)
            assert await queue.keep_alive("w1", [job]) == []
            assert await queue.claim("w2", max_jobs=1) == []


@run_async
async def test_reclaimed_and_new_jobs_together_never_exceed_max_jobs(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=WINDOW_S) as queue:
        for k in range(3):  # three dead workers with one job each (a shared crash would isolate its jobs)
            await submit_job(queue)
            assert len(await queue.claim(f"dead-worker-{k}", max_jobs=1)) == 1
        claimed_at = time.monotonic()
        for _ in range(2):
            await submit_job(queue)
        await sleep_past(claimed_at, WINDOW_S)
        claimed = await queue.claim("w2", max_jobs=4, block_ms=1000)
        assert len(claimed) == 4
        assert [job.reclaimed for job in claimed] == [True, True, True, False]
        assert len(await queue.claim("w3", max_jobs=4)) == 1


@run_async
async def test_delivery_limit_fails_the_job_with_a_reason(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=0.1, max_deliveries=2) as queue:
        record = await submit_job(queue)
        assert (await claim_one(queue, "crashing-1")).deliveries == 1
        await asyncio.sleep(0.15)
        assert (await claim_one(queue, "crashing-2")).deliveries == 2
        await asyncio.sleep(0.15)
        assert await queue.claim("w3", max_jobs=1) == []  # third delivery: failed, not handed out

        failed = await queue.get(record.id)
        assert failed.status == JobStatus.FAILED
        assert failed.failure == Failure(FailureKind.MAX_DELIVERIES, "exceeded max deliveries (2)")
        assert failed.error == "exceeded max deliveries (2)"
        assert queue.counters.failed_max_deliveries == 1
        assert await queue.depth() == 0
        await asyncio.sleep(0.15)
        assert await queue.claim("w4", max_jobs=1) == []  # acknowledged: no loop


@run_async
async def test_release_makes_the_job_claimable_at_once(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=30) as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "stopping-worker")
        await queue.mark_running(job, "stopping-worker")
        await queue.release(job)
        released = await queue.get(record.id)
        assert released.status == JobStatus.QUEUED and released.worker is None

        again = await claim_one(queue, "w2")
        assert again.job_id == record.id
        assert not again.reclaimed and again.deliveries == 1  # a release is not a failed attempt
        assert queue.counters.reclaimed == 0
        assert await queue.mark_running(again, "w2")
        assert await queue.complete(again, [PNG_A], [5], {})
        assert await queue.depth() == 0


@run_async
async def test_a_released_job_can_still_be_canceled(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=30) as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "stopping-worker")
        await queue.mark_running(job, "stopping-worker")
        await queue.release(job)
        assert (await queue.cancel(record.id)).status == JobStatus.CANCELED
        assert await queue.depth() == 0
        assert await queue.claim("w2", max_jobs=5) == []


# ------------------------------------------------------------------- canceling


@run_async
async def test_cancel_a_queued_job_finishes_it_and_it_is_never_delivered(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=0.1) as queue:
        record = await queue.submit({"prompt": "x"}, {"mask": b"m"}, 1)
        canceled = await queue.cancel(record.id)
        assert canceled.status == JobStatus.CANCELED and canceled.finished_at is not None
        assert await queue.depth() == 0
        assert await queue.claim("w1", max_jobs=5) == []
        await asyncio.sleep(0.15)
        assert await queue.claim("w1", max_jobs=5) == []
        assert await queue.load_input(record.id, "mask") is None
        assert (await queue.events(record.id))[-1].type == EventType.CANCELED
        assert await queue.cancel("no-such-job") is None
        assert (await queue.cancel(record.id)).status == JobStatus.CANCELED  # idempotent


@run_async
async def test_a_cancel_the_queue_applies_itself_is_counted_once_for_the_api_metrics(backend: Backend) -> None:
    """The worker counts the terminal transitions it makes; the cancels ``cancel`` applies itself
    (a queued job, before or after a worker received it) never reach a worker's count, so the
    queue counts them (``counters.canceled_queued``, exported by the API process). Before, they were
    counted nowhere: submitted jobs did not add up to their outcomes."""
    async with backend.open() as queue:
        queued = await submit_job(queue)
        await queue.cancel(queued.id)
        await queue.cancel(queued.id)  # already canceled: nothing new
        assert queue.counters.canceled_queued == 1
        between = await submit_job(queue)
        job = await claim_one(queue, "w1")  # received, not started: the cancel is still the API's
        await queue.cancel(between.id)
        assert not await queue.finish_canceled(job)  # so the worker counts nothing
        assert queue.counters.canceled_queued == 2
        running = await submit_job(queue)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        await queue.cancel(running.id)  # only flagged: the worker's finish_canceled is the transition
        assert await queue.finish_canceled(job)
        assert queue.counters.canceled_queued == 2


@run_async
async def test_cancel_a_running_job_sets_the_flag_for_its_worker(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        assert not await queue.is_canceled(record.id)

        assert (await queue.cancel(record.id)).status == JobStatus.RUNNING
        assert await queue.is_canceled(record.id)
        assert await queue.finish_canceled(job)
        assert (await queue.get(record.id)).status == JobStatus.CANCELED
        assert await queue.depth() == 0
        assert not await queue.complete(job, [PNG_A], [1], {})  # too late: stays canceled
        assert (await queue.get(record.id)).status == JobStatus.CANCELED


@run_async
async def test_cancel_between_claim_and_start_keeps_the_job_from_running(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "w1")
        assert (await queue.cancel(record.id)).status == JobStatus.CANCELED
        assert not await queue.mark_running(job, "w1")
        assert not await queue.finish_canceled(job)
        assert (await queue.get(record.id)).status == JobStatus.CANCELED
        assert await queue.depth() == 0


@run_async
async def test_cancel_of_a_job_on_a_dead_worker_completes_on_reclaim(backend: Backend) -> None:
    async with backend.open(claim_timeout_s=0.1) as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "dead-worker")
        await queue.mark_running(job, "dead-worker")
        await queue.cancel(record.id)
        await asyncio.sleep(0.15)
        assert await queue.claim("w2", max_jobs=1) == []
        assert (await queue.get(record.id)).status == JobStatus.CANCELED
        assert await queue.depth() == 0


# ------------------------------------------------------- progress and events


@run_async
async def test_progress_updates_the_record(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        await queue.progress(record.id, 3, 20)
        assert (await queue.get(record.id)).progress.model_dump() == {"step": 3, "total": 20}
        await queue.progress(record.id, 4, 20)
        assert (await queue.get(record.id)).progress.step == 4


@run_async
async def test_events_replay_after_an_id_and_block_for_new_ones(backend: Backend) -> None:
    async with backend.open() as queue:
        record = await submit_job(queue)
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        await queue.progress(record.id, 1, 2)

        history = await queue.events(record.id)
        assert [e.type for e in history] == [EventType.QUEUED, EventType.RUNNING, EventType.PROGRESS]
        assert history[2].data == {"step": 1, "total": 2}
        assert history[1].data["worker"] == "w1"
        assert len({e.id for e in history}) == 3
        assert await queue.events(record.id, after=history[0].id) == history[1:]
        assert await queue.events(record.id, after=history[-1].id) == []  # no block: at once

        waiting = asyncio.create_task(queue.events(record.id, after=history[-1].id, block_ms=5000))
        await asyncio.sleep(0.1)
        await queue.progress(record.id, 2, 2)
        fresh = await asyncio.wait_for(waiting, 2)
        assert [e.type for e in fresh] == [EventType.PROGRESS] and fresh[0].data["step"] == 2

        started = time.monotonic()
        assert await queue.events(record.id, after=fresh[-1].id, block_ms=150) == []
        assert time.monotonic() - started >= 0.1

        await queue.complete(job, [PNG_A], [1], {})
        assert (await queue.events(record.id, after=fresh[-1].id))[0].type == EventType.SUCCEEDED
        with pytest.raises(ValueError):
            await queue.events(record.id, after="not-an-id")


# ------------------------------------------------------------------ expiry


@run_async
async def test_finished_jobs_expire_after_the_result_ttl(backend: Backend) -> None:
    async with backend.open(result_ttl_s=WINDOW_S) as queue:
        record = await queue.submit({"prompt": "x"}, {"mask": b"m"}, 1, idempotency_key="ttl-key")
        job = await claim_one(queue, "w1")
        await queue.mark_running(job, "w1")
        await sleep_past(time.monotonic(), WINDOW_S)  # unfinished jobs never expire, however long they run
        assert (await queue.get(record.id)).status == JobStatus.RUNNING
        await queue.progress(record.id, 1, 1)
        completed_at = time.monotonic()
        await queue.complete(job, [PNG_A], [1], {})
        assert await backend.stored_keys(queue, record.id)
        assert await queue.get_image(record.id, 0) == PNG_A

        await sleep_past(completed_at, WINDOW_S)
        assert await queue.get(record.id) is None
        assert await queue.get_image(record.id, 0) is None
        assert await queue.events(record.id) == []
        assert await backend.stored_keys(queue, record.id) == []
        # The idempotency key went with the job: the same key now makes a new job.
        assert (await submit_job(queue, idempotency_key="ttl-key")).id != record.id


# --------------------------------------------------- workers and rate limits


@run_async
async def test_heartbeats_count_live_workers_until_they_expire(backend: Backend) -> None:
    async with backend.open(heartbeat_ttl_s=WINDOW_S) as queue:
        assert await queue.workers_alive() == 0
        await queue.heartbeat("w1", {"slots": 8})
        await queue.heartbeat("w2", {"slots": 8})
        await queue.heartbeat("w1", {"slots": 8})
        last_beat = time.monotonic()
        assert await queue.workers_alive() == 2
        await sleep_past(last_beat, WINDOW_S)
        assert await queue.workers_alive() == 0


@run_async
async def test_rate_limit_allows_n_per_minute_then_refuses(backend: Backend) -> None:
    async with backend.open() as queue:
        if time.time() % 60 > 58:  # keep the fixed window from rolling over mid-test
            await asyncio.sleep(60 - time.time() % 60 + 0.05)
        assert [await queue.rate_limit("key-a", 3) for _ in range(4)] == [True, True, True, False]
        assert await queue.rate_limit("key-b", 3)


# --------------------------------------------------------- Redis specifics


@run_async
async def test_stream_entries_carry_only_the_job_id(redis_url: str, redis_key_prefix: str) -> None:
    backend = Backend("redis", redis_url=redis_url, key_prefix=redis_key_prefix)
    async with backend.open() as queue:
        assert isinstance(queue, RedisStreamsQueue)
        record = await queue.submit({"prompt": "x" * 100}, {"style_image": b"\xff" * 1000}, 1)
        entries = await queue.client.xrange(queue.keys.jobs_stream)
        assert [fields for _, fields in entries] == [{b"job_id": record.id.encode()}]
        assert await queue.client.get(queue.keys.job_input(record.id, "style_image")) == b"\xff" * 1000


@run_async
async def test_unreachable_redis_raises_queue_unavailable() -> None:
    queue = RedisStreamsQueue.from_url(f"redis://127.0.0.1:{free_port()}/0", **DEFAULT_LIMITS)
    try:
        started = time.monotonic()
        for call in (
            queue.ping(),
            submit_job(queue),
            queue.get("x"),
            queue.depth(),
            queue.claim("w1", 1),
            queue.events("x", block_ms=100),
            queue.rate_limit("k", 5),
        ):
            with pytest.raises(QueueUnavailable):
                await call
        assert time.monotonic() - started < 5
    finally:
        await queue.close()


@run_async
async def test_queue_recovers_after_a_redis_restart(restartable_redis: RedisServerProcess) -> None:
    queue = RedisStreamsQueue.from_url(restartable_redis.url, **DEFAULT_LIMITS)
    try:
        await submit_job(queue)
        assert len(await queue.claim("w1", 1)) == 1

        restartable_redis.stop()
        with pytest.raises(QueueUnavailable):
            await queue.ping()
        with pytest.raises(QueueUnavailable):
            await submit_job(queue)
        with pytest.raises(QueueUnavailable):
            await queue.claim("w1", 1)

        restartable_redis.start()  # empty: no stream, no consumer group, no scripts
        await queue.ping()
        record = await submit_job(queue)
        job = await claim_one(queue, "w1", block_ms=1000)
        assert job.job_id == record.id
        assert await queue.complete(job, [PNG_A], [1], {})
        assert (await queue.get(record.id)).status == JobStatus.SUCCEEDED
    finally:
        await queue.close()


@run_async
async def test_consumer_group_is_recreated_when_redis_loses_it_between_calls(
    restartable_redis: RedisServerProcess,
) -> None:
    queue = RedisStreamsQueue.from_url(restartable_redis.url, **DEFAULT_LIMITS)
    try:
        assert await queue.claim("w1", 1) == []  # creates the group
        restartable_redis.restart()  # between two calls: the queue sees no error first
        record = await submit_job(queue)
        assert (await claim_one(queue, "w1")).job_id == record.id
    finally:
        await queue.close()


# ---------------------------------------------------------------- factory


@run_async
async def test_make_queue_picks_the_backend_from_settings(redis_url: str, redis_key_prefix: str) -> None:
    in_process = make_queue(Settings(redis_url=None, max_queue=7))
    assert isinstance(in_process, InProcessQueue)
    redis_queue = make_queue(Settings(redis_url=redis_url), key_prefix=redis_key_prefix)
    try:
        assert isinstance(redis_queue, RedisStreamsQueue)
        await redis_queue.ping()
    finally:
        await redis_queue.close()


@run_async
async def test_a_callers_wait_note_is_its_latest_until_forgotten_or_expired(backend: Backend) -> None:
    """note_waiting / waiting_job / forget_waiting (A1111's /progress and /interrupt on any replica):
    the latest wait wins, forgetting an earlier one leaves it, another caller sees nothing, the note
    expires after its TTL."""
    async with backend.open() as queue:
        assert await queue.waiting_job("a") is None
        await queue.note_waiting("a", "job-1", ttl_s=30)
        await queue.note_waiting("a", "job-2", ttl_s=30)
        assert await queue.waiting_job("a") == "job-2" and await queue.waiting_job("b") is None
        await queue.forget_waiting("a", "job-1")  # the earlier wait ending keeps the later one
        assert await queue.waiting_job("a") == "job-2"
        await queue.forget_waiting("a", "job-2")
        assert await queue.waiting_job("a") is None
        await queue.note_waiting("a", "job-3", ttl_s=0.2)
        await asyncio.sleep(0.4)
        assert await queue.waiting_job("a") is None
