"""Each process exports only the metrics its role updates (server/metrics.py).

Before, every process registered every metric: a worker exported ``ediffi_workers_alive 0``,
``ediffi_queue_up 0``, ``ediffi_queue_depth 0`` and ``ediffi_jobs_submitted_total 0`` beside the
API's real values (so ``max(ediffi_workers_alive) == 0`` and any min()/avg() across targets were
wrong), and the API exported the worker's counters stuck at 0. And no registry carried the
process collectors (RSS, CPU, open fds).
"""

from __future__ import annotations

import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.metrics import Metrics
from tests.support.api import make_settings, run_async

API_ONLY = {"ediffi_http_requests", "ediffi_http_request_duration_seconds", "ediffi_jobs_submitted",
            "ediffi_queue_depth", "ediffi_workers_alive", "ediffi_queue_up", "ediffi_queue_memory_used_bytes",
            "ediffi_queue_memory_limit_bytes", "ediffi_queue_stored_bytes", "ediffi_queue_stored_budget_bytes"}
WORKER_ONLY = {"ediffi_job_latency_seconds", "ediffi_queue_wait_seconds", "ediffi_active_requests",
               "ediffi_batch_size", "ediffi_denoiser_forward_seconds", "ediffi_images_generated",
               "ediffi_jobs_failed", "ediffi_jobs_reclaimed", "ediffi_worker_heartbeats"}
#: Both roles: the API counts the queued jobs it cancels itself (status "canceled" only).
BOTH = {"ediffi_jobs_completed"}
#: From the process, platform and GC collectors (process_* needs /proc: Linux).
PROCESS = {"python_info", "python_gc_objects_collected"} | (
    {"process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"} if sys.platform == "linux" else set()
)


def completed_statuses(text: str) -> set[str]:
    """The ``status`` values ``ediffi_jobs_completed_total`` is exported with."""
    return {s.labels["status"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "ediffi_jobs_completed_total"}


def families(text: str) -> set[str]:
    """Metric family names in a scrape (counters without ``_total``, as the parser names them)."""
    return {family.name for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize(("role", "own", "other"), [("worker", WORKER_ONLY, API_ONLY), ("api", API_ONLY, WORKER_ONLY)])
def test_a_one_role_registry_exports_its_own_and_the_process_metrics_only(role, own, other) -> None:
    metrics = Metrics(roles=(role,))
    # Code shared by both roles may still update the other role's metrics: they exist, unexported.
    metrics.queue_up.set(1)
    metrics.workers_alive.set(3)
    metrics.jobs_submitted.inc()
    metrics.active_requests.set(2)
    metrics.worker_heartbeats.inc()
    text = metrics.render().decode()
    scraped = families(text)
    assert own | BOTH | PROCESS <= scraped
    assert not scraped & other, scraped & other
    statuses = {"api": {"canceled"}, "worker": {"succeeded", "failed", "canceled"}}[role]
    assert completed_statuses(text) == statuses  # the API exports no stand-in zeros for the worker's


def test_the_embedded_serve_registry_exports_both_roles() -> None:
    scraped = families(Metrics(roles=("api", "worker")).render().decode())
    assert API_ONLY | WORKER_ONLY | BOTH | PROCESS <= scraped
    assert families(Metrics().render().decode()) == scraped  # the default: both


def test_unknown_roles_are_refused() -> None:
    for roles in ((), ("gpu",), ("api", "workers")):
        with pytest.raises(ValueError):
            Metrics(roles=roles)


@run_async
async def test_the_api_app_scrape_has_no_worker_metrics(redis_url: str, redis_key_prefix: str) -> None:
    """``ediffi api`` builds its Metrics in create_app: its /metrics has the API side only."""
    app = create_app(make_settings(redis_url=redis_url), key_prefix=redis_key_prefix)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    scraped = families(response.text)
    assert API_ONLY | BOTH | PROCESS <= scraped
    assert not scraped & WORKER_ONLY, scraped & WORKER_ONLY
    assert completed_statuses(response.text) == {"canceled"}
