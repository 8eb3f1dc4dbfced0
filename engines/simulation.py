"""A discrete-event simulation of the engine loop: the real `StepScheduler`
driven by synthetic requests whose denoiser calls cost what a `CostModel`
says. No model, no tensors: it shows what a batching policy does to
throughput and tail latency on a given cost curve in milliseconds of CPU,
and the scheduler tests use it to compare policies.

What is modelled, tick by tick, as `Engine.tick` runs it: admission (the
policy and the admission limit), the plan, each planned batch costing
`cost_model.seconds(stage, expert, rows)`, a fixed cost per tick and per
served request (sampler math, CFG, copies), and a closed loop of clients
that each submit their next request when the last one finished (or Poisson
arrivals). A request's evaluations are those of the real samplers: Karras
sigmas per stage (EDM eq. 5), Heun's correction at the next sigma (except
the last step), routed to the expert owning each sigma.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ediffi.spec import BENCH_SAMPLERS
from engines.cost_model import CostModel
from engines.scheduler import GroupKey, PendingView, SchedulerConfig, StepScheduler


@dataclass(frozen=True)
class SimStage:
    """One cascade stage: its batch shape, sigma schedule and experts as
    (name, sigma_lo), highest noise first (an expert owns sigma >= sigma_lo
    down to the next one's sigma_lo)."""

    name: str
    shape: tuple[int, ...]
    experts: tuple[tuple[str, float], ...]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def route(self, sigma: float) -> str:
        for name, lo in self.experts:
            if sigma >= lo:
                return name
        return self.experts[-1][0]


def cascade_from_config(config) -> tuple[SimStage, ...]:
    """The cascade of a `ModelConfig` (stages, shapes, sigma schedules,
    expert ranges), as the simulation routes it: pixel-space stages on
    Karras sigmas (a latent stage's shape depends on the request's size,
    and a discrete-time schedule is not modelled)."""
    for stage in config.stages:
        if getattr(stage, "latent", None) is not None or getattr(stage, "schedule", None) is not None:
            raise ValueError(f"stage {stage.name!r}: the simulation models pixel-space Karras stages only")
    return tuple(
        SimStage(
            stage.name, (stage.channels, stage.image_size, stage.image_size),
            tuple((e.name, e.sigma_lo) for e in sorted(stage.experts, key=lambda e: -e.sigma_lo)),
            stage.sigma_min, stage.sigma_max, stage.rho,
        )
        for stage in config.stages
    )


# The shipped model's cascade (models/default/model.json): base 32 px with
# three experts split at sigma 2.5 and 0.4, SR 64 px with two split at 1.
SHIPPED_CASCADE = (
    SimStage("base", (3, 32, 32), (("base0", 2.5), ("base1", 0.4), ("base2", 0.0))),
    SimStage("sr", (3, 64, 64), (("sr0", 1.0), ("sr1", 0.0))),
)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """EDM eq. 5 (as ediffi.samplers.karras_sigmas), then 0."""
    if steps == 1:
        return [sigma_max, 0.0]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def evaluation_sigmas(sampler: str, steps: int, stage: SimStage) -> list[float]:
    """The sigma of every denoiser evaluation of one stage, in order."""
    sigmas = karras_sigmas(steps, stage.sigma_min, stage.sigma_max, stage.rho)
    if sampler != "heun":  # euler, dpmpp_2m, euler_a: one evaluation per step
        return sigmas[:-1]
    out = []
    for i in range(steps):
        out.append(sigmas[i])
        if sigmas[i + 1] > 0:  # the trapezoidal correction, at the next sigma
            out.append(sigmas[i + 1])
    return out


@dataclass(frozen=True)
class SimRequest:
    steps: int
    sampler: str = "euler"
    rows: int = 2  # CFG: a conditional and an unconditional row

    def keys(self, cascade: Sequence[SimStage]) -> list[GroupKey]:
        return [
            GroupKey(stage.name, stage.route(sigma), stage.shape)
            for stage in cascade
            for sigma in evaluation_sigmas(self.sampler, self.steps, stage)
        ]


def request_mix(count: int, min_steps: int = 8, max_steps: int = 16,
                samplers: Sequence[str] = BENCH_SAMPLERS, seed: int = 0) -> list[SimRequest]:
    """Uniform step counts and samplers, as `ediffi bench engine` draws them."""
    rng = random.Random(seed)
    return [SimRequest(rng.randint(min_steps, max_steps), rng.choice(list(samplers))) for _ in range(count)]


def affine_cost_model(cascade: Sequence[SimStage], fixed_s: dict[str, float], per_row_s: dict[str, float],
                      buckets: Sequence[int] = (1, 2, 4, 8, 16)) -> CostModel:
    """Every expert of a stage at fixed + per_row * rows (per stage name)."""
    from engines.cost_model import ExpertCost

    return CostModel({
        (stage.name, name): ExpertCost.affine(fixed_s[stage.name], per_row_s[stage.name], buckets)
        for stage in cascade for name, _ in stage.experts
    })


def _measured(ms_per_call: dict[str, dict[int, float]]) -> CostModel:
    return CostModel.from_timings({
        tuple(name.split("/")): {rows: [ms / 1000] for rows, ms in calls.items()} for name, calls in ms_per_call.items()
    })


# Example cost curves of the shipped cascade (seconds per call):
# a fixed cost per call that dwarfs a row's (a GPU: 5 ms a call, 0.2 ms a
# base row, 0.4 ms an SR row) ...
FIXED_DOMINANT = affine_cost_model(SHIPPED_CASCADE, {"base": 0.005, "sr": 0.005}, {"base": 0.0002, "sr": 0.0004})
# ... a CPU whose calls pay for thread synchronisation under contention
# (two torch threads on a loaded 2-core machine: a row costs a quarter of a
# call's fixed cost) ...
ROW_HEAVY = affine_cost_model(SHIPPED_CASCADE, {"base": 0.4, "sr": 0.4}, {"base": 0.1, "sr": 0.15})
# ... and the shipped model on one quiet CPU thread (`ediffi bench engine
# --profile --threads 1`, CPU time, before issue 18): a row costs more than
# a call's fixed cost, and SR rows get dearer past 8.
SHIPPED_CPU_ONE_THREAD = _measured({
    "base/base0": {1: 15.45, 2: 24.8, 4: 42.4, 8: 78.1, 16: 164.5},
    "base/base1": {1: 19.2, 2: 33.5, 4: 51.7, 8: 88.9, 16: 160.3},
    "base/base2": {1: 16.8, 2: 26.1, 4: 46.5, 8: 84.5, 16: 156.2},
    "sr/sr0": {1: 16.7, 2: 30.4, 4: 53.2, 8: 106.8, 16: 313.0},
    "sr/sr1": {1: 19.2, 2: 32.0, 4: 59.0, 8: 107.0, 16: 239.0},
})
# ... and on two quiet CPU threads, every call on the device thread (the
# pooled calibration of `ediffi bench engine --clients 32 --requests 64`,
# wall clock, 2026-12-06): a call's fixed cost is one or two rows', and no
# expert gets cheaper per row past 8-16 rows.
SHIPPED_CPU_TWO_THREADS = _measured({
    "base/base0": {1: 23.8, 2: 34.2, 4: 51.0, 8: 81.8, 16: 141.8},
    "base/base1": {1: 22.1, 2: 34.1, 4: 48.7, 8: 83.2, 16: 153.2},
    "base/base2": {1: 21.3, 2: 31.7, 4: 51.9, 8: 81.1, 16: 140.6},
    "sr/sr0": {1: 23.0, 2: 33.1, 4: 54.4, 8: 91.5, 16: 193.0},
    "sr/sr1": {1: 23.2, 2: 31.6, 4: 53.2, 8: 93.1, 16: 193.7},
})
EXAMPLE_COST_MODELS = {
    "fixed-dominant": FIXED_DOMINANT, "row-heavy": ROW_HEAVY, "cpu-1-thread": SHIPPED_CPU_ONE_THREAD,
    "cpu-2-threads": SHIPPED_CPU_TWO_THREADS,
}


@dataclass
class SimResult:
    policy: str
    images: int
    seconds: float
    throughput: float  # images per simulated second
    latency_p50: float
    latency_p95: float
    latency_max: float
    mean_batch: float
    forward_seconds: float
    compute_limit: float  # images/s at every expert's cheapest batch, from the same cost model
    efficiency: float
    ticks: int
    max_wait_ticks: int
    batches: dict[str, list[int]] = field(default_factory=dict, repr=False)  # rows of each call, per expert

    def summary(self) -> str:
        return (
            f"{self.policy:>12}: {self.throughput:.3f} images/s, p50 {self.latency_p50:.2f} s, "
            f"p95 {self.latency_p95:.2f} s, mean batch {self.mean_batch:.2f}, efficiency {self.efficiency:.3f}, "
            f"max wait {self.max_wait_ticks} ticks"
        )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def simulate(
    config: SchedulerConfig,
    cost_model: CostModel,
    requests: Sequence[SimRequest],
    *,
    cascade: Sequence[SimStage] = SHIPPED_CASCADE,
    clients: int | None = 16,
    rate: float | None = None,
    max_batch: int = 16,
    tick_overhead_s: float = 0.0,
    request_overhead_s: float = 0.0,
    scheduler_factory: Callable[[SchedulerConfig, int, CostModel], StepScheduler] | None = None,
    label: str | None = None,
    seed: int = 0,
) -> SimResult:
    """Serve `requests` through a scheduler built from `config` and report
    throughput and latency in simulated seconds. Closed loop with `clients`
    (each sends its next request when its last finished), or Poisson
    arrivals at `rate` requests/s."""
    factory = scheduler_factory or (lambda cfg, mb, cm: StepScheduler(cfg, max_batch=mb, cost_model=cm))
    scheduler = factory(config, max_batch, cost_model)
    scripts: dict[str, list[GroupKey]] = {}
    rows: dict[str, int] = {}
    submitted_at: dict[str, float] = {}
    latencies: list[float] = []
    batches: dict[str, list[int]] = {}
    arrivals: list[tuple[float, int]] = []  # (time, request index), a heap
    next_index = 0
    now = 0.0
    forward = 0.0
    ticks = 0

    def arrive(at: float) -> None:
        nonlocal next_index
        if next_index < len(requests):
            heapq.heappush(arrivals, (at, next_index))
            next_index += 1

    if rate is None:
        for _ in range(min(clients or 1, len(requests))):
            arrive(0.0)
    else:
        rng = random.Random(seed)
        at = 0.0
        for _ in range(len(requests)):
            arrive(at)
            at += rng.expovariate(rate)

    def view(rid: str) -> PendingView | None:
        script = scripts[rid]
        return PendingView(script[0], rows[rid], len(script)) if script else None

    def finish(rid: str, at: float) -> None:
        latencies.append(at - submitted_at[rid])
        if rate is None:
            arrive(at)

    while arrivals or scheduler.has_work():
        while arrivals and arrivals[0][0] <= now:
            at, index = heapq.heappop(arrivals)
            rid = f"r{index}"
            request = requests[index]
            scripts[rid], rows[rid], submitted_at[rid] = request.keys(cascade), request.rows, at
            scheduler.add(rid, at, request.rows)
        if not scheduler.has_work():
            now = arrivals[0][0]  # idle until the next arrival
            continue
        admission = scheduler.admit(now)
        for rid in admission.admitted:
            scheduler.set_pending(rid, view(rid))
        plan = scheduler.schedule()
        spent = tick_overhead_s
        updates: dict[str, PendingView | None] = {}
        for group in plan.groups:
            seconds = cost_model.seconds(group.key.stage, group.key.expert, group.total_rows)
            spent += seconds + request_overhead_s * len(group.request_ids)
            forward += seconds
            batches.setdefault(f"{group.key.stage}/{group.key.expert}", []).append(group.total_rows)
            for rid in group.request_ids:
                scripts[rid].pop(0)
                updates[rid] = view(rid)
        now += spent
        scheduler.complete(plan, updates)
        for rid, pending in updates.items():
            if pending is None:
                finish(rid, now)
        ticks += 1
        if ticks > 10_000_000:  # pragma: no cover - a policy that never finishes
            raise RuntimeError("simulation did not finish")

    images = len(latencies)
    calls = sum(len(b) for b in batches.values())
    rows_per_image: dict[tuple[str, str], float] = {}
    for name, sizes in batches.items():
        stage, expert = name.split("/")
        rows_per_image[(stage, expert)] = sum(sizes) / max(images, 1)
    limit = cost_model.compute_limit(rows_per_image, max_batch)
    throughput = images / now if now > 0 else 0.0
    return SimResult(
        policy=label or config.policy, images=images, seconds=now, throughput=throughput,
        latency_p50=_percentile(latencies, 50), latency_p95=_percentile(latencies, 95),
        latency_max=max(latencies, default=float("nan")),
        mean_batch=sum(sum(b) for b in batches.values()) / calls if calls else 0.0,
        forward_seconds=forward, compute_limit=limit, efficiency=throughput / limit if limit > 0 else 0.0,
        ticks=ticks, max_wait_ticks=scheduler.stats.max_wait_ticks, batches=batches,
    )


def compare(cost_model: CostModel, clients: int, requests: int, max_steps: int, seed: int = 0,
            policies: Sequence[str] = ("step", "request", "none")) -> dict[str, SimResult]:
    """Each policy on the same closed-loop load (steps 8..max_steps, every
    sampler), as `ediffi bench engine` runs them."""
    mix = request_mix(requests, 8, max_steps, seed=seed)
    return {
        p: simulate(SchedulerConfig(policy=p, cohort_rows=16), cost_model, mix, clients=clients,
                    request_overhead_s=0.001, tick_overhead_s=0.0005)
        for p in policies
    }


def main() -> None:  # pragma: no cover - a report, run by hand
    """`python -m engines.simulation`: step against request and none on the
    example cost curves, 16 and 32 clients, steps 8-16 and 8-48."""
    for name, model in EXAMPLE_COST_MODELS.items():
        for clients in (16, 32):
            for max_steps in (16, 48):
                for seed in (0, 1):
                    r = compare(model, clients, 2 * clients, max_steps, seed)
                    step, req, none = r["step"], r["request"], r["none"]
                    print(
                        f"{name:>14} {clients} clients, {2 * clients} requests, steps 8-{max_steps}, seed {seed}: "
                        f"step {step.throughput / req.throughput:.2f}x request, {step.throughput / none.throughput:.2f}x none; "
                        f"p95 {step.latency_p95 / req.latency_p95:.2f} of request's; efficiency step {step.efficiency:.2f} "
                        f"request {req.efficiency:.2f} none {none.efficiency:.2f}; mean batch {step.mean_batch:.1f}"
                    )


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = [
    "EXAMPLE_COST_MODELS",
    "FIXED_DOMINANT",
    "ROW_HEAVY",
    "SHIPPED_CASCADE",
    "SHIPPED_CPU_ONE_THREAD",
    "SHIPPED_CPU_TWO_THREADS",
    "SimRequest",
    "SimResult",
    "SimStage",
    "affine_cost_model",
    "cascade_from_config",
    "compare",
    "evaluation_sigmas",
    "karras_sigmas",
    "request_mix",
    "simulate",
]
