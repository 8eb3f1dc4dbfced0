"""Execution: backends (one interface per runtime), the step scheduler that
owns every batching decision, the executor that runs its plans, and the
engine loop that ties them (docs/architecture.md §2). Nothing here reads the environment.

Public API (what the server uses):

    from engines import Engine, EngineConfig, TorchBackend
    engine = Engine.from_settings(settings)               # Settings-like object or dict
    engine.start()
    handle = engine.submit(request, on_progress=..., on_done=..., request_id=job_id, timeout_s=...)
    engine.cancel(job_id)
    outcome = handle.result()  /  await handle.wait()     # RequestOutcome
    outcome.png_bytes()                                   # list[bytes]
"""

from engines.backend import Backend, batch_buckets
from engines.engine import Engine, EngineConfig, EngineHooks, TickInfo, make_backend
from engines.executor import BatchTiming, Executor, StepResult
from engines.request import RequestHandle, RequestOutcome, TextEmbeddingCache
from engines.scheduler import (
    POLICIES,
    Admission,
    Group,
    GroupKey,
    PendingView,
    QueueFull,
    SchedulerConfig,
    StepPlan,
    StepScheduler,
    auto_row_budget,
)
from engines.torch_backend import TorchBackend

__all__ = [
    "Admission",
    "Backend",
    "BatchTiming",
    "Engine",
    "EngineConfig",
    "EngineHooks",
    "Executor",
    "Group",
    "GroupKey",
    "PendingView",
    "POLICIES",
    "QueueFull",
    "RequestHandle",
    "RequestOutcome",
    "SchedulerConfig",
    "StepPlan",
    "StepResult",
    "StepScheduler",
    "TextEmbeddingCache",
    "TickInfo",
    "TorchBackend",
    "auto_row_budget",
    "batch_buckets",
    "make_backend",
]
