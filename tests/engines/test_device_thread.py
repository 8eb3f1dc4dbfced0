"""All torch work of a backend runs on its one device thread (engines/device_thread.py).

Why it matters (measured, not asserted here: bench/README.md): with the model
loaded on one thread and served from another, PyTorch's OpenMP runtime keeps
two worker pools, parks its workers between parallel regions, and every CPU
denoiser call ran 1.3-2x slower than the bench's calibration of it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ediffi.pipeline import GenerationRequest
from engines import Engine, EngineConfig, EngineHooks, TorchBackend
from engines.backend import DEVICE_THREAD_METHODS
from engines.cuda_graphs import CompiledTorchBackend
from engines.device_thread import DeviceThread
from engines.onnx_backend import OnnxRuntimeBackend
from engines.tensorrt_backend import TensorRTBackend

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


def test_call_returns_raises_and_runs_inline_on_its_own_thread():
    thread = DeviceThread("test")
    try:
        assert thread.call(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        inner = []

        def outer():
            # A nested call from the device thread runs inline: waiting for itself would deadlock.
            inner.append(thread.call(threading.get_ident))
            return threading.get_ident()

        ident = thread.call(outer)
        assert inner == [ident] and ident != threading.get_ident()
        assert thread.is_current is False
        assert thread.call(lambda: thread.is_current) is True
    finally:
        thread.shutdown()


@pytest.mark.parametrize("cls", [TorchBackend, CompiledTorchBackend, OnnxRuntimeBackend, TensorRTBackend])
def test_every_backend_runs_its_torch_entry_points_on_the_device_thread(cls):
    for name in DEVICE_THREAD_METHODS:
        assert getattr(getattr(cls, name), "__on_device_thread__", False), f"{cls.__name__}.{name}"


class RecordingBackend(TorchBackend):
    """The torch backend, noting which thread loaded the model (a subclass, as a new backend would be)."""

    load_threads: list[int] = []

    def load(self, model):
        self.load_threads.append(threading.get_ident())
        super().load(model)


def test_load_timing_encoding_and_denoising_share_one_thread(tiny_model_dir):
    backend = RecordingBackend(tiny_model_dir, max_batch=4)
    seen: dict[str, set[int]] = {"encode": set(), "denoise": set(), "hooks": set()}
    for stage in backend.model.stages.values():
        for module in stage.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(lambda *_: seen["denoise"].add(threading.get_ident()))
    for module in backend.model.encoders.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda *_: seen["encode"].add(threading.get_ident()))
    backend.warmup(repeats=1)
    engine = Engine(backend, EngineConfig(), hooks=EngineHooks(on_tick=lambda _: seen["hooks"].add(threading.get_ident())))
    with engine:
        outcome = engine.generate(GenerationRequest(prompt="a red circle", steps=2, seed=1), timeout=120)
    assert outcome.ok, outcome.failure
    device = {backend.device_thread.call(threading.get_ident)}
    main = threading.get_ident()
    assert set(RecordingBackend.load_threads) == device
    assert seen["encode"] and seen["encode"] == device
    assert seen["denoise"] == device  # warm-up timings and served calls alike
    assert seen["hooks"] == device
    assert main not in device
    backend.close()
