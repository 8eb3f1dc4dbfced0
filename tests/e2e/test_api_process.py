"""`ediffi api` as a real process against a real Redis (no worker needed): what its /metrics
counts and what it logs at start.

A Redis whose ``maxmemory-policy`` may evict keys can drop queued jobs' records (they carry a TTL,
so even ``volatile-*`` policies take them): the process says so once at start, in a WARNING. A
Redis that refuses ``CONFIG`` (managed offerings) changes nothing.

A queued job canceled through the API never reaches a worker, so no worker counts its
outcome: the API process counts it in ``ediffi_jobs_completed_total{status="canceled"}``
(the worker's metric, same name and label), so that over all targets the jobs submitted add
up to their outcomes. Before, those cancels were counted nowhere.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import ApiProcess, service_env
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.timeout(120)

BODY = {"prompt": "a red circle", "n": 1, "steps": 2, "seed": 1}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


@pytest.fixture
def api(tiny_model_dir, restartable_redis: RedisServerProcess, tmp_path):
    env = service_env(restartable_redis.url, tiny_model_dir, {"allow_anonymous": True})
    process = ApiProcess(env, tmp_path)
    try:
        process.wait_ready(path="/healthz")
        yield process
    finally:
        process.stop()


EVICTION_WARNING = "maxmemory-policy"


@pytest.mark.parametrize(("redis_args", "warned"), [
    (("--maxmemory-policy", "volatile-lru"), True),
    (("--maxmemory-policy", "allkeys-lru"), True),
    ((), False),  # noeviction, Redis's default
    (("--rename-command", "CONFIG", ""), False),  # CONFIG refused, as managed Redis may: no warning, no harm
])
def test_the_api_warns_at_start_when_redis_may_evict_job_data(tiny_model_dir, tmp_path, redis_args, warned) -> None:
    server = RedisServerProcess(extra_args=redis_args)
    server.start()
    try:
        process = ApiProcess(service_env(server.url, tiny_model_dir, {"allow_anonymous": True}), tmp_path)
        try:
            process.wait_ready(path="/healthz")
        finally:
            process.stop()
        log = process.log_path.read_text()
    finally:
        server.cleanup()
    lines = [line for line in log.splitlines() if EVICTION_WARNING in line]
    if warned:
        assert len(lines) == 1 and "WARNING" in lines[0] and redis_args[1] in lines[0], log
        assert "noeviction" in lines[0] and "lost" in lines[0]
    else:
        assert lines == [], log
    assert "Traceback" not in log, log


def test_queued_jobs_canceled_through_the_api_are_counted_by_the_api(api: ApiProcess) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as client:
        ids = []
        for _ in range(3):
            response = client.post("/generate", json=BODY, headers={"Prefer": "respond-async"})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        for job_id in ids:
            response = client.post(f"/jobs/{job_id}/cancel")
            assert response.status_code == 200 and response.json()["status"] == "canceled", response.text
        client.post(f"/jobs/{ids[0]}/cancel")  # canceled already: not counted again
        scrape = client.get("/metrics").text
    completed = samples(scrape, "ediffi_jobs_completed_total")
    # The API exports the one status it updates: no stand-in zeros for the worker's outcomes.
    assert completed == {(("status", "canceled"),): 3.0}, completed
    assert samples(scrape, "ediffi_jobs_submitted_total") == {(): 3.0}
