"""``/v1/*`` as the official ``openai`` Python client sees it (the peer these endpoints claim
compatibility with), on both queues, through the app in process: its retries, its error
parsing, its nullable fields and ``client.models``.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx2
import openai
import pytest

from ediffi.failure import Failure, FailureKind
from tests.support.api import (  # noqa: F401 - the backend fixture is used by name
    Backend,
    QueueWorker,
    Service,
    backend,
    run_async,
    service,
)


@asynccontextmanager
async def openai_client(svc: Service, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """openai-python with its defaults (2 retries), talking to the app in process."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=svc.app))
    async with openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="sk-unused", http_client=http, **options
    ) as client:
        yield client


def jobs_submitted(svc: Service) -> float:
    return svc.metrics.registry.get_sample_value("ediffi_jobs_submitted_total") or 0.0


# ------------------------------------------------------------------ retries


@run_async
async def test_a_sync_wait_that_times_out_is_one_job_not_one_per_client_retry(backend: Backend) -> None:
    # No worker: the job stays queued past the wait (504). openai-python retries every 5xx
    # unless told not to, and sends no Idempotency-Key: each retry was a new job (3 in all).
    async with service(backend, sync_timeout_s=0.2) as svc, openai_client(svc) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert jobs_submitted(svc) == 1


@run_async
async def test_a_canceled_job_is_a_conflict_not_a_silent_resubmission(backend: Backend) -> None:
    async with service(backend) as svc, QueueWorker(svc.queue, mode="hold") as worker, openai_client(svc) as client:

        async def cancel_every_job() -> None:
            canceled: set[str] = set()
            while True:
                for job in worker.claimed:
                    if job.job_id not in canceled:
                        canceled.add(job.job_id)
                        assert (await svc.client.post(f"/jobs/{job.job_id}/cancel")).status_code == 200
                await asyncio.sleep(0.01)

        canceler = asyncio.create_task(cancel_every_job())
        try:
            with pytest.raises(openai.ConflictError) as caught:
                await client.images.generate(prompt="a fox", extra_body={"steps": 1})
        finally:
            canceler.cancel()
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert jobs_submitted(svc) == 1


@run_async
async def test_a_failed_job_is_reported_once_not_resubmitted(backend: Backend) -> None:
    async with service(backend) as svc, openai_client(svc) as client:
        for kind, status in [(FailureKind.INTERNAL, 500), (FailureKind.OUT_OF_MEMORY, 503)]:
            before = jobs_submitted(svc)
            async with QueueWorker(svc.queue, mode="fail", failure=Failure.of(kind)):
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.images.generate(prompt="a fox", extra_body={"steps": 1})
            assert caught.value.status_code == status
            assert caught.value.response.headers["x-should-retry"] == "false"
            assert jobs_submitted(svc) == before + 1, kind
