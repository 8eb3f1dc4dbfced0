"""The executor runs what the scheduler planned, and decides nothing.

For each group of a `StepPlan`: concatenate the member requests' rows (CFG
rows of a request stay adjacent), make one batched call on the backend, and
split the denoised rows back per request. Returns a `StepResult` with each
request's rows and per-batch timings; a failing batch fails its requests
only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ediffi.pipeline import DenoiserInputs, PendingEvaluation
from engines.backend import Backend
from engines.scheduler import GroupKey, StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchTiming:
    """One batched call: which expert, how many rows and requests, how long."""

    key: GroupKey
    rows: int
    requests: int
    seconds: float

    @property
    def stage(self) -> str:
        return self.key.stage

    @property
    def expert(self) -> str:
        return self.key.expert


@dataclass
class StepResult:
    tick: int
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    batches: list[BatchTiming] = field(default_factory=list)

    @property
    def forward_seconds(self) -> float:
        return sum(b.seconds for b in self.batches)


class Executor:
    def __init__(self, backend: Backend):
        self.backend = backend

    def execute(self, plan: StepPlan, pending: Mapping[str, PendingEvaluation]) -> StepResult:
        result = StepResult(plan.tick)
        for group in plan.groups:
            ids = group.request_ids
            try:
                evaluations = [pending[rid] for rid in ids]
                for rid, ev in zip(ids, evaluations):
                    if (ev.stage, ev.expert) != (group.key.stage, group.key.expert):
                        raise RuntimeError(
                            f"request {rid} pends on {ev.stage}/{ev.expert}, planned for {group.key.stage}/{group.key.expert}"
                        )
                inputs = evaluations[0].inputs if len(ids) == 1 else DenoiserInputs.cat([e.inputs for e in evaluations])
                start = time.perf_counter()
                denoised = self.backend.run(group.key.stage, group.key.expert, inputs)
                self.backend.synchronize()
                seconds = time.perf_counter() - start
            except Exception as exc:  # fail this batch's requests, keep serving
                log.exception("batch %s of %d requests failed", group.key, len(ids))
                for rid in ids:
                    result.failures[rid] = f"{type(exc).__name__}: {exc}"
                continue
            result.batches.append(BatchTiming(group.key, len(inputs), len(ids), seconds))
            offset = 0
            for rid, ev in zip(ids, evaluations):
                rows = len(ev.inputs)
                result.outputs[rid] = denoised[offset : offset + rows]
                offset += rows
        return result
