"""One thread per backend runs all of its torch work (docs/architecture.md §3).

Why one thread: PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a
pool of worker threads for every thread that ever entered a parallel region,
for as long as that thread lives. A model loaded and warmed up on the main
thread and then served from an engine thread leaves two pools, so more
OpenMP threads exist than cores; libgomp then stops spinning between
parallel regions (its "throttled" wait) and parks its workers, and a
forward pass is thousands of small parallel regions. Measured on the 2-core
VM with 2 torch threads, one expert of the shipped model at 8 rows: 77-97 ms
and 1.98 CPU seconds per wall second when loading and calls share a thread,
126-152 ms and 1.35-1.38 when they do not (`OMP_WAIT_POLICY`/`GOMP_SPINCOUNT`
did not recover it). In a serving run that made every denoiser call 1.3-2x
slower than the same call in the bench's calibration.

A `DeviceThread` is a one-worker `ThreadPoolExecutor`: `call` runs a
function there and returns its result (or raises its exception), and runs it
inline when already there, so wrapped methods may call each other. The
backend's entry points that touch torch (`load`, `warmup`, `time_buckets`,
`run`) are wrapped by `on_device_thread` (`engines.backend.Backend`), and
the engine runs each tick there, so text encoding, denoiser calls and the
cost model's timings share one pool. On a GPU it is also the one thread
that issues the device's work.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class DeviceThread:
    """A single long-lived worker thread; see the module docstring."""

    def __init__(self, name: str = "device"):
        self.name = name
        self._ident: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._record_ident)

    def _record_ident(self) -> None:
        self._ident = threading.get_ident()

    @property
    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        return self._ident is not None and threading.get_ident() == self._ident

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on this thread and return its result
        (inline when called from this thread; waits for earlier calls)."""
        if self.is_current:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def shutdown(self, wait: bool = True) -> None:
        """Let the thread exit once its queued calls are done (its OpenMP pool goes with it)."""
        self._executor.shutdown(wait=wait)


def on_device_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Wrap a backend method so it runs on the backend's `device_thread`."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> T:
        return self.device_thread.call(method, self, *args, **kwargs)  # inline when already there

    wrapper.__on_device_thread__ = True  # type: ignore[attr-defined]
    return wrapper


__all__ = ["DeviceThread", "on_device_thread"]
