"""The executor queues a tick's batches back to back and synchronizes the
device once per tick (not after every batch), timing each batch with the
backend's timer."""

from __future__ import annotations

import torch

from engines import Engine, EngineConfig
from engines.backend import BatchTimer
from engines.torch_backend import TorchBackend
from tests.engines.test_engine import other_requests


class CountingBackend(TorchBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[str] = []

    def run(self, stage, expert, inputs):
        self.events.append("run")
        return super().run(stage, expert, inputs)

    def synchronize(self) -> None:
        self.events.append("sync")
        super().synchronize()


def test_one_synchronize_per_tick_after_all_its_batches(tiny_model):
    torch.set_num_threads(1)
    backend = CountingBackend(tiny_model, max_batch=4)
    engine = Engine(backend, EngineConfig(max_rows_per_tick=None))
    ticks = []
    from engines.engine import EngineHooks

    engine.add_hooks(EngineHooks(on_tick=lambda info: ticks.append((info, list(backend.events)))))
    batches = []
    engine.add_hooks(EngineHooks(on_batch=batches.append))
    handles = [engine.submit(r) for r in other_requests(4)]
    engine.run_until_idle()
    assert all(h.result(0).ok for h in handles)
    multi = 0
    previous = 0
    for _, events in ticks:
        tick_events = events[previous:]
        previous = len(events)
        if "run" in tick_events:
            assert tick_events.count("sync") == 1 and tick_events[-1] == "sync", tick_events
            multi += tick_events.count("run") > 1
    assert multi > 0  # some ticks ran several batches before their one synchronize
    assert batches and all(b.seconds > 0 for b in batches)


def test_cpu_batch_timer_reads_the_wall_clock():
    timer = BatchTimer(torch.device("cpu"))
    torch.randn(64, 64) @ torch.randn(64, 64)
    assert timer.stop().seconds > 0
