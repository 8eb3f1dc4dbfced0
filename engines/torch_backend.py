"""The PyTorch backend: every expert of every stage resident on one device.

CPU (float32) or CUDA (float32, float16 or bfloat16). Calls run under
`torch.inference_mode`; `warmup` runs each expert at every batch bucket so the
first real requests do not pay for allocator growth or kernel selection.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ediffi.model import EDiffIModel, load_model
from ediffi.pipeline import DenoiserInputs
from engines.backend import Backend, batch_buckets, parse_dtype, slice_rows


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        model: EDiffIModel | str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        max_batch: int | dict[tuple[str, str], int] = 16,
        threads: int | None = None,
    ):
        self._device = torch.device(device)
        self._dtype = parse_dtype(dtype)
        if self._device.type == "cpu" and self._dtype != torch.float32:
            raise ValueError("the torch backend runs float32 on CPU; float16/bfloat16 need a CUDA device")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
        self._max_batch = max_batch
        if threads is not None:
            torch.set_num_threads(threads)
        self._model: EDiffIModel | None = None
        if model is not None:
            self.load(model)

    def load(self, model: EDiffIModel | str | Path) -> None:
        if isinstance(model, EDiffIModel):
            self._model = model.to(self._device, self._dtype)
        else:
            self._model = load_model(model, device=str(self._device), dtype=self._dtype)
        for ensemble in self._model.stages.values():
            ensemble.eval()
        self._model.encoders.eval()

    def warmup(self, repeats: int = 4) -> None:
        """Run each expert at each batch bucket once (allocator, kernel
        selection), then time `repeats` more calls of each into `profile`
        and `profile_samples` (the cost model takes their median). Wall
        clock after synchronizing: what a call costs the engine, contention
        included."""
        wall, _ = self.time_buckets(repeats)
        self.profile_samples = wall
        self.profile = {key: {rows: min(t) for rows, t in timings.items()} for key, timings in wall.items()}

    @torch.inference_mode()
    def run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        net = self._expert(stage, expert)
        cap = self.max_batch(stage, expert)
        rows = len(inputs)
        if rows <= cap:
            return net(**inputs.as_kwargs())
        return torch.cat([net(**slice_rows(inputs, i, min(i + cap, rows)).as_kwargs()) for i in range(0, rows, cap)])

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
