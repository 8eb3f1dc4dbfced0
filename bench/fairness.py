"""Fair claiming across callers (README "Fair claiming"), through the real stack: Redis + ``ediffi
api`` + one worker, real processes, the shipped model.

Caller A (one API key) submits ``--backlog`` jobs at once, then caller B (another key) submits one;
every job is asynchronous and the same (``--steps`` Euler steps, one image). Reported: B's latency
from submission to its result, where its job finished among all of them, and A's latencies. With
claims in stream order B waits for every one of A's jobs the worker has not started; with fair
claiming its job is the next one claimed.

    python bench/fairness.py --json > bench/results/fairness.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.process import TERMINAL, Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "a" * 40, "b" * 40


@dataclass
class FairnessReport:
    backlog: int
    steps: int
    worker_slots: int
    b_latency_s: float  # B's job: submitted -> finished (the API's queued_at -> finished_at)
    b_finish_rank: int  # 1 = the first job of all to finish
    a_latency_s: dict[str, float]  # min, median, max over A's jobs
    a_last_finished_after_b: int  # A's jobs that finished after B's
    seconds: float
    statuses: dict[str, int]


def run(model_dir: Path, log_dir: Path, *, backlog: int, steps: int, worker_slots: int) -> FairnessReport:
    cluster = Cluster(
        model_dir, log_dir,
        settings={"api_keys": f"{KEY_A},{KEY_B}", "allow_anonymous": False, "worker_slots": worker_slots},
        persistent=False,
    )
    started = time.monotonic()
    try:
        cluster.start(workers=1, ready_timeout_s=600)
        assert cluster.http is not None
        body = {"prompt": "a red circle on the left and a blue square", "steps": steps, "sampler": "euler", "n": 1}

        def submit(key: str, seed: int) -> str:
            response = cluster.http.post(
                "/generate", json={**body, "seed": seed},
                headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async"},
            )
            response.raise_for_status()
            return response.json()["id"]

        a_jobs = [submit(KEY_A, seed) for seed in range(backlog)]
        b_job = submit(KEY_B, 10_000)
        records: dict[str, dict] = {}
        deadline = time.monotonic() + 1800
        while len(records) < backlog + 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{backlog + 1 - len(records)} jobs unfinished after 30 minutes")
            for job_id, key in [(j, KEY_A) for j in a_jobs] + [(b_job, KEY_B)]:
                if job_id in records:
                    continue
                record = cluster.http.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
                if record["status"] in TERMINAL:
                    records[job_id] = record
            time.sleep(0.2)
    finally:
        cluster.close()

    def timing(record: dict, name: str) -> float:
        return float(record["timings"][name])

    def latency(job_id: str) -> float:
        return timing(records[job_id], "finished_at") - timing(records[job_id], "queued_at")

    finish_order = sorted(records, key=lambda job_id: timing(records[job_id], "finished_at"))
    a_latencies = [latency(job_id) for job_id in a_jobs]
    b_finished = timing(records[b_job], "finished_at")
    statuses: dict[str, int] = {}
    for record in records.values():
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    return FairnessReport(
        backlog=backlog, steps=steps, worker_slots=worker_slots,
        b_latency_s=round(latency(b_job), 3),
        b_finish_rank=finish_order.index(b_job) + 1,
        a_latency_s={
            "min": round(min(a_latencies), 3), "median": round(statistics.median(a_latencies), 3),
            "max": round(max(a_latencies), 3),
        },
        a_last_finished_after_b=sum(1 for job_id in a_jobs if timing(records[job_id], "finished_at") > b_finished),
        seconds=round(time.monotonic() - started, 1),
        statuses=statuses,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=24, help="caller A's jobs, submitted before B's one")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker-slots", type=int, default=4, help="EDIFFI_WORKER_SLOTS of the one worker")
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ediffi-fairness-") as tmp:
        report = run(args.model_dir, Path(tmp), backlog=args.backlog, steps=args.steps, worker_slots=args.worker_slots)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        for name, value in asdict(report).items():
            print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
