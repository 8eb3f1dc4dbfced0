"""The engine on the tiny random cascade (base 16 px, 2 experts split at
sigma 1; SR 32 px), CPU, float32. The reference-pipeline and batch-invariance
tests also run on a cascade with the shipped model's shape of options
(SHIPPED_SHAPE_SPEC: 3 base experts, 2 SR experts, 3 levels, two attention
resolutions, 4 heads, 24 tokens).

Tolerance for "the same image": max |diff| <= 2/255 per channel (2 levels of
the 8-bit output). Batched and unbatched float32 kernels may round
differently; anything larger means rows leaked into each other.
"""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.model import build_random_model_dir, load_model
from ediffi.paint import Region
from ediffi.pipeline import GenerationRequest, generate
from engines import (
    Engine,
    EngineConfig,
    EngineHooks,
    QueueFull,
    TextEmbeddingCache,
    TorchBackend,
)
from engines.backend import slice_rows

TOLERANCE = 2  # 8-bit levels, i.e. 2/255


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture(scope="module")
def engine_model_dir(tmp_path_factory):
    return build_random_model_dir(tmp_path_factory.mktemp("engine-model"), seed=0)


@pytest.fixture(scope="module")
def model(engine_model_dir):
    return load_model(engine_model_dir)


@pytest.fixture(scope="module")
def backend(model):
    return TorchBackend(model, max_batch=8)


@pytest.fixture(scope="module", params=["tiny", "shipped_shape"])
def cascade(request, model, backend):
    """(model, backend) of each test cascade: the tiny one above and one with
    the shipped model's shape of options (3 base experts, 2 SR experts split at
    sigma 1, 3 levels, attention at two resolutions, 4 heads, 24 tokens)."""
    if request.param == "tiny":
        return model, backend
    shipped_shape = request.getfixturevalue("shipped_shape_model")
    return shipped_shape, TorchBackend(shipped_shape, max_batch=8)


def make_engine(backend, **config) -> Engine:
    return Engine(backend, EngineConfig(**config))


def color_map(cell: int) -> Image.Image:
    """16x16 grey canvas with a red and a blue block in two grid cells."""
    canvas = np.full((16, 16, 3), 128, dtype=np.uint8)
    r, c = divmod(cell % 4, 2)
    canvas[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] = (255, 0, 0)
    canvas[(1 - r) * 8 : (1 - r) * 8 + 8, (1 - c) * 8 : (1 - c) * 8 + 4] = (0, 0, 255)
    return Image.fromarray(canvas)


def style_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))


PROMPTS = [
    "a red circle on the left and a blue square",
    "a green triangle in the top right corner",
    "two yellow squares at the bottom",
    "a purple circle in the center",
    "an orange triangle and a blue circle",
    "a cat in a house at night",
    "a dog under a tree",
    "blue sky painting",
]
SAMPLER_CYCLE = ["heun", "euler", "dpmpp_2m"]


def target_request() -> GenerationRequest:
    """Paint-with-words, a style image, Heun and CFG: every per-row input."""
    return GenerationRequest(
        PROMPTS[0], steps=4, sampler="heun", seed=7, guidance_scale=3.0,
        color_map=color_map(0), regions=[Region("#ff0000", "red circle", 0.6), Region("#0000ff", "blue square")],
        style_image=style_image(0),
    )


def other_requests(count: int = 15) -> list[GenerationRequest]:
    """Different prompts, steps, samplers, guidance, n, masks, styles, encoder subsets."""
    out = []
    for i in range(count):
        kwargs = dict(
            prompt=PROMPTS[(i + 1) % len(PROMPTS)], steps=2 + i % 5, sampler=SAMPLER_CYCLE[i % 3], seed=100 + i,
            guidance_scale=[3.0, 1.0, 5.5, 2.0][i % 4],
        )
        if i % 3 == 0:
            kwargs["prompt"] = PROMPTS[0]
            kwargs.update(color_map=color_map(i), regions=[Region("#ff0000", "circle", 0.2 + 0.1 * (i % 4))])
        if i % 4 == 1:
            kwargs["style_image"] = style_image(i)
        if i % 5 == 2:
            kwargs["negative_prompt"] = "a dog"
        if i % 7 == 3:
            kwargs["n"] = 2
        if i % 6 == 4:
            kwargs["encoders"] = frozenset({"t5", "clip_image"})
        out.append(GenerationRequest(**kwargs))
    return out


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im).astype(np.int16) for im in images]


def max_diff(a, b) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(arrays(a), arrays(b)))


def serve(backend, requests, **config):
    engine = make_engine(backend, **config)
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    outcomes = [h.result(0) for h in handles]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    return outcomes, engine


@pytest.fixture(scope="module")
def mixed(cascade):
    """The target served among 15 others, step policy (shared by tests), on
    each cascade."""
    _, backend = cascade
    requests = [*other_requests()[:7], target_request(), *other_requests()[7:]]
    outcomes, engine = serve(backend, requests)
    return requests, outcomes, engine


# --------------------------------------------------------------------------
# Correctness: reference pipeline, batch invariance, policies
# --------------------------------------------------------------------------


def test_engine_image_equals_reference_pipeline(cascade):
    model, backend = cascade
    request = target_request()
    (outcome,), _ = serve(backend, [request])
    assert outcome.evaluations_done == outcome.evaluations_total > 0
    assert max_diff(outcome.images, generate(model, target_request())) <= TOLERANCE


def test_batch_invariance_served_alone_vs_among_15_others(cascade, mixed):
    _, backend = cascade
    requests, outcomes, engine = mixed
    (alone,), _ = serve(backend, [target_request()])
    index = [r.seed for r in requests].index(7)
    assert max_diff(alone.images, outcomes[index].images) <= TOLERANCE
    # The batches really were shared: several requests per call, several experts.
    assert engine.scheduler.stats.rows / engine.scheduler.stats.batches > 4


def test_every_request_of_the_mix_equals_its_reference(cascade, mixed):
    model, _ = cascade
    requests, outcomes, _ = mixed
    for request, outcome in zip(requests, outcomes):
        assert len(outcome.images) == request.n
        assert max_diff(outcome.images, generate(model, request)) <= TOLERANCE, request


@pytest.mark.parametrize("policy", ["request", "none"])
def test_all_policies_give_the_same_images(cascade, mixed, policy):
    _, backend = cascade
    requests, step_outcomes, _ = mixed
    outcomes, engine = serve(backend, requests, policy=policy)
    for a, b in zip(outcomes, step_outcomes):
        assert max_diff(a.images, b.images) <= TOLERANCE
    if policy == "none":
        assert engine.scheduler.stats.max_wait_ticks == 0


def test_backend_chunks_beyond_max_batch(model):
    small = TorchBackend(model, max_batch=3)
    inputs = small.dummy_inputs("base", 7, sigma=2.0)
    whole = small.run("base", "base0", inputs)
    parts = torch.cat([small.run("base", "base0", slice_rows(inputs, i, i + 1)) for i in range(7)])
    assert whole.shape == (7, 3, 16, 16)
    assert torch.allclose(whole, parts, atol=1e-5)
    small.warmup()  # every expert at every bucket
    assert small.buckets("sr", "sr0") == [1, 2, 3]


def test_half_precision_on_cpu_refused(model):
    with pytest.raises(ValueError, match="CUDA"):
        TorchBackend(model, dtype="float16")


# --------------------------------------------------------------------------
# Progress, cancellation, expiry, failures
# --------------------------------------------------------------------------


def test_progress_is_monotone_and_ends_at_total(backend):
    engine = make_engine(backend)
    seen: dict[str, list[tuple[int, int]]] = {}
    handles = []
    for i, request in enumerate(other_requests(4)):
        log = seen.setdefault(str(i), [])
        handles.append(engine.submit(request, on_progress=lambda d, t, log=log: log.append((d, t)), request_id=str(i)))
    engine.run_until_idle()
    for i, handle in enumerate(handles):
        log = seen[str(i)]
        done = [d for d, _ in log]
        total = {t for _, t in log}
        assert len(total) == 1
        assert done == list(range(len(done))) and done[0] == 0, "monotone, one evaluation at a time"
        assert done[-1] == total.pop() == handle.result(0).evaluations_total
        assert handle.progress == log[-1]


def test_cancelled_request_stops_consuming_compute(backend):
    engine = make_engine(backend)
    evals: dict[str, int] = {"long": 0, "other": 0}

    def counter(name):
        def on_progress(done, total):
            evals[name] = done
        return on_progress

    long = engine.submit(GenerationRequest(PROMPTS[1], steps=12), on_progress=counter("long"), request_id="long")
    other = engine.submit(GenerationRequest(PROMPTS[2], steps=3), on_progress=counter("other"), request_id="other")
    for _ in range(3):
        engine.tick()
    assert evals["long"] == 3
    assert long.cancel()
    plan = engine.tick()  # the cancel takes effect before this tick's compute
    assert "long" not in plan.request_ids
    assert evals["long"] == 3
    assert "long" not in engine.scheduler.active_ids
    engine.run_until_idle()
    assert evals["long"] == 3
    outcome = long.result(0)
    assert outcome.status == "canceled" and not outcome.images and outcome.evaluations_done == 3
    assert other.result(0).ok
    assert not engine.cancel("long")  # finished ids are unknown


def test_cancelled_while_queued_never_runs_and_frees_admission(backend):
    engine = make_engine(backend, max_active_requests=1)
    first = engine.submit(GenerationRequest(PROMPTS[1], steps=3))
    queued = engine.submit(GenerationRequest(PROMPTS[2], steps=3))
    engine.cancel(queued.id)
    engine.run_until_idle()
    assert first.result(0).ok
    outcome = queued.result(0)
    assert outcome.status == "canceled" and outcome.evaluations_done == 0 and outcome.started_at is None


def test_expired_request_is_dropped_before_compute(backend):
    now = [100.0]
    engine = Engine(backend, EngineConfig(max_active_requests=1), clock=lambda: now[0])
    running = engine.submit(GenerationRequest(PROMPTS[1], steps=3))
    late = engine.submit(GenerationRequest(PROMPTS[2], steps=3), timeout_s=5.0)
    engine.tick()
    now[0] += 10.0
    engine.run_until_idle()
    assert running.result(0).ok
    assert late.result(0).status == "expired" and late.result(0).evaluations_done == 0


def test_bad_request_fails_alone(backend):
    engine = make_engine(backend)
    bad = engine.submit(
        GenerationRequest(PROMPTS[1], steps=2, color_map=color_map(0), regions=[Region("#ff0000", "elephant")])
    )
    good = engine.submit(GenerationRequest(PROMPTS[2], steps=2))
    engine.run_until_idle()
    assert bad.result(0).status == "failed" and "elephant" in bad.result(0).error
    assert good.result(0).ok
    with pytest.raises(ValueError):
        engine.submit(GenerationRequest(PROMPTS[1], sampler="lms"))  # unknown
    with pytest.raises(ValueError):  # known, but not for this model (imported checkpoints' timesteps)
        engine.submit(GenerationRequest(PROMPTS[1], sampler="ddim", use_karras_sigmas=False))


def test_queue_limit(backend):
    engine = make_engine(backend, max_waiting=2)
    engine.submit(GenerationRequest(PROMPTS[1], steps=1))
    engine.submit(GenerationRequest(PROMPTS[1], steps=1))
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest(PROMPTS[1], steps=1))
    engine.run_until_idle()


# --------------------------------------------------------------------------
# Outputs, hooks, threads, settings
# --------------------------------------------------------------------------


def test_png_bytes_and_timings(backend):
    (outcome,), _ = serve(backend, [GenerationRequest(PROMPTS[3], steps=2, n=2, seed=5)])
    pngs = outcome.png_bytes()
    assert len(pngs) == 2 and outcome.seeds == [5, 6]
    for png, image in zip(pngs, outcome.images):
        decoded = Image.open(io.BytesIO(png))
        assert decoded.size == (32, 32)
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))
    assert outcome.queued_at <= outcome.started_at <= outcome.finished_at


def test_metric_hooks(backend):
    batches, admits, finishes, ticks = [], [], [], []
    hooks = EngineHooks(
        on_batch=batches.append, on_admit=lambda rid, wait: admits.append((rid, wait)),
        on_finish=finishes.append, on_tick=ticks.append,
    )
    engine = Engine(backend, EngineConfig(), hooks=hooks)
    for request in other_requests(6):
        engine.submit(request)
    engine.run_until_idle()
    assert len(admits) == len(finishes) == 6 and all(w >= 0 for _, w in admits)
    assert {(b.stage, b.expert) for b in batches} == {("base", "base0"), ("base", "base1"), ("sr", "sr0")}
    assert all(0 < b.rows <= 8 and b.seconds > 0 for b in batches)
    assert sum(t.rows for t in ticks) == sum(b.rows for b in batches)


def test_threaded_engine_with_asyncio_and_threads(backend, model):
    requests = other_requests(5)
    with make_engine(backend) as engine:
        progress_threads = set()
        handles = []

        def submit(r):
            handles.append(engine.submit(r, on_progress=lambda d, t: progress_threads.add(threading.current_thread().name)))

        threads = [threading.Thread(target=submit, args=(r,)) for r in requests[:3]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        async def main():
            extra = [engine.submit(r) for r in requests[3:]]
            return await asyncio.gather(*(h.wait() for h in handles + extra))

        outcomes = asyncio.run(main())
    assert all(o.ok for o in outcomes)
    # Callbacks run inside the ticks, on the backend's device thread (engines/device_thread.py).
    assert progress_threads == {backend.device_thread.call(lambda: threading.current_thread().name)}
    by_seed = {o.seeds[0]: o for o in outcomes}
    for request in requests[:2]:
        assert max_diff(by_seed[request.seed].images, generate(model, request)) <= TOLERANCE


def test_stop_without_drain_cancels_the_rest(backend):
    engine = make_engine(backend, max_active_requests=1)
    handles = [engine.submit(GenerationRequest(PROMPTS[1], steps=30)) for _ in range(3)]
    engine.start()
    engine.stop(drain=False, timeout=30)
    statuses = {h.result(5).status for h in handles}
    assert "canceled" in statuses


def test_engine_from_settings(engine_model_dir):
    from server.settings import Settings

    settings = Settings(model_dir=engine_model_dir, max_batch=4, max_active_requests=3, batching_policy="none")
    engine = Engine.from_settings(settings, warmup=False)
    assert engine.scheduler.config.policy == "none" and engine.scheduler.config.max_active_requests == 3
    assert engine.backend.max_batch("base", "base0") == 4
    outcome = engine.generate(GenerationRequest(PROMPTS[1], steps=2))
    assert outcome.ok and len(outcome.png_bytes()) == 1
    with pytest.raises(ValueError, match="backend"):
        Engine.from_settings({"backend": "tpu", "model_dir": engine_model_dir})


def test_text_cache_batches_and_evicts(model):
    cache = TextEmbeddingCache(model.encoders, capacity=3)
    assert cache.prefetch([(p, True, True) for p in PROMPTS[:3]] + [(PROMPTS[0], True, False)]) == 4
    assert len(cache) == 3  # LRU capacity
    single = model.encoders.encode_text([PROMPTS[2]])
    cached = cache([PROMPTS[2]])
    assert torch.allclose(cached.context, single.context, atol=1e-5)
    assert cached.t5_offsets == single.t5_offsets
    assert cache.hits == 1
    both = cache([PROMPTS[2], PROMPTS[3]], True, True)
    assert both.context.shape[0] == 2 and cache.misses == 5
