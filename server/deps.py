"""FastAPI dependencies: the per-app resources ``create_app`` puts on ``app.state``.

Routes declare what they use with these ``Annotated`` aliases, and tests may
replace any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.metrics import Metrics
from server.queue import JobQueue, QueueUnavailable
from server.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_queue(request: Request) -> JobQueue:
    queue = getattr(request.app.state, "queue", None)
    if queue is None:  # lifespan not run (yet), or already shut down
        raise QueueUnavailable("the queue is not open (application starting or stopping)")
    return queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
