"""Several engines, one per device: route each request to one of them.

`least_loaded` (default) picks the engine with the fewest outstanding
denoiser rows (ties broken round robin); `round_robin` cycles. A request
stays on its engine; `cancel` finds it there.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from ediffi.pipeline import GenerationRequest
from engines.engine import Engine, EngineHooks, _setting
from engines.request import ProgressCallback, RequestHandle, RequestOutcome

STRATEGIES = ("least_loaded", "round_robin")


class EnginePool:
    def __init__(self, engines: Iterable[Engine], strategy: str = "least_loaded"):
        self.engines = list(engines)
        if not self.engines:
            raise ValueError("an engine pool needs at least one engine")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self._turn = itertools.count()
        self._owner: dict[str, Engine] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        devices: list[str] | None = None,
        model_dir: str | Path | None = None,
        hooks: EngineHooks | None = None,
        strategy: str = "least_loaded",
        warmup: bool = True,
    ) -> EnginePool:
        """One engine per device (default: every CUDA device, else settings.device)."""
        if devices is None:
            import torch

            device = _setting(settings, "device", "cpu")
            if device == "cuda" and torch.cuda.device_count() > 1:
                devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            else:
                devices = [device]
        engines = [
            Engine.from_settings(settings, model_dir, device=d, hooks=hooks, warmup=warmup) for d in devices
        ]
        return cls(engines, strategy)

    def pick(self) -> Engine:
        turn = next(self._turn)
        n = len(self.engines)
        if self.strategy == "round_robin":
            return self.engines[turn % n]
        order = [self.engines[(turn + i) % n] for i in range(n)]
        return min(order, key=lambda e: e.load())

    def submit(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        on_done: Callable[[RequestOutcome], None] | None = None,
        **kwargs,
    ) -> RequestHandle:
        engine = self.pick()
        user_done = on_done

        def done(outcome: RequestOutcome) -> None:
            with self._lock:
                self._owner.pop(outcome.id, None)
            if user_done is not None:
                user_done(outcome)

        with self._lock:
            handle = engine.submit(request, on_progress, done, **kwargs)
            if not handle.done():
                self._owner[handle.id] = engine
        return handle

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            engine = self._owner.get(request_id)
        return False if engine is None else engine.cancel(request_id)

    def load(self) -> int:
        return sum(e.load() for e in self.engines)

    def start(self) -> EnginePool:
        for e in self.engines:
            e.start()
        return self

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        for e in self.engines:
            e.stop(drain=drain, timeout=timeout)

    def __enter__(self) -> EnginePool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
