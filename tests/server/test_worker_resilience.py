"""A worker keeps going through Redis error replies and a Redis restart (issue 19 item 7), with
real processes: a redis-server with AOF, ``ediffi api`` and ``ediffi worker``.

While Redis refuses every write (``OOM`` under ``maxmemory`` + ``noeviction``) the worker's
claim, heartbeat and cancel loops fail, log and back off; when Redis accepts writes again the
heartbeat resumes and every job finishes exactly once, on its first delivery. Before the fix a
failed claim ended the worker process, and a failing heartbeat loop stopped for good.
"""

from __future__ import annotations

import time

import pytest

from tests.support.process import Cluster, metric_value

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tiny_model_dir, tmp_path):
    cluster = Cluster(tiny_model_dir, tmp_path, settings={"worker_slots": 4})
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.close()


def heartbeats(cluster: Cluster) -> float:
    return metric_value(cluster.workers[0].scrape(), "ediffi_worker_heartbeats_total")


def wait_until(condition, timeout_s: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s\n{cluster.logs()}"
        time.sleep(0.1)


def test_a_worker_survives_redis_refusing_writes_and_a_restart_and_runs_each_job_once(cluster):
    worker = cluster.workers[0]
    job_ids = [cluster.submit({"prompt": "a red circle", "steps": 12, "seed": k}) for k in range(4)]
    wait_until(lambda: len(cluster.running_in_progress(job_ids)) >= 2, 60, "two jobs running", cluster)

    # Redis refuses every write for a while: OOM replies to claims, heartbeats, progress.
    cluster.redis.config_set("maxmemory", "1")
    time.sleep(2.0)
    before = heartbeats(cluster)
    time.sleep(2.0)
    worker.check_alive()  # before the fix: the OOM reply to a claim ended the process here
    assert heartbeats(cluster) == before, "Redis refused the heartbeats"
    cluster.redis.config_set("maxmemory", "0")
    wait_until(lambda: heartbeats(cluster) > before, 15, "heartbeats resumed", cluster)

    # And a restart (AOF: the jobs survive it).
    cluster.redis.close()
    cluster.redis_server.stop()
    time.sleep(1.0)
    cluster.redis_server.start()
    resumed_from = heartbeats(cluster)
    wait_until(lambda: heartbeats(cluster) > resumed_from, 15, "heartbeats resumed after the restart", cluster)
    worker.check_alive()

    statuses = cluster.wait_terminal(job_ids, timeout_s=120)
    assert set(statuses.values()) == {"succeeded"}, statuses
    for job_id in job_ids:
        record = cluster.job_hash(job_id)
        assert record["deliveries"] == "1", record  # never handed out again: not run twice
        assert cluster.event_types(job_id).count("running") == 1
        assert cluster.event_types(job_id).count("succeeded") == 1
    log = worker.log_tail(200_000)
    assert "claim failed" in log or "heartbeat failed" in log  # the failures were logged
