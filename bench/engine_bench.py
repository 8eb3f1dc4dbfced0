"""`ediffi bench engine`: a reproducible synthetic load through each batching
policy, in one process, on one backend.

Load: shapes-world captions (`ediffi.world.shapes.sample_scene`), mixed step
counts, samplers and guidance scales, some requests with paint-with-words
(a colour map plus a region on the caption's "colour shape" phrase) and some
with a style image (a rendered scene). Everything is drawn from one seeded
generator, so every policy sees the same requests in the same order.

Two arrival processes:
- closed loop (default): N clients, each submits its next request when its
  previous one finished, until M requests are done;
- open loop: Poisson arrivals at a given rate (requests/s).

Reported per policy: throughput (images/s), latency p50/p95/p99 (submit to
done), mean batch size (rows per denoiser call, overall and per expert), and
efficiency = throughput / compute limit. The compute limit comes from the
cost model (`engines.cost_model`, the one the scheduler batches by): every
expert timed at every batch bucket, median call per bucket, and each row of
this load costed at its expert's cheapest batch per row. It is measured just
before and just after each policy's run and pooled, so a shared machine's
drift weighs on both sides alike. `pair_limit` is the same bound with one
request (2 CFG rows) per call: the most `none` can reach.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ediffi.pipeline import GenerationRequest
from ediffi.spec import ANY_MODEL_SAMPLERS, BENCH_SAMPLERS
from engines.backend import Backend
from engines.cost_model import CostModel
from engines.engine import Engine, EngineConfig, EngineHooks
from engines.executor import BatchTiming
from engines.scheduler import POLICIES, auto_row_budget

REGION_COLOR = "#ff00ff"


@dataclass
class LoadConfig:
    clients: int = 16
    requests: int = 32
    # Poisson arrival rate (requests/s); None: closed loop with `clients`.
    rate: float | None = None
    min_steps: int = 8
    max_steps: int = 16
    samplers: tuple[str, ...] = BENCH_SAMPLERS
    guidance: tuple[float, ...] = (2.0, 3.0, 5.0)
    p_paint: float = 0.25
    p_style: float = 0.25
    seed: int = 0

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"closed {self.clients} clients"
        return f"poisson {self.rate:g}/s"


def _paint(scene, size: int, rng: np.random.Generator):
    """A colour map with one region painted on a random cell, for the
    caption's first "colour shape" phrase."""
    from ediffi.paint import Region
    from ediffi.world.shapes import cell_bounds

    phrase = scene.objects[0].phrase
    if not re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", scene.caption, flags=re.IGNORECASE):
        return None, []
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = cell_bounds(int(rng.integers(9)), size)
    canvas[y0:y1, x0:x1] = (255, 0, 255)
    return Image.fromarray(canvas), [Region(REGION_COLOR, phrase, float(rng.choice([0.3, 0.4, 0.6])))]


def synthetic_requests(load: LoadConfig, image_size: int = 64, style: bool = True) -> list[GenerationRequest]:
    """The load's requests, a pure function of `load` (its seed); without
    `style` (a model with no image encoder, e.g. an imported one) the
    style-image draws are kept but not attached."""
    from ediffi.world.shapes import render, sample_scene

    rng = np.random.default_rng(load.seed)
    requests = []
    for i in range(load.requests):
        scene = sample_scene(rng)
        kwargs = dict(
            prompt=scene.caption,
            steps=int(rng.integers(load.min_steps, load.max_steps + 1)),
            sampler=str(rng.choice(list(load.samplers))),
            guidance_scale=float(rng.choice(list(load.guidance))),
            seed=int(rng.integers(2**31)),
        )
        if rng.random() < load.p_paint:
            color_map, regions = _paint(scene, image_size, rng)
            if regions:
                kwargs.update(color_map=color_map, regions=regions)
        if rng.random() < load.p_style:
            style_image = Image.fromarray(render(sample_scene(rng), size=image_size))
            if style:
                kwargs["style_image"] = style_image
        requests.append(GenerationRequest(**kwargs))
    return requests


@dataclass
class BatchStats:
    calls: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, batch: BatchTiming) -> None:
        name = f"{batch.stage}/{batch.expert}"
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.rows[name] = self.rows.get(name, 0) + batch.rows
            self.seconds[name] = self.seconds.get(name, 0.0) + batch.seconds

    @property
    def mean_batch(self) -> float:
        calls = sum(self.calls.values())
        return sum(self.rows.values()) / calls if calls else 0.0

    def per_expert(self) -> dict[str, float]:
        return {k: round(self.rows[k] / self.calls[k], 2) for k in sorted(self.calls)}


@dataclass
class PolicyResult:
    policy: str
    backend: str
    load: str
    requests: int
    images: int
    failed: int
    wall_s: float
    throughput_images_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    mean_batch_size: float
    mean_batch_size_per_expert: dict[str, float]
    row_budget: int | None
    # Images/s if every row of this load ran at its expert's cheapest batch
    # per row and nothing else ran, from the cost model measured just before
    # and after the run (`Calibration`): the bound `efficiency` divides by.
    compute_limit_images_per_s: float
    efficiency: float
    # The same limit with every call at one request's rows (a CFG pair, 2
    # rows): the most `none` can reach. compute_limit / pair_limit is the
    # most any policy can beat `none` by on this machine.
    pair_limit_images_per_s: float
    # That cost model (wall clock), per expert: fixed + per-row seconds,
    # the median call at each bucket, the cheapest batch per row.
    cost_model: dict
    # Contention-normalised figures for a shared CPU (exact with one torch
    # thread): process CPU seconds of the run, their share of the wall time,
    # images per CPU second, efficiency in CPU time, and the p95 latency
    # scaled by the CPU share (the latency on a core of its own, assuming
    # the slowdown was uniform over the run).
    cpu_s: float
    cpu_share: float
    throughput_images_per_cpu_s: float
    efficiency_cpu: float
    latency_p95_normalized_s: float
    forward_s: float
    # Share of the wall time spent inside denoiser calls (the rest: encoding,
    # sampler math, batching copies, scheduling, idle).
    forward_share: float
    ticks: int
    # Denoiser rows per image of this load, per expert (what the compute limit weighs).
    rows_per_image: dict[str, float] = field(default_factory=dict)
    # The compute limit from this policy's own calibrations (just before and after its run),
    # before `apply_shared_bound` puts every policy of a run on one pooled bound: how far the
    # machine drifted during this run relative to the others.
    run_compute_limit_images_per_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Calibration:
    """Timed calls of every expert at every batch bucket, in wall and in
    process CPU seconds (insensitive to other processes on a shared
    machine): the bench's cost model, from the same measurement as the
    engine's (`Backend.time_buckets`, `engines.cost_model`)."""

    wall_samples: dict[tuple[str, str], dict[int, list[float]]]
    cpu_samples: dict[tuple[str, str], dict[int, list[float]]]

    def cost_model(self, clock: str = "wall") -> CostModel:
        return CostModel.from_timings(self.wall_samples if clock == "wall" else self.cpu_samples, clock)

    def seconds_per_row(self, clock: str = "wall", rows: int | None = None) -> dict[str, float]:
        """Per expert: seconds per row at its cheapest batch (rows=None), or
        at a given batch."""
        model = self.cost_model(clock)
        return {
            f"{stage}/{expert}": (cost.per_row(rows) if rows else cost.per_row(cost.best_rows(cost.rows[-1])))
            for (stage, expert), cost in model.experts.items()
        }

    @property
    def wall(self) -> dict[str, float]:
        return self.seconds_per_row("wall")

    @property
    def cpu(self) -> dict[str, float]:
        return self.seconds_per_row("cpu")

    @staticmethod
    def mean(a: Calibration, b: Calibration) -> Calibration:
        """Both measurements pooled (the cost model takes the median)."""
        def pool(x, y):
            return {k: {r: list(x[k][r]) + list(y.get(k, {}).get(r, [])) for r in x[k]} for k in x}

        return Calibration(pool(a.wall_samples, b.wall_samples), pool(a.cpu_samples, b.cpu_samples))


def measure_seconds_per_row(backend: Backend, repeats: int = 2) -> Calibration:
    """Time `repeats` calls (after a warm one) of every expert at every
    batch bucket; the compute limit takes each expert's cheapest batch per
    row (on a CPU the largest batch is not always the cheapest)."""
    return Calibration(*backend.time_buckets(repeats))


def compute_limit(seconds_per_row: dict[str, float], rows_per_image: dict[str, float]) -> float:
    """Images/s if every denoiser row ran at max-batch speed, nothing else.
    Batches of other calls (an imported model's batched VAE decode) are not
    denoiser rows and are left out of the limit."""
    seconds = sum(rows * seconds_per_row[k] for k, rows in rows_per_image.items() if k in seconds_per_row)
    return 1.0 / seconds if seconds > 0 else float("inf")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_policy(
    backend: Backend,
    policy: str,
    requests: list[GenerationRequest],
    load: LoadConfig,
    max_active_requests: int = 32,
    calibration_repeats: int = 2,
    timeout_s: float = 3600,
    max_rows_per_tick: int | str | None = "auto",
    calibrations: list[Calibration] | None = None,
) -> PolicyResult:
    """Serve `requests` under `policy` with the load's arrival process.
    `max_rows_per_tick` is the step policy's tick budget (int, None, "auto")."""
    stats = BatchStats()
    engine = Engine(
        backend,
        EngineConfig(policy=policy, max_active_requests=max_active_requests, max_rows_per_tick=max_rows_per_tick),
        hooks=EngineHooks(on_batch=stats.add),
    )
    lock = threading.Lock()
    all_done = threading.Event()
    latencies: list[float] = []
    counts = {"images": 0, "failed": 0, "finished": 0, "next": 0}
    last_finish = [0.0]
    last_cpu = [0.0]

    def submit(i: int) -> None:
        t0 = time.perf_counter()

        def on_done(outcome) -> None:
            now = time.perf_counter()
            with lock:
                latencies.append(now - t0)
                counts["finished"] += 1
                counts["images"] += len(outcome.images)
                counts["failed"] += 0 if outcome.ok else 1
                last_finish[0] = now
                last_cpu[0] = time.process_time()
                finished = counts["finished"] == len(requests)
            if finished:
                all_done.set()
            elif load.rate is None:
                submit_next()

        engine.submit(requests[i], on_done=on_done, request_id=f"{policy}-{i}")

    def submit_next() -> None:
        with lock:
            i = counts["next"]
            if i >= len(requests):
                return
            counts["next"] += 1
        submit(i)

    before = measure_seconds_per_row(backend, calibration_repeats)
    engine.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    if load.rate is None:
        for _ in range(min(load.clients, len(requests))):
            submit_next()
    else:
        gaps = np.random.default_rng(load.seed + 1).exponential(1.0 / load.rate, len(requests))
        arrivals = np.cumsum(gaps) - gaps[0]

        def feeder() -> None:
            for i, at in enumerate(arrivals):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                submit(i)

        threading.Thread(target=feeder, name="bench-feeder", daemon=True).start()
    if not all_done.wait(timeout_s):
        engine.stop()
        raise TimeoutError(f"policy {policy}: the load did not finish in {timeout_s} s")
    engine.stop()
    wall = last_finish[0] - start
    images = counts["images"]
    throughput = images / wall if wall > 0 else 0.0
    rows_per_image = {k: v / max(images, 1) for k, v in stats.rows.items()}
    # The compute limit is measured just before and just after the run and
    # averaged, so a shared machine's drift weighs on both sides alike.
    calibration = Calibration.mean(before, measure_seconds_per_row(backend, calibration_repeats))
    if calibrations is not None:
        calibrations.append(calibration)
    limit = compute_limit(calibration.wall, rows_per_image)
    pair_limit = compute_limit(calibration.seconds_per_row("wall", rows=2), rows_per_image)
    cpu_limit = compute_limit(calibration.cpu, rows_per_image)
    cpu_s = last_cpu[0] - cpu_start
    cpu_share = cpu_s / wall if wall > 0 else 0.0
    per_cpu_s = images / cpu_s if cpu_s > 0 else 0.0
    p95 = percentile(latencies, 95)
    return PolicyResult(
        policy=policy, backend=backend.describe(), load=load.label, requests=len(requests), images=images,
        failed=counts["failed"], wall_s=round(wall, 3), throughput_images_per_s=round(throughput, 4),
        latency_p50_s=round(percentile(latencies, 50), 3), latency_p95_s=round(percentile(latencies, 95), 3),
        latency_p99_s=round(percentile(latencies, 99), 3), mean_batch_size=round(stats.mean_batch, 2),
        mean_batch_size_per_expert=stats.per_expert(), row_budget=engine.scheduler.config.max_rows_per_tick,
        compute_limit_images_per_s=round(limit, 4),
        efficiency=round(throughput / limit, 4) if limit > 0 else 0.0,
        pair_limit_images_per_s=round(pair_limit, 4), cost_model=calibration.cost_model("wall").to_json(),
        cpu_s=round(cpu_s, 3), cpu_share=round(cpu_share, 4), throughput_images_per_cpu_s=round(per_cpu_s, 4),
        efficiency_cpu=round(per_cpu_s / cpu_limit, 4) if cpu_limit > 0 else 0.0,
        latency_p95_normalized_s=round(p95 * min(1.0, cpu_share), 3),
        rows_per_image={k: round(v, 4) for k, v in rows_per_image.items()},
        forward_s=round(sum(stats.seconds.values()), 3),
        forward_share=round(sum(stats.seconds.values()) / wall, 4) if wall > 0 else 0.0, ticks=engine.ticks,
        run_compute_limit_images_per_s=round(limit, 4),
    )


def run_bench(
    backend: Backend,
    policies: list[str],
    load: LoadConfig,
    max_active_requests: int = 32,
    log=None,
    max_rows_per_tick: int | str | None = "auto",
) -> list[PolicyResult]:
    """Run each policy on the same requests. A policy may carry its own step
    budget as "step:N", "step:none" or "step:auto" (else `max_rows_per_tick`)."""
    specs = [parse_policy(p, max_rows_per_tick) for p in policies]
    image_size = backend.model.config.image_size
    requests = synthetic_requests(load, image_size, style=backend.model.encoders.has_image_encoder)
    results = []
    calibrations: list[Calibration] = []
    for label, (policy, budget) in zip(policies, specs):
        if log:
            log(f"running policy {label} ({load.label}, {len(requests)} requests)...")
        result = run_policy(backend, policy, requests, load, max_active_requests, max_rows_per_tick=budget,
                            calibrations=calibrations)
        result.policy = label
        results.append(result)
        if log:
            r = results[-1]
            log(f"  {r.throughput_images_per_s:.3f} images/s in {r.wall_s:.1f} s")
    apply_shared_bound(results, calibrations)
    return results


def apply_shared_bound(results: list[PolicyResult], calibrations: list[Calibration]) -> None:
    """Every policy of a run is measured against one bound: the cost model
    of all the calibrations taken around all the runs, pooled. Each run's
    own before/after calibration drifts with a shared machine's load (on
    the 2-core VM limits of 0.82 to 1.25 images/s in one run, efficiencies
    above 1), and policies compared in one run must share the denominator."""
    if not calibrations:
        return
    pooled = calibrations[0]
    for more in calibrations[1:]:
        pooled = Calibration.mean(pooled, more)
    for r in results:
        limit = compute_limit(pooled.wall, r.rows_per_image)
        cpu_limit = compute_limit(pooled.cpu, r.rows_per_image)
        r.compute_limit_images_per_s = round(limit, 4)
        r.efficiency = round(r.throughput_images_per_s / limit, 4) if limit > 0 else 0.0
        r.pair_limit_images_per_s = round(compute_limit(pooled.seconds_per_row("wall", rows=2), r.rows_per_image), 4)
        r.efficiency_cpu = round(r.throughput_images_per_cpu_s / cpu_limit, 4) if cpu_limit > 0 else 0.0
        r.cost_model = pooled.cost_model("wall").to_json()


def parse_samplers(text: str | None) -> tuple[str, ...]:
    """"heun,euler" -> ("heun", "euler"); None or empty: the default mix (BENCH_SAMPLERS)."""
    if not text:
        return BENCH_SAMPLERS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ANY_MODEL_SAMPLERS]
    if unknown or not names:
        raise ValueError(f"unknown sampler(s) {', '.join(unknown) or text!r}; choose from {', '.join(ANY_MODEL_SAMPLERS)}")
    return names


def parse_budget(text: str | int | None) -> int | str | None:
    if text is None or isinstance(text, int):
        return text
    text = text.strip().lower()
    if text in ("none", "all", "unlimited"):
        return None
    if text == "auto":
        return "auto"
    return int(text)


def parse_policy(spec: str, default_budget: int | str | None = "auto") -> tuple[str, int | str | None]:
    """"step", "step:16", "step:none", "request", "none" -> (policy, step budget)."""
    name, _, budget = spec.partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return name, parse_budget(budget) if budget else default_budget


def format_table(results: list[PolicyResult]) -> str:
    header = [
        "policy", "budget", "backend", "load", "images/s", "p50 s", "p95 s", "p99 s", "mean batch",
        "batch per expert", "efficiency", "cpu share", "images/cpu-s", "p95 norm s", "eff. (cpu)",
    ]
    rows = [
        [
            r.policy, "-" if r.row_budget is None else r.row_budget, r.backend, r.load,
            f"{r.throughput_images_per_s:.3f}", f"{r.latency_p50_s:.2f}", f"{r.latency_p95_s:.2f}",
            f"{r.latency_p99_s:.2f}", f"{r.mean_batch_size:.2f}",
            " ".join(f"{k}={v:g}" for k, v in r.mean_batch_size_per_expert.items()),
            f"{100 * r.efficiency:.1f}%", f"{r.cpu_share:.2f}", f"{r.throughput_images_per_cpu_s:.3f}",
            f"{r.latency_p95_normalized_s:.2f}", f"{100 * r.efficiency_cpu:.1f}%",
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    by = {r.policy: r for r in results}
    ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "n/a"  # noqa: E731
    for r in results:
        if not r.policy.startswith("step"):
            continue
        if "none" in by:
            n = by["none"]
            out.append(
                f"{r.policy}/none throughput: {ratio(r.throughput_images_per_s, n.throughput_images_per_s)}x wall, "
                f"{ratio(r.throughput_images_per_cpu_s, n.throughput_images_per_cpu_s)}x per CPU second"
            )
        if "request" in by:
            q = by["request"]
            out.append(
                f"{r.policy}/request throughput: {ratio(r.throughput_images_per_s, q.throughput_images_per_s)}x wall, "
                f"{ratio(r.throughput_images_per_cpu_s, q.throughput_images_per_cpu_s)}x per CPU second; "
                f"p95 / request p95: {ratio(r.latency_p95_s, q.latency_p95_s)} wall, "
                f"{ratio(r.latency_p95_normalized_s, q.latency_p95_normalized_s)} normalized"
            )
        out.append(
            f"{r.policy} bound (cost model): compute limit {r.compute_limit_images_per_s:.3f} images/s at the "
            f"cheapest batches, {r.pair_limit_images_per_s:.3f} with one request per call; no policy beats `none` "
            f"by more than {ratio(r.compute_limit_images_per_s, r.pair_limit_images_per_s)}x here"
        )
    return "\n".join(out)


def profile_table(backend: Backend) -> str:
    """The cost model the engine schedules by (measured at warm-up): per
    expert the fitted fixed + per-row cost and each batch bucket's median
    call, and the batch where a row is cheapest."""
    model = backend.cost_model()
    budget = auto_row_budget(model, backend.max_batch)
    return "\n".join([
        f"cost model of {backend.describe()} (warm-up, wall clock, torch threads {torch.get_num_threads()}):",
        model.table(),
        f"auto row budget: {'none (no cap below the max batch)' if budget is None else budget}",
    ])


# ---------------------------------------------------------------- bench model


def bench_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight model directory with the shipped default's
    architecture (ediffi/train.py TrainConfig: base 32 px, 3 experts, 48
    channels; SR 64 px, 2 experts, 24 channels; 64-wide encoders, 24
    tokens), for benchmarking before (or without) the trained weights."""
    from ediffi.config import EncodersConfig, ModelConfig, StageConfig, TextEncoderConfig, UNetConfig, VisionEncoderConfig
    from ediffi.edm import EDMDenoiser
    from ediffi.encoders import TinyEncoderSpec, build_tiny_encoders
    from ediffi.model import DEFAULT_WORDS, experts_for, save_expert
    from ediffi.world.shapes import sample_scene

    out_dir = Path(out_dir)
    if (out_dir / "model.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    enc_spec = TinyEncoderSpec(width=64, layers=2, heads=4, projection_dim=64, image_size=32, patch_size=8)
    enc_cfg = EncodersConfig(
        t5=TextEncoderConfig(path="encoders/t5", max_length=24),
        clip_text=TextEncoderConfig(path="encoders/clip_text", max_length=24),
        clip_vision=VisionEncoderConfig(path="encoders/clip_vision"),
    )
    rng = np.random.default_rng(1234)
    words = set(DEFAULT_WORDS)
    for _ in range(2000):
        words.update(re.findall(r"\w+|[^\w\s]", sample_scene(rng, exclude_heldout=False).caption.lower()))
    build_tiny_encoders(out_dir, sorted(words), enc_cfg, enc_spec, seed=seed)
    dims = dict(context_dim=2 * enc_spec.width, pooled_dim=2 * enc_spec.projection_dim)
    base_net = UNetConfig(model_channels=48, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[16, 8],
                          num_heads=4, embedding_dim=192, groups=8, **dims)
    sr_net = UNetConfig(model_channels=24, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[16],
                        num_heads=4, embedding_dim=128, groups=8, low_res_channels=3, **dims)
    config = ModelConfig(
        name="bench-random", encoders=enc_cfg,
        stages=[
            StageConfig(name="base", image_size=32, experts=experts_for((2.5, 0.4), 3, "base", base_net, "stages/base")),
            StageConfig(name="sr", image_size=64, low_res_aug_sigma=0.05,
                        experts=experts_for((1.0,), 2, "sr", sr_net, "stages/sr")),
        ],
    )
    generator_seed = seed
    for stage in config.stages:
        for expert in stage.experts:
            generator_seed += 1
            torch.manual_seed(generator_seed)
            net = EDMDenoiser(expert.network, stage.image_size, config.sigma_data)
            torch.nn.init.normal_(net.net.out_conv.weight, std=0.05)
            save_expert(net, out_dir / expert.weights)
    config.save(out_dir)
    return out_dir


def bench_target_model_dir(args, settings, log=print) -> Path:
    """What `ediffi bench engine|http` measures: --model-dir, else
    EDIFFI_MODEL_DIR, else the shipped model; where the shipped model is
    missing, a random model of its architecture in the scratch folder."""
    from ediffi.config import DEFAULT_MODEL_DIR, resolve_model_dir

    model_dir = resolve_model_dir(args.model_dir, getattr(settings, "model_dir", None) if settings is not None else None)
    if model_dir == DEFAULT_MODEL_DIR and not (model_dir / "model.json").is_file():
        model_dir = bench_model_dir(Path(args.scratch_dir) / f"bench-model-{args.seed}", seed=args.seed)
        log(f"models/default is missing: benchmarking a random model with its architecture at {model_dir}")
    return model_dir


def main(args, settings=None, log=print) -> int:
    """Entry point of `ediffi bench engine` (args from cli/main.py)."""
    from engines.engine import make_backend

    torch.set_num_threads(args.threads)
    model_dir = bench_target_model_dir(args, settings, log)
    device = args.device or (getattr(settings, "device", None) if settings is not None else None) or "cpu"
    compile_mode = getattr(args, "compile", "none")
    backend = make_backend(args.backend, model_dir, device=device, dtype=args.dtype, max_batch=args.max_batch,
                           compile_mode=None if compile_mode == "none" else compile_mode)
    backend.warmup()
    if getattr(args, "profile", False):
        log(profile_table(backend))
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else log
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
    results = []
    for rate in rates:
        load = LoadConfig(
            clients=args.clients, requests=args.requests, rate=rate, min_steps=args.min_steps,
            max_steps=args.max_steps, seed=args.seed, samplers=parse_samplers(getattr(args, "samplers", None)),
        )
        results += run_bench(
            backend, policies, load, args.max_active, log=progress, max_rows_per_tick=parse_budget(args.max_rows_per_tick)
        )
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        log(f"model {model_dir}, torch threads {torch.get_num_threads()}, max batch {args.max_batch}")
        log(format_table(results))
    return 0 if all(r.failed == 0 for r in results) else 1
