"""Soak test of the whole service on loopback (issue 19): Redis (AOF) + ``ediffi api`` + workers,
all real processes, a tiny random model, ``jobs`` one-step jobs mixed with cancels, and a worker
killed with SIGKILL (and replaced) every ``kill_every`` jobs.

Checks that every job ends exactly once (one terminal state, one terminal event, images only for
succeeded jobs) and samples Redis's ``used_memory`` and the API's RSS every ``sample_every`` jobs,
to see both flat once the finished jobs' TTL (``result_ttl_s``) is reached.

    python bench/soak.py --jobs 1000              # the full run (about 10 minutes on 2 CPUs)
    python bench/soak.py --jobs 200 --json        # what tests/e2e/test_soak.py runs in CI

``tests/e2e/test_soak.py`` (marked slow) runs the short version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.process import TERMINAL, Cluster  # noqa: E402

PROMPT = "a red circle on the left and a blue square"


@dataclass
class Sample:
    jobs: int  # jobs submitted when the sample was taken
    redis_used_memory: int  # bytes, INFO memory used_memory
    api_rss: int  # bytes, VmRSS of the API process
    seconds: float  # since the start


@dataclass
class SoakReport:
    jobs: int
    workers: int
    kills: int
    cancels_sent: int
    outcomes: dict[str, int]
    exactly_once: bool
    problems: list[str]
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    transport_retries: int = 0  # client requests sent again after a dropped keep-alive connection

    def flatness(self, after_jobs: int) -> dict[str, float]:
        """Max/min of each figure over the samples taken after ``after_jobs`` jobs."""
        later = [s for s in self.samples if s.jobs >= after_jobs]
        if len(later) < 2:
            return {}
        redis_values = [s.redis_used_memory for s in later]
        rss_values = [s.api_rss for s in later]
        return {
            "redis_max_over_min": max(redis_values) / min(redis_values),
            "api_rss_max_over_min": max(rss_values) / min(rss_values),
            "redis_last_over_first": redis_values[-1] / redis_values[0],
            "api_rss_last_over_first": rss_values[-1] / rss_values[0],
        }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_soak(
    model_dir: Path,
    log_dir: Path,
    *,
    jobs: int = 1000,
    workers: int = 3,
    kill_every: int = 100,
    cancel_fraction: float = 0.15,
    sample_every: int = 50,
    in_flight: int = 24,
    result_ttl_s: float = 20.0,
    seed: int = 0,
) -> SoakReport:
    rng = random.Random(seed)
    cluster = Cluster(
        model_dir,
        log_dir,
        settings={"result_ttl_s": result_ttl_s, "worker_slots": 4, "max_unfinished_per_key": 10_000},
    )
    started = time.monotonic()
    samples: list[Sample] = []
    kills = 0
    cancels = 0
    transport_retries = 0
    try:
        cluster.start(workers=workers, ready_timeout_s=600)  # a loaded machine builds engines slowly
        assert cluster.api is not None

        def sample(submitted: int) -> None:
            memory = int(cluster.redis.info("memory")["used_memory"])
            samples.append(Sample(submitted, memory, rss_bytes(cluster.api.pid), time.monotonic() - started))

        outcomes: dict[str, str] = {}
        problems: list[str] = []

        async def drive() -> None:
            nonlocal kills, cancels, transport_retries
            limit = asyncio.Semaphore(in_flight)
            async with httpx.AsyncClient(base_url=cluster.api.url, timeout=120) as client:

                async def call(method: str, url: str, **kwargs) -> httpx.Response:
                    """One request, sent again after a transport error as a client would (a pooled
                    keep-alive connection the server closed at that moment); submissions carry an
                    Idempotency-Key, so a repeat is the same job."""
                    nonlocal transport_retries
                    for attempt in range(3):
                        try:
                            return await client.request(method, url, **kwargs)
                        except httpx.TransportError:
                            if attempt == 2:
                                raise
                            transport_retries += 1
                            await asyncio.sleep(0.2)
                    raise AssertionError("unreachable")

                async def one(i: int) -> None:
                    nonlocal cancels
                    async with limit:
                        body = {"prompt": PROMPT, "steps": 1 + i % 3, "n": 1, "seed": i}
                        headers = {"Prefer": "respond-async", "Idempotency-Key": f"soak-{seed}-{i}"}
                        r = await call("POST", "/generate", json=body, headers=headers)
                        assert r.status_code == 202, r.text
                        job_id = r.json()["id"]
                        if rng.random() < cancel_fraction:
                            await asyncio.sleep(rng.random() * 0.5)  # queued or running by now
                            cancels += 1
                            c = await call("POST", f"/jobs/{job_id}/cancel")
                            assert c.status_code in (200, 202), c.text
                        # Wait as a client would (keeps the load bounded), then check what it sees.
                        while (status := (await call("GET", f"/jobs/{job_id}")).json()["status"]) not in TERMINAL:
                            await asyncio.sleep(0.3)
                        replay = (await call("GET", f"/jobs/{job_id}/events")).text
                        terminal = [line[len("event: "):] for line in replay.splitlines()
                                    if line.startswith("event: ") and line[len("event: "):] in TERMINAL]
                        if terminal != [status]:
                            problems.append(f"{job_id}: status {status}, terminal events {terminal}")
                        image = await call("GET", f"/jobs/{job_id}/images/0.png")
                        if (image.status_code == 200) != (status == "succeeded"):
                            problems.append(f"{job_id}: status {status}, image answer {image.status_code}")
                        if job_id in outcomes:
                            problems.append(f"{job_id}: submitted twice")
                        outcomes[job_id] = status

                pending: set[asyncio.Task] = set()
                tasks: list[asyncio.Task] = []
                for i in range(jobs):
                    if i and i % kill_every == 0:
                        victim = rng.choice(cluster.live_workers())
                        victim.kill()  # SIGKILL: whatever it held is reclaimed
                        kills += 1
                        cluster.spawn_workers(1, wait=False)
                    if i % sample_every == 0:
                        sample(i)
                    task = asyncio.create_task(one(i))
                    tasks.append(task)
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    while len(pending) >= in_flight:
                        await asyncio.sleep(0.02)
                for i, result in enumerate(await asyncio.gather(*tasks, return_exceptions=True)):
                    if isinstance(result, BaseException):
                        problems.append(f"job {i}: the client failed: {result!r}")

        asyncio.run(drive())
        sample(jobs)
        if len(outcomes) != jobs:
            problems.append(f"{jobs} submitted, {len(outcomes)} ended")
        return SoakReport(
            jobs=jobs, workers=workers, kills=kills, cancels_sent=cancels,
            outcomes=dict(Counter(outcomes.values())), exactly_once=not problems, problems=problems[:20],
            samples=samples, seconds=time.monotonic() - started, transport_retries=transport_retries,
        )
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--result-ttl-s", type=float, default=20.0)
    parser.add_argument("--model-dir", type=Path, help="default: a tiny random model built here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="ediffi-soak-logs-"))  # kept: the processes' logs
    with tempfile.TemporaryDirectory(prefix="ediffi-soak-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from ediffi.model import build_random_model_dir

            model_dir = build_random_model_dir(Path(tmp) / "model", seed=0)
        report = run_soak(
            model_dir, log_dir, jobs=args.jobs, workers=args.workers, kill_every=args.kill_every,
            sample_every=args.sample_every, result_ttl_s=args.result_ttl_s,
        )
    flat = report.flatness(after_jobs=200)
    if args.json:
        print(json.dumps({**asdict(report), "flatness_after_200": flat}, indent=2))
        return
    print(f"{report.jobs} jobs, {report.workers} workers, {report.kills} killed, {report.cancels_sent} cancels sent, "
          f"{report.seconds:.0f} s, {report.transport_retries} client requests retried after a transport error")
    print(f"outcomes {report.outcomes}; every job ended exactly once: {report.exactly_once}; logs in {log_dir}")
    for problem in report.problems:
        print("  problem:", problem)
    print(f"{'jobs':>6} {'redis used_memory':>18} {'api RSS':>12} {'t (s)':>7}")
    for s in report.samples:
        print(f"{s.jobs:>6} {s.redis_used_memory:>18,} {s.api_rss:>12,} {s.seconds:>7.1f}")
    print("after 200 jobs:", {k: round(v, 3) for k, v in flat.items()})


if __name__ == "__main__":
    main()
