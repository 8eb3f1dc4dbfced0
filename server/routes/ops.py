"""Operations endpoints, open without an API key: ``/healthz``, ``/readyz``, ``/metrics``.

They are open, so they say nothing about internals: a failing queue is "job queue
unavailable" outside and its cause (address, error text) goes to the log. Each
costs a few O(1) Redis commands (live workers are counted from a sorted set, not
a SCAN of the keyspace), and none of them is counted by the in-flight limit.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from server.deps import MetricsDep, get_queue
from server.metrics import CONTENT_TYPE_LATEST
from server.queue import QueueUnavailable
from server.routes.jobs import QUEUE_UNAVAILABLE_DETAIL
from server.schemas import Health, Readiness

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

#: Longest a probe or a scrape waits for the queue backend.
PROBE_TIMEOUT_S = 2.0


# HEAD too (load balancers probe with it), as its own route outside the schema: one route for both
# methods gets an operation id from an unordered set, different in every process.
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers. Checks no dependency."""
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "Queue unreachable or no live worker"}},
)
async def readyz(request: Request, metrics: MetricsDep) -> JSONResponse:
    """Readiness: the queue answers and at least one worker heartbeat is live."""
    try:
        queue = await get_queue(request)
        await asyncio.wait_for(queue.ping(), PROBE_TIMEOUT_S)
        workers = await asyncio.wait_for(queue.workers_alive(), PROBE_TIMEOUT_S)
        depth = await asyncio.wait_for(queue.depth(), PROBE_TIMEOUT_S)
    except (QueueUnavailable, TimeoutError) as exc:
        metrics.queue_up.set(0)
        log.warning("/readyz: job queue unavailable: %s", exc or f"no answer within {PROBE_TIMEOUT_S} s")
        body = Readiness(status="unavailable", reason=QUEUE_UNAVAILABLE_DETAIL)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    metrics.queue_up.set(1)
    metrics.workers_alive.set(workers)
    metrics.queue_depth.set(depth)
    if workers <= 0:
        body = Readiness(status="unavailable", workers_alive=0, queue_depth=depth, reason="no worker heartbeat")
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return JSONResponse(Readiness(status="ready", workers_alive=workers, queue_depth=depth).model_dump(exclude_none=True))


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics_endpoint(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus text format. Queue depth and live workers are refreshed on each scrape."""
    try:
        queue = await get_queue(request)
        depth = await asyncio.wait_for(queue.depth(), PROBE_TIMEOUT_S)
        workers = await asyncio.wait_for(queue.workers_alive(), PROBE_TIMEOUT_S)
        memory = await asyncio.wait_for(queue.memory(), PROBE_TIMEOUT_S)
        stored = await asyncio.wait_for(queue.stored_bytes(), PROBE_TIMEOUT_S)
    except (QueueUnavailable, TimeoutError) as exc:
        log.warning("/metrics: job queue unavailable: %s", exc or f"no answer within {PROBE_TIMEOUT_S} s")
        metrics.queue_up.set(0)  # the other gauges keep their last values
    else:
        metrics.queue_up.set(1)
        metrics.queue_depth.set(depth)
        metrics.workers_alive.set(workers)
        if memory is not None:
            metrics.queue_memory_used.set(memory[0])
            metrics.queue_memory_limit.set(memory[1])
        for kind, (held, budget) in stored.items():
            metrics.queue_stored.labels(kind=kind).set(held)
            metrics.queue_stored_budget.labels(kind=kind).set(budget)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
