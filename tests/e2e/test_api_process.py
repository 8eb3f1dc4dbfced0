"""`ediffi api` as a real process against a real Redis (no worker needed): what its /metrics
counts and what it logs at start.

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
