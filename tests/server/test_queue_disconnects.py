"""Clients that go away mid-wait (an SSE stream or a synchronous wait closed by its client: Starlette
cancels the reader through an anyio cancel scope) never wedge the in-process queue of `ediffi serve`."""

from __future__ import annotations

import asyncio
import random
import threading

import anyio

from server.queue.memory import InProcessQueue



def test_readers_cancelled_while_events_are_written_leave_the_queue_working() -> None:
    # In a thread of its own: a wedged queue hangs its event loop for good (a timeout inside cannot fire).
    finished: list[bool] = []
    thread = threading.Thread(target=lambda: finished.append(asyncio.run(disconnect_storm())), daemon=True)
    thread.start()
    thread.join(60)
    assert finished == [True], "the queue wedged: its event loop hangs after clients went away mid-wait"


async def disconnect_storm() -> bool:
    queue = InProcessQueue(max_queue=100, claim_timeout_s=60, max_deliveries=3, result_ttl_s=60, heartbeat_ttl_s=10)
    record = await queue.submit({"prompt": "x"}, {}, 1)
    [job] = await queue.claim("w1", 1)
    assert await queue.mark_running(job, "w1")
    rng = random.Random(0)
    stop = asyncio.Event()

    async def write_progress() -> None:
        step = 0
        while not stop.is_set():
            await queue.progress(record.id, step, 10_000)
            step += 1
            await asyncio.sleep(0.002)

    async def read_then_disconnect() -> None:
        with anyio.move_on_after(rng.uniform(0.001, 0.05)):
            after = None if rng.random() < 0.5 else "999999999-0"  # some wait, some find events at once
            await queue.events(record.id, after=after, block_ms=4000)

    writer = asyncio.create_task(write_progress())
    for _ in range(30):
        async with anyio.create_task_group() as group:
            for _ in range(16):
                group.start_soon(read_then_disconnect)
    stop.set()
    await asyncio.wait_for(writer, 5)

    # Every other client still gets through: events are written and read, jobs are claimed and finished.
    await asyncio.wait_for(queue.progress(record.id, 1, 1), 5)
    events = await asyncio.wait_for(queue.events(record.id, block_ms=0), 5)
    assert events and events[-1].data == {"step": 1, "total": 1}
    second = await queue.submit({"prompt": "y"}, {}, 1)
    claimed = await asyncio.wait_for(queue.claim("w2", 1, block_ms=1000), 5)
    assert [c.job_id for c in claimed] == [second.id]
    return True
