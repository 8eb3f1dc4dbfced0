"""Fault injection for the failure tests (no tests here): real backends that fail the way a
GPU does, and a worker process built on one.

These are the real :class:`~engines.torch_backend.TorchBackend` with one fault added, not
mocks: every call that does not fail runs the real model.

* :class:`OutOfMemoryAboveRows` raises ``torch.OutOfMemoryError`` for any call of more than
  ``fits_rows`` rows, the way a device with room for that many rows does;
* :class:`BrokenDevice` fails every call, the way a GPU with a broken CUDA context does;
* :class:`HungDevice` never returns from a call, the way a hung GPU does.

``python -m tests.support.fault_injection --metrics-port P [--fault broken|hung]`` runs ``ediffi worker``
(settings from the ``EDIFFI_*`` environment, as the real one) on a :class:`BrokenDevice` or :class:`HungDevice`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import torch

from engines.torch_backend import TorchBackend

#: What the CUDA allocator says; none of it may reach a client.
CUDA_OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
    "1.02 GiB is free. Process 4242 has 78.13 GiB memory in use."
)
BROKEN_DEVICE_TEXT = "CUDA error: an illegal memory access was encountered (device 0, /secret/path/kernel.cu:42)"


class OutOfMemoryAboveRows(TorchBackend):
    """The torch backend on a device that holds at most ``fits_rows`` rows per call."""

    def __init__(self, *args, fits_rows: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fits_rows = fits_rows
        self.calls: list[int] = []  # rows of every call, failed or not
        self.out_of_memory_calls = 0

    def run(self, stage, expert, inputs):
        self.calls.append(len(inputs))
        if len(inputs) > self.fits_rows:
            self.out_of_memory_calls += 1
            raise torch.OutOfMemoryError(CUDA_OOM_TEXT)
        return super().run(stage, expert, inputs)


class BrokenDevice(TorchBackend):
    """The torch backend on a device whose context is gone: every call fails."""

    def run(self, stage, expert, inputs):
        raise RuntimeError(BROKEN_DEVICE_TEXT)


class HungDevice(TorchBackend):
    """The torch backend on a device that stops answering: every denoiser call blocks for good (a hung
    kernel or driver), while the process, its threads and its heartbeats look alive."""

    def run(self, stage, expert, inputs):
        threading.Event().wait()


FAULTS = {"broken": BrokenDevice, "hung": HungDevice}


def faulty_engine(fault: str):
    def build(settings, model_dir: Path):
        from engines.engine import Engine, EngineConfig

        backend = FAULTS[fault](model_dir, max_batch=settings.max_batch, threads=settings.intra_op_threads)
        return Engine(backend, EngineConfig(max_rows_per_tick=None)).start()

    return build


def main() -> None:
    from server.main import run_worker
    from server.settings import Settings

    parser = argparse.ArgumentParser(description="ediffi worker on a broken device")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--fault", choices=sorted(FAULTS), default="broken")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    run_worker(settings, settings.model_dir, args.metrics_port, engine_factory=faulty_engine(args.fault))


if __name__ == "__main__":
    main()
