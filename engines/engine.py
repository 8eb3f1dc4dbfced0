"""The engine loop: one per device. Ties the scheduler (decides), the executor
(runs) and the per-request state machines (sample), docs/architecture.md §2.

Each tick:
  1. take new submissions and cancellations from the thread-safe inbox;
  2. `scheduler.admit`: drop cancelled/expired requests before any compute,
     admit waiting requests; encode the admitted ones (batched text encoding
     through an LRU cache of prompt embeddings);
  3. `scheduler.schedule` -> `StepPlan`; `executor.execute` -> `StepResult`;
  4. advance each served request (CFG + sampler step), report progress,
     finish the requests that are done, and give the scheduler their next
     pending evaluations.

Ticks run on the backend's device thread (`engines.device_thread`), the one
thread that loaded, warmed up and timed the model; the engine's own thread
only waits for work and hands each tick over. Hooks and request callbacks
run inside the tick.

Use it from a worker or an in-process server with a background thread
(`start()`, `submit()`, `handle.result()` or `await handle.wait()`), or drive
it synchronously (`submit()` then `run_until_idle()`), as tests do.

    engine = Engine.from_settings(settings)          # or Engine(TorchBackend(model_dir), EngineConfig())
    engine.start()
    handle = engine.submit(GenerationRequest(prompt="a red circle"), on_progress=lambda d, t: ...)
    outcome = handle.result()                        # RequestOutcome
    pngs = outcome.png_bytes()
    engine.cancel(handle.id)                         # or handle.cancel()
    engine.stop()
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ediffi.failure import Failure, FailureKind, InputError, QueueFull
from ediffi.model import EDiffIModel
from ediffi.pipeline import GenerationRequest, encode_request, validate_for_model
from engines.backend import Backend
from engines.executor import BatchTiming, Executor, StepResult
from engines.failures import failure_from_exception
from engines.request import (
    EngineRequest,
    ProgressCallback,
    RequestHandle,
    RequestOutcome,
    TextEmbeddingCache,
    text_keys,
)
from engines.scheduler import SchedulerConfig, StepPlan, StepScheduler, auto_row_budget

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine tunables (a subset of the service Settings)."""

    policy: str = "step"  # step | request | none
    max_active_requests: int = 32
    # Most requests waiting for admission; beyond it submit raises QueueFull.
    max_waiting: int | None = None
    # Row budget per tick (step policy). None: no cap beyond the max batch;
    # "auto": the largest batch any expert still gets cheaper per row at,
    # from the backend's warm-up cost model (`auto_row_budget`: None on a
    # GPU); without warm-up timings "auto" means None.
    max_rows_per_tick: int | str | None = "auto"
    # Ticks a request may go unserved before it jumps ahead (step policy).
    max_wait_ticks: int = 32
    text_cache_size: int = 1024

    def scheduler_config(self, cohort_rows: int, backend: Backend | None = None) -> SchedulerConfig:
        budget = self.max_rows_per_tick if self.policy == "step" else None  # baselines run whole cohorts
        if budget == "auto":
            budget = (
                auto_row_budget(backend.cost_model(), backend.max_batch) if backend is not None else None
            )
        elif isinstance(budget, str):
            raise ValueError(f"max_rows_per_tick must be an int, None or 'auto', got {budget!r}")
        return SchedulerConfig(
            policy=self.policy, max_active_requests=self.max_active_requests,
            max_waiting=self.max_waiting, max_rows_per_tick=budget, max_wait_ticks=self.max_wait_ticks,
            cohort_rows=cohort_rows,
        )


@dataclass
class TickInfo:
    tick: int
    seconds: float
    forward_seconds: float
    rows: int
    batches: int
    waiting: int
    active: int


@dataclass
class EngineHooks:
    """Plain metric callbacks (the server maps them to Prometheus). They run
    inside the tick, on the device thread: keep them quick."""

    on_batch: Callable[[BatchTiming], None] | None = None  # batch size and forward time per expert
    on_admit: Callable[[str, float], None] | None = None  # request id, queue wait seconds
    on_finish: Callable[[RequestOutcome], None] | None = None
    on_tick: Callable[[TickInfo], None] | None = None


def _setting(settings: Any, name: str, default: Any = None) -> Any:
    if isinstance(settings, dict):
        return settings.get(name, default)
    return getattr(settings, name, default)


def _is_imported(model: EDiffIModel | str | Path) -> bool:
    from ediffi.config import ModelConfig

    config = model.config if isinstance(model, EDiffIModel) else ModelConfig.load(model)
    return config.is_imported


def make_backend(
    backend: str = "torch",
    model: EDiffIModel | str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    max_batch: int = 16,
    threads: int | None = None,
    onnx_dir: str | Path | None = None,
    tensorrt_dir: str | Path | None = None,
    compile_mode: str | None = None,
) -> Backend:
    """A backend by name: torch (compile_mode "cuda_graphs" | "torch_compile"
    on CUDA), onnxruntime (graphs in onnx_dir, default <model dir>/onnx) or
    tensorrt (engines in tensorrt_dir, default <model dir>/tensorrt)."""
    if backend != "torch" and model is not None and _is_imported(model):
        raise ValueError(
            f"backend {backend!r}: imported diffusers models run on the torch backend only (no ONNX/TensorRT export of them yet)"
        )
    if backend == "torch":
        if compile_mode and compile_mode != "none":
            from engines.cuda_graphs import CompiledTorchBackend

            return CompiledTorchBackend(model, device=device, dtype=dtype, max_batch=max_batch, threads=threads, mode=compile_mode)
        from engines.torch_backend import TorchBackend

        return TorchBackend(model, device=device, dtype=dtype, max_batch=max_batch, threads=threads)
    if backend == "onnxruntime":
        from engines.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, onnx_dir=onnx_dir, device=device, dtype=dtype, max_batch=max_batch, threads=threads)
    if backend == "tensorrt":
        from engines.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, tensorrt_dir=tensorrt_dir, onnx_dir=onnx_dir, device=device, dtype=dtype, max_batch=max_batch)
    raise ValueError(f"unknown backend {backend!r}; choose torch, onnxruntime or tensorrt")


class Engine:
    """One device's serving loop. Thread-safe entry points: `submit`,
    `cancel`, `load`, `start`, `stop`. Everything else runs on the engine
    thread (or the caller's, with `run_until_idle`)."""

    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        hooks: EngineHooks | Iterable[EngineHooks] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ):
        self.backend = backend
        self.config = config or EngineConfig()
        self.name = name or backend.describe()
        self._clock = clock
        self._hooks: list[EngineHooks] = [] if hooks is None else ([hooks] if isinstance(hooks, EngineHooks) else list(hooks))
        model = backend.model
        first = model.config.stages[0]
        cohort_rows = backend.max_batch(first.name, first.experts[0].name)
        self.scheduler = StepScheduler(
            self.config.scheduler_config(cohort_rows, backend),
            max_batch=lambda key: backend.max_batch(key.stage, key.expert),
            cost_model=backend.cost_model(),
        )
        self.executor = Executor(backend)
        self.text_cache = TextEmbeddingCache(model.encoders, self.config.text_cache_size)
        self._requests: dict[str, EngineRequest] = {}
        self._inbox: list[EngineRequest] = []
        self._cancels: list[str] = []
        self._lock = threading.Condition()
        self._outstanding_rows = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.ticks = 0
        self._tick_started_at: float | None = None  # time.monotonic() while a tick runs

    # -- construction ------------------------------------------------------
    @classmethod
    def from_settings(
        cls,
        settings: Any,
        model_dir: str | Path | None = None,
        *,
        model: EDiffIModel | None = None,
        device: str | None = None,
        hooks: EngineHooks | Iterable[EngineHooks] | None = None,
        warmup: bool = True,
    ) -> Engine:
        """Build from a Settings-like object (or dict) with `backend`,
        `device`, `dtype`, `max_batch`, `max_active_requests`,
        `batching_policy`, `intra_op_threads`, `model_dir`."""
        source = model if model is not None else (model_dir or _setting(settings, "model_dir"))
        if source is None:
            raise ValueError("no model: pass model_dir or model, or set model_dir in the settings")
        backend = make_backend(
            _setting(settings, "backend", "torch"), source,
            device=device or _setting(settings, "device", "cpu"), dtype=_setting(settings, "dtype", "float32"),
            max_batch=int(_setting(settings, "max_batch", 16)), threads=_setting(settings, "intra_op_threads"),
            onnx_dir=_setting(settings, "onnx_dir"), tensorrt_dir=_setting(settings, "tensorrt_dir"),
            compile_mode=_setting(settings, "compile_mode"),
        )
        if warmup:
            backend.warmup()
        config = EngineConfig(
            policy=_setting(settings, "batching_policy", "step"),
            max_active_requests=int(_setting(settings, "max_active_requests", 32)),
            max_rows_per_tick=_setting(settings, "max_rows_per_tick", "auto"),
        )
        return cls(backend, config, hooks=hooks)

    @property
    def model(self) -> EDiffIModel:
        return self.backend.model

    def add_hooks(self, hooks: EngineHooks) -> None:
        self._hooks.append(hooks)

    # -- thread-safe API ---------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        on_done: Callable[[RequestOutcome], None] | None = None,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> RequestHandle:
        """Queue a request. Validates it at once, against the served model too (InputError, a
        ValueError: a sampler or a sigma choice it lacks); raises `QueueFull` when `max_waiting`
        requests already wait. `on_progress (done, total)` and `on_done(outcome)` run inside the
        tick (device thread)."""
        request.validate()
        validate_for_model(self.model.config, request)
        rid = request_id or uuid.uuid4().hex
        now = self._clock()
        handle = RequestHandle(rid, self.cancel)
        entry = EngineRequest(
            rid, request, now, handle, deadline=None if timeout_s is None else now + timeout_s,
            on_progress=on_progress, on_done=on_done,
        )
        with self._lock:
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in the engine")
            limit = self.scheduler.config.max_waiting
            waiting = len(self._inbox) + self.scheduler.num_waiting
            if limit is not None and waiting >= limit:
                raise QueueFull(waiting, limit, limit="engine")
            self._requests[rid] = entry
            self._inbox.append(entry)
            self._outstanding_rows += entry.rows
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; it consumes no compute after
        the next tick starts. Returns False for unknown/finished ids."""
        with self._lock:
            if request_id not in self._requests:
                return False
            self._cancels.append(request_id)
            self._lock.notify_all()
            return True

    def free_capacity(self) -> int:
        """How many more requests this engine can take now: its scheduler's admission limit
        (and waiting limit) less the requests it holds. A worker claims that many jobs."""
        with self._lock:
            held, waiting = len(self._requests), len(self._inbox) + self.scheduler.num_waiting
        return self.scheduler.free_capacity(held, waiting)

    def load(self) -> int:
        """Outstanding denoiser rows (queued + running): for load balancing."""
        return self._outstanding_rows

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def generate(self, request: GenerationRequest, timeout: float | None = None, **kwargs) -> RequestOutcome:
        """Submit one request and wait for its outcome."""
        handle = self.submit(request, **kwargs)
        if self._thread is None:
            self.run_until_idle()
        return handle.result(timeout)

    # -- running -----------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is not None:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine[{self.name}]", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the loop. drain=True finishes all submitted requests first;
        else unfinished requests end as canceled."""
        thread = self._thread
        if thread is None:
            if not drain:
                self._cancel_all()
            return
        with self._lock:
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(drain=False)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._cancels or self.scheduler.has_work())

    def run_until_idle(self, max_ticks: int | None = None) -> int:
        """Tick until nothing is queued or running, waiting here (the ticks run on the device thread)."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is running; use handles instead")
        ticks = 0
        while self.has_work() and (max_ticks is None or ticks < max_ticks):
            self.tick()
            ticks += 1
        return ticks

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._inbox or self._cancels or self.scheduler.has_work()):
                    self._lock.wait()
                busy = bool(self._inbox or self._cancels or self.scheduler.has_work())
                if self._stopping and (not self._drain or not busy):
                    break
            try:
                self.tick()
            except Exception as exc:  # never leave submitters hanging
                log.exception("engine tick failed")
                self._fail_all(failure_from_exception(exc))
        self._cancel_all()

    # -- one tick ----------------------------------------------------------
    def tick(self) -> StepPlan:
        """One scheduling step, run on the backend's device thread (`engines.device_thread`:
        text encoding and denoiser calls on the thread that loaded and timed the model).
        Returns the plan it ran."""
        return self.backend.device_thread.call(self._tick)

    def tick_running_s(self) -> float:
        """How long the tick now running has taken (0 between ticks): a device call that never returns
        (a hung GPU) shows here, while every other sign of life (threads, heartbeats) stays fine."""
        started = self._tick_started_at
        return 0.0 if started is None else time.monotonic() - started

    def _tick(self) -> StepPlan:
        self._tick_started_at = time.monotonic()
        try:
            return self._run_tick()
        finally:
            self._tick_started_at = None

    def _run_tick(self) -> StepPlan:
        started = time.perf_counter()
        with torch.inference_mode():
            self._take_inbox()
            admission = self.scheduler.admit(self._clock())
            for rid, reason in admission.dropped:
                if reason == "canceled":
                    self._finish(rid, "canceled", Failure.of(FailureKind.CANCELED))
                else:
                    self._finish(rid, "expired", Failure.of(FailureKind.TIMEOUT))
            if admission.admitted:
                self._prepare(admission.admitted)
            plan = self.scheduler.schedule()
            result = StepResult(plan.tick)
            if plan:
                pending = {rid: self._requests[rid].pending for rid in plan.request_ids}
                result = self.executor.execute(plan, pending)
                self._apply(plan, result)
        self.ticks += 1
        info = TickInfo(
            plan.tick, time.perf_counter() - started, result.forward_seconds, plan.total_rows, len(plan.groups),
            self.scheduler.num_waiting, self.scheduler.num_active,
        )
        for hooks in self._hooks:
            for batch in result.batches:
                self._call(hooks.on_batch, batch)
            self._call(hooks.on_tick, info)
        return plan

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        for entry in inbox:
            self.scheduler.add(entry.id, entry.arrival, entry.rows, entry.deadline)
        for rid in cancels:
            self.scheduler.cancel(rid)

    def _prepare(self, ids: tuple[str, ...]) -> None:
        """Encode the requests admitted this tick (text batched) and start
        their state machines."""
        model = self.model
        entries = [self._requests[rid] for rid in ids]
        try:
            self.text_cache.prefetch(k for e in entries for k in text_keys(e.request))
        except Exception:  # the per-request encode below reports the error
            log.exception("batched text encoding failed")
        for entry in entries:
            try:
                entry.start(model, encode_request(model, entry.request, text_cache=self.text_cache))
            except Exception as exc:
                if not isinstance(exc, InputError):
                    log.exception("request %s failed to start", entry.id)
                self.scheduler.remove(entry.id)
                self._finish(entry.id, "failed", failure_from_exception(exc))
                continue
            wait = (entry.started_at or 0.0) - entry.queued_at
            for hooks in self._hooks:
                self._call(hooks.on_admit, entry.id, wait)
            view = entry.view()
            self.scheduler.set_pending(entry.id, view)
            if view is None:
                self._finish(entry.id, "succeeded")

    def _apply(self, plan: StepPlan, result: StepResult) -> None:
        updates = {}
        for rid, denoised in result.outputs.items():
            entry = self._requests[rid]
            try:
                entry.advance(denoised)
            except Exception as exc:
                log.exception("request %s failed to advance", rid)
                result.failures[rid] = failure_from_exception(exc)
                continue
            view = entry.view()
            updates[rid] = view
            if view is None:
                self._finish(rid, "succeeded")
        for rid, failure in result.failures.items():
            self.scheduler.remove(rid)
            self._finish(rid, "failed", failure)
        self.scheduler.complete(plan, updates)

    def _finish(self, rid: str, status: str, failure: Failure | None = None) -> None:
        with self._lock:
            entry = self._requests.pop(rid, None)
            if entry is None:
                return
            self._outstanding_rows -= entry.rows
        outcome = entry.finish(status, failure)
        for hooks in self._hooks:
            self._call(hooks.on_finish, outcome)

    def _cancel_all(self, failure: Failure | None = None, status: str = "canceled") -> None:
        """End every request; by default as canceled (the engine stopped)."""
        failure = failure or Failure.of(FailureKind.CANCELED)
        with self._lock:
            self._inbox.clear()
            self._cancels.clear()
            ids = list(self._requests)
        for rid in ids:
            self.scheduler.remove(rid)
            self._finish(rid, status, failure)

    def _fail_all(self, failure: Failure) -> None:
        self._cancel_all(failure, status="failed")

    @staticmethod
    def _call(fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("engine hook failed")
