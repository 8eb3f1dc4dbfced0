"""The executor runs what the scheduler planned, and decides nothing.

For each group of a `StepPlan`: concatenate the member requests' rows (CFG
rows of a request stay adjacent), make one batched call on the backend, and
split the denoised rows back per request. Returns a `StepResult` with each
request's rows and per-batch timings; a failing batch fails its requests
only, each with a structured `Failure`.

A batch that runs out of device memory is not failed as a whole: the
allocator's cache is emptied and the batch is run again split in halves
(by request, so a request's CFG rows stay together), recursively, so only a
request that does not fit even alone fails with `out_of_memory` and the
other tenants' requests in its batch go on.

The tick's batches are queued back to back and the device is synchronized
once, at the end of the tick; each batch is timed by the backend's
`batch_timer` (CUDA events on a GPU). An allocation failure is raised when
the call is queued, so the retry above needs no synchronize.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ediffi.failure import Failure
from ediffi.pipeline import DenoiserInputs, PendingEvaluation
from engines.backend import Backend
from engines.failures import failure_from_exception, free_device_memory, is_out_of_memory
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
    failures: dict[str, Failure] = field(default_factory=dict)
    batches: list[BatchTiming] = field(default_factory=list)

    @property
    def forward_seconds(self) -> float:
        return sum(b.seconds for b in self.batches)


class Executor:
    def __init__(self, backend: Backend):
        self.backend = backend

    def execute(self, plan: StepPlan, pending: Mapping[str, PendingEvaluation]) -> StepResult:
        result = StepResult(plan.tick)
        timed = []  # (key, rows, requests, timer): read after the tick's one synchronize
        for group in plan.groups:
            ids = list(group.request_ids)
            try:
                evaluations = [pending[rid] for rid in ids]
                for rid, ev in zip(ids, evaluations):
                    if (ev.stage, ev.expert) != (group.key.stage, group.key.expert):
                        raise RuntimeError(
                            f"request {rid} pends on {ev.stage}/{ev.expert}, planned for {group.key.stage}/{group.key.expert}"
                        )
            except Exception as exc:
                log.exception("batch %s of %d requests is inconsistent", group.key, len(ids))
                for rid in ids:
                    result.failures[rid] = failure_from_exception(exc)
                continue
            self._run_batch(group.key, ids, evaluations, result, timed)
        if timed:
            self.backend.synchronize()  # once per tick
        result.batches = [BatchTiming(key, rows, n, timer.seconds) for key, rows, n, timer in timed]
        return result

    def _run_batch(
        self, key: GroupKey, ids: list[str], evaluations: list[PendingEvaluation], result: StepResult, timed: list
    ) -> None:
        """One batched call for ``ids``, queued (not waited for: on a GPU the
        next batch's launches overlap this one's kernels); on out-of-memory,
        free the cache and run each half alone."""
        try:
            inputs = evaluations[0].inputs if len(ids) == 1 else DenoiserInputs.cat([e.inputs for e in evaluations])
            timer = self.backend.batch_timer()
            denoised = self.backend.run(key.stage, key.expert, inputs)
            timer.stop()
        except Exception as exc:  # fail this batch's requests, keep serving
            if is_out_of_memory(exc):
                # Drop the references to the failed call's tensors before emptying the cache.
                inputs = denoised = None
                free_device_memory(self.backend.device)
                if len(ids) > 1:
                    log.warning("batch %s of %d requests ran out of memory; retrying in halves", key, len(ids))
                    half = len(ids) // 2
                    self._run_batch(key, ids[:half], evaluations[:half], result, timed)
                    self._run_batch(key, ids[half:], evaluations[half:], result, timed)
                    return
            log.exception("batch %s of %d requests failed", key, len(ids))
            failure = failure_from_exception(exc)
            for rid in ids:
                result.failures[rid] = failure
            return
        timed.append((key, len(inputs), len(ids), timer))
        offset = 0
        for rid, ev in zip(ids, evaluations):
            rows = len(ev.inputs)
            result.outputs[rid] = denoised[offset : offset + rows]
            offset += rows
