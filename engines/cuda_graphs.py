"""The compiled GPU path of the PyTorch backend: CUDA graphs per batch bucket
(or torch.compile), selected by a setting.

A denoiser call on a small batch is launch-bound on a GPU: hundreds of small
kernels, each a few microseconds. Capturing each expert's forward once per
batch bucket in a CUDA graph replays the whole call as one launch. Shapes
must be static, so a call of n rows runs at the smallest bucket b >= n: its
rows are copied into the bucket's static input buffers, the b - n spare rows
repeat the last real row (every row is independent, paint-with-words'
max included, so padding never changes a real row), the graph is replayed,
and the first n output rows are returned (cloned: the static output is
overwritten by the next replay).

All graphs of a backend share one memory pool (experts run one at a time,
as TensorRT's contexts share one activation buffer); static inputs are
shared by the experts of a stage per bucket.

`mode="torch_compile"` instead wraps each expert in
`torch.compile(mode="reduce-overhead", dynamic=False)` (Inductor kernels plus
its own CUDA graphs), with the same padding to buckets so that it compiles
once per bucket. Every expert shares one `forward` code object, so Dynamo
counts experts x buckets compilations against one recompile limit (default
8: 5 experts x 5 buckets would silently fall back to eager after the 8th);
`compile_experts` raises the limit to what the model needs and makes
hitting it an error instead of a silent fallback.

Capture and replay run under `torch.cuda.device(device)`: a graph captured
while another device is current records nothing of the work queued on
`device` (an empty graph whose replays return stale outputs).

Everything that needs CUDA is exercised by tests marked `gpu`
(tests/engines/test_gpu_cuda_graphs.py), which skip without a CUDA device; the
padding logic is tested on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ediffi.model import EDiffIModel
from ediffi.pipeline import DenoiserInputs
from engines.backend import batch_buckets, bucket_for, slice_rows
from engines.torch_backend import TorchBackend

MODES = ("cuda_graphs", "torch_compile")
_FIELDS = tuple(DenoiserInputs.__dataclass_fields__)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with its last row repeated up to `rows` rows."""
    n = t.shape[0]
    if n == rows:
        return t
    if n > rows or n == 0:
        raise ValueError(f"cannot pad {n} rows to {rows}")
    return torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])])


def pad_inputs(inputs: DenoiserInputs, rows: int) -> DenoiserInputs:
    return DenoiserInputs(**{
        name: (None if (v := getattr(inputs, name)) is None else pad_rows(v, rows)) for name in _FIELDS
    })


def compile_experts(nets: dict[Any, torch.nn.Module], buckets: dict[Any, list[int]], **compile_options) -> dict[Any, Any]:
    """torch.compile each expert, with Dynamo's recompile limit raised to
    cover every (expert, bucket) compilation and a hit of the limit made an
    error (torch would otherwise run the rest eagerly, silently)."""
    import torch._dynamo.config as dynamo

    needed = sum(len(b) for b in buckets.values()) + 2  # +2: a spare for a guard on a new dtype/device
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and its older alias
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(int(getattr(dynamo, name)), needed))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(int(getattr(dynamo, name)), needed))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, True)
    return {key: _PaddedCompiled(torch.compile(net, dynamic=False, **compile_options), buckets[key])
            for key, net in nets.items()}


class GraphedExpert:
    """One expert, captured once per batch bucket on its device."""

    def __init__(self, net: torch.nn.Module, buckets: list[int], pool: Any, static: dict[int, DenoiserInputs],
                 device: torch.device | None = None):
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net
        self.buckets = list(buckets)
        self.pool = pool
        self.static = static  # per bucket; shared with the stage's other experts
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def capture(self, bucket: int) -> None:
        with torch.cuda.device(self.device):
            inputs = self.static[bucket].as_kwargs()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up (allocator, cuBLAS/cuDNN handles) outside the graph
                for _ in range(2):
                    self.net(**inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bucket] = self.net(**inputs)
            self.graphs[bucket] = graph

    def __call__(self, inputs: DenoiserInputs) -> torch.Tensor:
        with torch.cuda.device(self.device):
            return self._replay(inputs)

    def _replay(self, inputs: DenoiserInputs) -> torch.Tensor:
        rows = len(inputs)
        bucket = bucket_for(rows, self.buckets)
        if bucket not in self.graphs:
            self.capture(bucket)
        static = self.static[bucket]
        for name in _FIELDS:
            value, target = getattr(inputs, name), getattr(static, name)
            if value is None:
                continue
            target[:rows].copy_(value)
            if rows < bucket:
                target[rows:].copy_(value[-1:].expand(bucket - rows, *value.shape[1:]))
        self.graphs[bucket].replay()
        return self.outputs[bucket][:rows].clone()


class CompiledTorchBackend(TorchBackend):
    """TorchBackend on CUDA with CUDA graphs (or torch.compile) per bucket."""

    def __init__(self, model: EDiffIModel | str | Path | None = None, *, device: str | torch.device = "cuda",
                 dtype: str | torch.dtype = torch.float32, max_batch: int = 16, threads: int | None = None,
                 mode: str = "cuda_graphs", buckets: list[int] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
        if torch.device(device).type != "cuda":
            raise ValueError(f"{mode} needs a CUDA device, got {device!r}; use the plain torch backend on CPU")
        self.mode = mode
        self._bucket_list = sorted(set(buckets)) if buckets else None
        self._graphed: dict[tuple[str, str], Any] = {}
        super().__init__(model, device=device, dtype=dtype, max_batch=max_batch, threads=threads)

    def describe(self) -> str:
        return f"torch+{self.mode}:{self.device}:{str(self.dtype).removeprefix('torch.')}"

    def buckets(self, stage: str, expert: str) -> list[int]:
        if (stage, expert) in self._graphed:
            return list(self._graphed[(stage, expert)].buckets)
        cap = self.max_batch(stage, expert)
        if not self._bucket_list:
            return batch_buckets(cap)
        return sorted({b for b in self._bucket_list if b < cap} | {cap})

    def load(self, model: EDiffIModel | str | Path) -> None:
        super().load(model)
        self._graphed = {}
        if self.mode == "cuda_graphs":
            with torch.cuda.device(self.device):
                pool = torch.cuda.graph_pool_handle()
            for stage_cfg in self.model.config.stages:
                stage = stage_cfg.name
                names = [e.name for e in stage_cfg.experts]
                buckets = self.buckets(stage, names[0])
                static = {b: self.dummy_inputs(stage, b) for b in buckets}
                for expert in names:
                    self._graphed[(stage, expert)] = GraphedExpert(self._expert(stage, expert), buckets, pool, static,
                                                                   self.device)
        else:
            keys = self.experts()
            self._graphed = compile_experts({k: self._expert(*k) for k in keys}, {k: self.buckets(*k) for k in keys},
                                            mode="reduce-overhead")

    @torch.inference_mode()
    def warmup(self, repeats: int = 3) -> None:
        """Capture (or compile) every expert at every bucket, then time the
        replays into `profile`."""
        from engines.backend import profile_buckets

        with torch.cuda.device(self.device):
            self.profile = profile_buckets(self, repeats)

    @torch.inference_mode()
    def run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        runner = self._graphed[(stage, expert)]
        cap = runner.buckets[-1]
        rows = len(inputs)
        with torch.cuda.device(self.device):
            if rows <= cap:
                return runner(inputs)
            return torch.cat([runner(slice_rows(inputs, i, min(i + cap, rows))) for i in range(0, rows, cap)])


class _PaddedCompiled:
    def __init__(self, compiled, buckets: list[int]):
        self.compiled = compiled
        self.buckets = list(buckets)

    def __call__(self, inputs: DenoiserInputs) -> torch.Tensor:
        rows = len(inputs)
        bucket = bucket_for(rows, self.buckets)
        return self.compiled(**pad_inputs(inputs, bucket).as_kwargs())[:rows].clone()
