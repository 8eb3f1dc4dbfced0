"""`ediffi worker` as a real process (tiny model, a real Redis of its own): what it logs from
start to a SIGTERM while it runs a job.

The worker is started once for the module on a Redis whose ``maxmemory-policy`` may evict job
data; one job runs when it gets SIGTERM (grace 1 s), so it hands the job back and exits.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import pytest
import redis

from server.queue import make_queue
from server.settings import Settings
from tests.support.process import KEYS, WorkerProcess, service_env, wait_workers_ready
from tests.support.redis_server import RedisServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class StoppedWorker:
    log: str
    returncode: int
    job_id: str
    job_status: str


@pytest.fixture(scope="module")
def stopped_worker(tiny_model_dir, tmp_path_factory) -> StoppedWorker:
    server = RedisServerProcess(extra_args=("--maxmemory-policy", "allkeys-lru"))
    server.start()
    log_dir = tmp_path_factory.mktemp("worker-process")
    env = service_env(server.url, tiny_model_dir, {
        "intra_op_threads": 1, "heartbeat_interval_s": 0.5, "shutdown_grace_s": 1, "allow_anonymous": True,
    })
    worker = WorkerProcess(env, log_dir, "worker")
    client = redis.Redis.from_url(server.url)
    try:
        wait_workers_ready([worker])
        # A job far too long to finish within the grace period, queued straight into Redis the way the API does.
        async def submit() -> str:
            queue = make_queue(Settings(redis_url=server.url))
            try:
                params = {"prompt": "a red circle", "n": 1, "steps": 2000, "guidance_scale": 3.0, "seed": 1,
                          "sampler": "euler"}
                return (await queue.submit(params, {}, 1)).id
            finally:
                await queue.close()

        job_id = asyncio.run(submit())
        deadline = time.monotonic() + 60
        while client.hget(KEYS.job(job_id), "status") != b"running":
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.1)
        worker.send(signal.SIGTERM)
        returncode = worker.process.wait(timeout=60)
        status = (client.hget(KEYS.job(job_id), "status") or b"").decode()
    finally:
        worker.stop()
        client.close()
        server.cleanup()
    return StoppedWorker(worker.log_path.read_text(errors="replace"), returncode, job_id, status)


def test_the_worker_warns_at_start_when_redis_may_evict_job_data(stopped_worker: StoppedWorker) -> None:
    lines = [line for line in stopped_worker.log.splitlines() if "maxmemory-policy" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "allkeys-lru" in lines[0], stopped_worker.log


def test_sigterm_is_logged_with_the_jobs_running_and_the_grace_then_stopped(stopped_worker: StoppedWorker) -> None:
    """Before, a worker said nothing between SIGTERM and its exit (seconds of silence, then gone)."""
    lines = stopped_worker.log.splitlines()
    stopping = [i for i, line in enumerate(lines) if "stopping" in line and "SIGTERM" in line]
    assert len(stopping) == 1, stopping_worker_log(stopped_worker)
    assert "1 jobs running, grace 1 s" in lines[stopping[0]], lines[stopping[0]]
    released = [i for i, line in enumerate(lines) if stopped_worker.job_id in line and "released" in line]
    assert released and released[0] > stopping[0], stopping_worker_log(stopped_worker)
    assert lines[-1].endswith("stopped") and "INFO" in lines[-1], lines[-1]
    assert stopped_worker.returncode == 0 and stopped_worker.job_status == "queued"


def stopping_worker_log(stopped_worker: StoppedWorker) -> str:
    return stopped_worker.log[-3000:]


def test_the_worker_log_has_no_library_progress_bars(stopped_worker: StoppedWorker) -> None:
    """transformers' "Loading weights" tqdm bars (one per encoder) filled a worker's log before."""
    assert "Loading weights" not in stopped_worker.log and "it/s]" not in stopped_worker.log, stopped_worker.log
    assert "ready (engine" in stopped_worker.log  # the weights did load
