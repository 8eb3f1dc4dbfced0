"""The runtime interface every backend implements (PyTorch now; ONNX Runtime
and TensorRT behind the same interface later).

A backend holds every expert of every stage resident on one device and runs
one batched denoiser call at a time, with the docs/architecture.md §3 call contract:
`run(stage, expert, inputs)` takes the rows of a `DenoiserInputs` (per-row
sigma, context, pooled, paint-with-words mask and strength, and for SR stages
the low-res image) and returns `denoised [B, C, H, W]`. It makes no policy:
the scheduler decides what runs together; the backend only declares how
large a batch it takes (`max_batch`) and which batch sizes it is tuned for
(`buckets`).

The backend also exposes the `EDiffIModel` the engine uses for everything
that is not a denoiser call (encoders, the cascade config, sigma routing).

Every backend owns one `DeviceThread` (`engines.device_thread`): its entry
points that touch torch (`DEVICE_THREAD_METHODS`, wrapped in every subclass)
run there whoever calls them, and the engine runs its ticks there, so a
process's torch work for one device stays on one thread (on a CPU, one
OpenMP pool: two pools made every call 1.3-2x slower).
"""

from __future__ import annotations

import threading
import time
import weakref
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ediffi.discrete import timestep_at
from ediffi.model import EDiffIModel
from ediffi.pipeline import DenoiserInputs, stage_shape
from engines.cost_model import CostModel
from engines.device_thread import DeviceThread, on_device_thread
from export.buckets import batch_buckets, bucket_for  # noqa: F401  (re-exported: part of the backend API)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


# The entry points that touch torch: each runs on the backend's device thread.
DEVICE_THREAD_METHODS = ("load", "warmup", "time_buckets", "run")
_DEVICE_THREAD_LOCK = threading.Lock()  # two first users of a backend get one thread


class Backend(ABC):
    """One runtime on one device, all experts resident."""

    name: str = "abstract"
    _device_thread: DeviceThread | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in DEVICE_THREAD_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__on_device_thread__", False):
                setattr(cls, name, on_device_thread(method))

    @property
    def device_thread(self) -> DeviceThread:
        """The thread this backend's torch work runs on (created on first use; it exits when the
        backend is closed or collected)."""
        if self._device_thread is not None:
            return self._device_thread
        with _DEVICE_THREAD_LOCK:
            if self._device_thread is None:
                thread = DeviceThread(f"device[{self.name}]")
                self._device_thread = thread
                weakref.finalize(self, thread.shutdown, wait=False)
        return self._device_thread

    def close(self) -> None:
        """Stop the device thread (after its queued calls)."""
        if self._device_thread is not None:
            self._device_thread.shutdown()

    # Seconds of one call per (stage, expert) and batch bucket, measured by
    # `warmup` (empty until then): the fastest call, and every timed call
    # (the cost model takes their median).
    profile: dict[tuple[str, str], dict[int, float]] = {}
    profile_samples: dict[tuple[str, str], dict[int, list[float]]] = {}

    def cost_model(self) -> CostModel:
        """Forward seconds versus batch rows per expert, from the warm-up
        timings (empty before warm-up): what the scheduler batches by."""
        return CostModel.from_timings(self.profile_samples or self.profile)

    @on_device_thread
    def time_buckets(self, repeats: int = 5) -> tuple[dict, dict]:
        """Time `repeats` calls of every expert at every batch bucket, after
        an untimed round: ({(stage, expert): {rows: [wall seconds]}}, the
        same in process CPU seconds). Rounds go over every (expert, bucket)
        in turn, so a shared machine's load drifting during the measurement
        weighs on every bucket alike instead of on the ones timed last."""
        cells = [(stage, expert, rows) for stage, expert in self.experts() for rows in self.buckets(stage, expert)]
        inputs = {(stage, rows): self.dummy_inputs(stage, rows) for stage, _, rows in cells}
        wall: dict[tuple[str, str], dict[int, list[float]]] = {}
        cpu: dict[tuple[str, str], dict[int, list[float]]] = {}
        with torch.inference_mode():
            for round_ in range(repeats + 1):
                for stage, expert, rows in cells:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    self.run(stage, expert, inputs[(stage, rows)])
                    self.synchronize()
                    if round_:  # the first round warms allocators and kernels
                        wall.setdefault((stage, expert), {}).setdefault(rows, []).append(time.perf_counter() - start)
                        cpu.setdefault((stage, expert), {}).setdefault(rows, []).append(time.process_time() - cpu_start)
        return wall, cpu

    @abstractmethod
    def load(self, model: EDiffIModel | str | Path) -> None:
        """Load (or adopt) a model and make every expert resident."""

    # Subclasses set these in __init__/load; the accessors below serve every runtime.
    _model: EDiffIModel | None = None
    _device: torch.device
    _dtype: torch.dtype
    _max_batch: int | dict[tuple[str, str], int] = 16

    @property
    def model(self) -> EDiffIModel:
        """The loaded model: encoders, config and sigma routing."""
        if self._model is None:
            raise RuntimeError("the backend has no model loaded; call load() first")
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def max_batch(self, stage: str, expert: str) -> int:
        """Most rows one call of this expert takes (one cap, or one per expert)."""
        if isinstance(self._max_batch, dict):
            return int(self._max_batch.get((stage, expert), max(self._max_batch.values())))
        return int(self._max_batch)

    def _expert(self, stage: str, expert: str):
        try:
            return self.model.stages[stage].experts[expert]
        except KeyError:
            raise KeyError(f"no expert {expert!r} in stage {stage!r}") from None

    def buckets(self, stage: str, expert: str) -> list[int]:
        return batch_buckets(self.max_batch(stage, expert))

    @abstractmethod
    def warmup(self) -> None:
        """Run every expert once at each batch bucket (allocator, kernels)."""

    @abstractmethod
    def run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        """One batched denoiser call; rows beyond max_batch are chunked."""

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on CPU."""

    def batch_timer(self) -> BatchTimer:
        """A timer started now for one batched call: CUDA events on a CUDA
        device (read after the tick's one synchronize), else the wall clock."""
        return BatchTimer(self.device)

    def experts(self) -> list[tuple[str, str]]:
        """Every (stage, expert) pair of the loaded model, in cascade order."""
        return [(s.name, e.name) for s in self.model.config.stages for e in s.experts]

    def dummy_inputs(self, stage: str, rows: int, sigma: float = 1.0) -> DenoiserInputs:
        """Valid denoiser inputs of `rows` rows (warmup, benchmarks)."""
        model = self.model
        cfg = model.config.stage(stage)
        enc = model.encoders
        device, dtype = self.device, self.dtype
        # A latent stage samples at 1/scale_factor of its default pixel size.
        ch, size, _ = stage_shape(cfg, cfg.image_size, cfg.image_size)
        g = torch.Generator().manual_seed(rows)
        length = enc.context_length
        sr = cfg.is_super_resolution
        # an inpainting UNet's mask and masked-image latents travel as low_res (no noise level)
        extra = ch if sr else cfg.mask_channels
        return DenoiserInputs(
            x=(torch.randn(rows, ch, size, size, generator=g) * sigma).to(device, dtype),
            sigma=torch.full((rows,), sigma, device=device, dtype=torch.float32),  # noise levels stay float32
            context=torch.randn(rows, length, enc.context_dim, generator=g).to(device, dtype),
            context_mask=torch.ones(rows, length, dtype=torch.bool, device=device),
            pooled=torch.randn(rows, enc.pooled_dim, generator=g).to(device, dtype),
            pww_mask=torch.zeros(rows, length, size, size, device=device, dtype=dtype),
            pww_strength=torch.zeros(rows, device=device, dtype=dtype),
            low_res=torch.randn(rows, extra, size, size, generator=g).to(device, dtype) if extra else None,
            low_res_sigma=torch.full((rows,), cfg.low_res_aug_sigma, device=device, dtype=torch.float32) if sr else None,
            timestep=None if cfg.schedule is None else torch.full(
                (rows,), timestep_at(cfg.schedule, sigma), device=device, dtype=torch.float32
            ),
        )

    def describe(self) -> str:
        return f"{self.name}:{self.device}:{str(self.dtype).removeprefix('torch.')}"


class BatchTimer:
    """Times one call without synchronizing. On CUDA, events recorded on the
    device's current stream measure the call's device time; `seconds` may
    only be read after the stream was synchronized (once per tick, by the
    executor). On CPU the call is synchronous: the wall clock."""

    def __init__(self, device: torch.device):
        import time

        self._cuda = device.type == "cuda"
        if self._cuda:
            stream = torch.cuda.current_stream(device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(stream)
            self._stream = stream
        else:
            self._clock = time.perf_counter
            self._started = self._clock()
        self._seconds: float | None = None

    def stop(self) -> BatchTimer:
        if self._cuda:
            self._end.record(self._stream)
        else:
            self._seconds = self._clock() - self._started
        return self

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self._seconds = self._start.elapsed_time(self._end) / 1000.0  # ms; needs both events completed
        return self._seconds


def slice_rows(inputs: DenoiserInputs, start: int, stop: int) -> DenoiserInputs:
    """Rows [start, stop) of every tensor of a call."""
    return DenoiserInputs(
        **{
            name: (None if (v := getattr(inputs, name)) is None else v[start:stop])
            for name in DenoiserInputs.__dataclass_fields__
        }
    )


def profile_buckets(backend: Backend, repeats: int = 3) -> dict[tuple[str, str], dict[int, float]]:
    """Run every expert at each of its batch buckets through `backend.run`;
    the fastest of the calls after the first (the machine may be shared) is
    the bucket's time (Backend.profile, the engine's tick budget)."""
    profile: dict[tuple[str, str], dict[int, float]] = {}
    for stage, expert in backend.experts():
        timings = profile.setdefault((stage, expert), {})
        for rows in backend.buckets(stage, expert):
            inputs = backend.dummy_inputs(stage, rows)
            backend.run(stage, expert, inputs)
            backend.synchronize()
            times = []
            for _ in range(max(0, repeats - 1)):
                start = time.perf_counter()
                backend.run(stage, expert, inputs)
                backend.synchronize()
                times.append(time.perf_counter() - start)
            if times:
                timings[rows] = min(times)
    return profile
