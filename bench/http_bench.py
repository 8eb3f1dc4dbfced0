"""`ediffi bench http`: N concurrent HTTP clients through the whole service
(API + Redis + worker processes), on the same synthetic load as `ediffi bench engine`.

Without `--url` it starts everything itself on this machine: a private
`redis-server` (or `EDIFFI_REDIS_URL`), one `ediffi api` and `--workers` x
`ediffi worker` children (the engine settings below passed as `EDIFFI_*`), waits
until `/readyz` answers and every worker heartbeats, runs the load, and stops them.
With `--url` it drives a running API instead (`--metrics-url` names its workers'
/metrics, for batch sizes and efficiency), sending `--api-key` (default: the
environment variable `EDIFFI_BENCH_API_KEY`) as `Authorization: Bearer`. A
refused warm-up request is one `error:` line and exit status 2.

Load: `bench.engine_bench.synthetic_requests` (same seed -> same prompts, steps,
samplers, guidance, paint-with-words colour maps and style images as the engine
bench), sent as `POST /generate` (synchronous, images inline as base64). Closed
loop: each client sends its next request when its previous one answered, until
`--requests` are done; one warm-up request before the clock starts is not counted.

Workers run the engine's "auto" tick budget (Settings has no field for it: it is
derived from each process's warm-up timings, so on a noisy machine two processes may
pick different budgets. Workers report theirs with their heartbeat (worker_row_budget)
and `--compare-engine` gives the in-process engine the same one; `--policies step:none`
or `step:N` pins the in-process engine's budget instead).

Reported (`--json`: one object per policy; the engine bench's keys first):
policy, backend, throughput_images_per_s, latency_p50/95/99_s (client-measured
end to end), mean_batch_size (rows per denoiser call, from the workers' metrics),
efficiency (throughput / compute limit, the limit measured as the engine bench
does: each expert's seconds per row at max batch, times the rows each image of
this load needed, measured in this process before and after the run); and
engine_latency_p50_s (the engine's own latency of the same requests, reported by
the worker as `engine_s`), latency_ratio_p50 (median over requests of end to end /
engine), overhead_p50_s, queue_wait_p50_s; cpu_s, the CPU seconds the run cost each
process role (api, workers, redis, this client) when this bench started them, and
images_per_cpu_s, images over their sum: on a shared machine work per CPU second is
what other processes' load does not move, while wall-clock throughput is.
`--compare-engine` then runs `bench engine`'s policy on the same load in this process,
on the same machine, right after, and adds engine_throughput_images_per_s,
engine_bench_latency_p50_s, engine_mean_batch_size, engine_row_budget,
engine_images_per_cpu_s, and the ratios throughput_vs_engine, latency_p50_vs_engine
and images_per_cpu_s_vs_engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where `--api-key` comes from when not given (an argument shows in `ps`; the environment does not).
API_KEY_ENV = "EDIFFI_BENCH_API_KEY"


class BenchError(Exception):
    """A run that cannot go on, reported as one line (``error: ...``, exit status 2), not a traceback."""


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers that authenticate the bench's requests (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def redact_password(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (a Redis URL may carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# ------------------------------------------------------------------ the load


def request_body(request) -> dict[str, Any]:
    """`POST /generate` JSON of an `ediffi.pipeline.GenerationRequest`."""

    def png_b64(image) -> str:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    body: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "guidance_scale": float(request.guidance_scale),
        "seed": int(request.seed),
        "sampler": request.sampler,
        "n": request.n,
    }
    if request.style_image is not None:
        body["style_image"] = png_b64(request.style_image)
    if request.color_map is not None:
        body["paint_with_words"] = {
            "color_map": png_b64(request.color_map),
            "regions": [{"color": r.color, "phrase": r.phrase, "strength": float(r.strength)} for r in request.regions],
        }
    return body


# --------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


class _Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


@dataclass
class Service:
    """API + workers (+ a private Redis) this bench started, or a running API (`url`)."""

    url: str
    metrics_urls: list[str]
    children: list[_Child] = field(default_factory=list)
    scratch: Path | None = None
    redis_url: str | None = None

    def worker_row_budgets(self) -> list[int | None] | None:
        """Each live worker's tick budget, from its heartbeat (None if unknown)."""
        if not self.redis_url:
            return None
        import redis

        from server.keys import RedisKeys

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            budgets = []
            for key in client.scan_iter(match=RedisKeys().worker_heartbeat_pattern, count=200):
                info = json.loads(client.get(key) or b"{}")
                if "row_budget" not in info:
                    return None
                budgets.append(info["row_budget"])
            return budgets or None
        except (redis.RedisError, ValueError):
            return None
        finally:
            client.close()

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU seconds so far by role (api, workers, redis) of the processes this bench started."""
        if not self.children:
            return None
        totals: dict[str, float] = {}
        for child in self.children:
            value = _cpu_seconds(child.process.pid)
            if value is None:
                return None
            role = "workers" if child.name.startswith("worker") else child.name
            totals[role] = totals.get(role, 0.0) + value
        return totals

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def start_service(settings, model_dir: Path, env_settings: dict[str, Any], workers: int, log) -> Service:
    scratch = Path(tempfile.mkdtemp(prefix="ediffi-bench-http-"))
    service = Service(url="", metrics_urls=[], scratch=scratch)
    try:
        redis_url = settings.redis_url if settings is not None else None
        if not redis_url:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not on PATH: install it, set EDIFFI_REDIS_URL, or pass --url")
            port = _free_port()
            redis_child = _Child(
                "redis",
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(scratch)],
                dict(os.environ), scratch,
            )
            service.children.append(redis_child)
            redis_url = f"redis://127.0.0.1:{port}/0"
            service.redis_url = redis_url
        else:
            log(f"using EDIFFI_REDIS_URL={redact_password(redis_url)} (the bench's jobs go to its default key prefix)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
        env.update({"PYTHONUNBUFFERED": "1", "EDIFFI_REDIS_URL": redis_url, "EDIFFI_MODEL_DIR": str(model_dir),
                    "EDIFFI_HOST": "127.0.0.1"})
        env.update({f"EDIFFI_{k.upper()}": str(v) for k, v in env_settings.items() if v is not None})
        api_port = _free_port()
        python = [sys.executable, "-m", "ediffi"]
        service.children.append(_Child("api", [*python, "api", "--port", str(api_port)], env, scratch))
        service.url = f"http://127.0.0.1:{api_port}"
        for k in range(workers):
            metrics_port = _free_port()
            service.children.append(
                _Child(f"worker{k}", [*python, "worker", "--metrics-port", str(metrics_port)], env, scratch)
            )
            service.metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
        _wait_ready(service, timeout_s=600)
        return service
    except BaseException:
        service.close()
        raise


def _wait_ready(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ready: set[str] = set()
    while True:
        for child in service.children:
            child.check()
        for url in service.metrics_urls:
            if url in ready:
                continue
            try:
                samples = _samples(httpx.get(url, timeout=2).text)
            except httpx.HTTPError:
                continue
            if any(name == "ediffi_worker_heartbeats_total" and value > 0 for name, _, value in samples):
                ready.add(url)
        if len(ready) == len(service.metrics_urls):
            try:
                if httpx.get(service.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name} ---\n{c.log_path.read_text(errors='replace')[-1500:]}" for c in service.children)
            raise RuntimeError(f"the service was not ready within {timeout_s} s\n{tails}")
        time.sleep(0.2)


# ------------------------------------------------------------------ metrics


@dataclass
class WorkerCounters:
    rows: dict[str, float] = field(default_factory=dict)  # "stage/expert" -> denoiser rows
    calls: dict[str, float] = field(default_factory=dict)
    images: float = 0.0

    @staticmethod
    def scrape(urls: list[str]) -> "WorkerCounters":
        counters = WorkerCounters()
        for url in urls:
            for name, labels, value in _samples(httpx.get(url, timeout=10).text):
                key = f"{labels.get('stage')}/{labels.get('expert')}"
                if name == "ediffi_batch_size_sum":
                    counters.rows[key] = counters.rows.get(key, 0.0) + value
                elif name == "ediffi_batch_size_count":
                    counters.calls[key] = counters.calls.get(key, 0.0) + value
                elif name == "ediffi_images_generated_total":
                    counters.images += value
        return counters

    def minus(self, before: "WorkerCounters") -> "WorkerCounters":
        return WorkerCounters(
            rows={k: v - before.rows.get(k, 0.0) for k, v in self.rows.items()},
            calls={k: v - before.calls.get(k, 0.0) for k, v in self.calls.items()},
            images=self.images - before.images,
        )


# --------------------------------------------------------------------- run


@dataclass
class HttpResult:
    policy: str
    backend: str
    throughput_images_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    mean_batch_size: float | None
    efficiency: float | None
    load: str
    clients: int
    workers: int | None
    requests: int
    images: int
    failed: int
    wall_s: float
    engine_latency_p50_s: float | None
    latency_ratio_p50: float | None
    overhead_p50_s: float | None
    queue_wait_p50_s: float | None
    compute_limit_images_per_s: float | None
    mean_batch_size_per_expert: dict[str, float] = field(default_factory=dict)
    url: str = ""
    # CPU seconds of the run by process role (processes this bench started, and this
    # client), and images per CPU second of them all: on a shared machine, throughput
    # per CPU second is what contention does not move.
    cpu_s: dict[str, float] | None = None
    images_per_cpu_s: float | None = None
    engine_throughput_images_per_s: float | None = None
    engine_bench_latency_p50_s: float | None = None
    engine_mean_batch_size: float | None = None
    engine_row_budget: int | None = None
    worker_row_budget: int | list | None = None
    engine_images_per_cpu_s: float | None = None
    throughput_vs_engine: float | None = None
    latency_p50_vs_engine: float | None = None
    images_per_cpu_s_vs_engine: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


async def run_load(url: str, bodies: list[dict[str, Any]], clients: int, timeout_s: float,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Closed loop of `clients` concurrent clients over `bodies`, each request with `headers`; per-request figures."""
    latencies: list[float] = []
    engine: list[float] = []
    ratios: list[float] = []
    overheads: list[float] = []
    waits: list[float] = []
    errors: list[str] = []
    counts = {"images": 0, "failed": 0, "next": 0}
    last_finish = [0.0]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def one_client() -> None:
            while counts["next"] < len(bodies):
                body = bodies[counts["next"]]
                counts["next"] += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/generate", json=body)
                except httpx.HTTPError as exc:
                    counts["failed"] += 1
                    errors.append(repr(exc))
                    continue
                elapsed = time.perf_counter() - t0
                last_finish[0] = time.perf_counter()
                if response.status_code != 200 or response.json().get("status") != "succeeded":
                    counts["failed"] += 1
                    errors.append(f"{response.status_code} {response.text[:300]}")
                    continue
                data = response.json()
                latencies.append(elapsed)
                counts["images"] += len(data["images"])
                timings = data.get("timings", {})
                if "engine_s" in timings and timings["engine_s"] > 0:
                    engine.append(timings["engine_s"])
                    ratios.append(elapsed / timings["engine_s"])
                    overheads.append(elapsed - timings["engine_s"])
                if "queue_wait_s" in timings:
                    waits.append(timings["queue_wait_s"])

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(min(clients, len(bodies)))))
    wall = max(1e-9, last_finish[0] - start)
    return dict(latencies=latencies, engine=engine, ratios=ratios, overheads=overheads, waits=waits,
                errors=errors, images=counts["images"], failed=counts["failed"], wall=wall)


def warm_up(url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> None:
    """One request before the clock starts (first-request costs stay out of the figures); BenchError if refused."""
    try:
        response = httpx.post(url + "/generate", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise BenchError(f"warm-up request to {url}/generate failed: {type(exc).__name__}: {exc}") from None
    if response.status_code == 200:
        return
    try:
        detail = str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = response.text
    detail = " ".join(detail.split())[:300]
    hint = f" (pass --api-key or set {API_KEY_ENV})" if response.status_code in (401, 403) else ""
    raise BenchError(f"warm-up request to {url}/generate failed: {response.status_code} {detail}{hint}")


def main(args, settings=None, log=print) -> int:
    """Entry point of `ediffi bench http` (args from cli/main.py); 2 after one ``error:`` line on stderr
    when the run cannot go on (a refused warm-up request)."""
    try:
        return _run(args, settings, log)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args, settings, log) -> int:
    import torch

    from ediffi.config import ModelConfig
    from bench.engine_bench import (
        Calibration,
        LoadConfig,
        bench_target_model_dir,
        compute_limit,
        measure_seconds_per_row,
        parse_policy,
        percentile,
        run_policy,
        synthetic_requests,
    )

    torch.set_num_threads(args.threads)
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else log
    model_dir = bench_target_model_dir(args, settings, progress)
    model_dir = Path(model_dir)
    image_size = ModelConfig.load(model_dir).image_size
    load = LoadConfig(clients=args.clients, requests=args.requests, min_steps=args.min_steps,
                      max_steps=args.max_steps, seed=args.seed)
    requests = synthetic_requests(load, image_size)
    bodies = [request_body(r) for r in requests]
    device = args.device or (getattr(settings, "device", None) if settings is not None else None) or "cpu"
    # A service this bench starts serves anonymously; a key goes only to the API given by --url.
    headers = auth_headers(getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)) if args.url else {}

    backend = None
    if not args.no_calibrate or args.compare_engine:
        from engines.engine import make_backend

        backend = make_backend(args.backend, model_dir, device=device, dtype=args.dtype, max_batch=args.max_batch)
        backend.warmup()

    results = []
    for spec in [p.strip() for p in args.policies.split(",") if p.strip()]:
        policy, budget = parse_policy(spec)
        if budget != "auto" and not args.url:
            # Settings has no tick-budget field: a worker's engine always derives "auto" from
            # its own warm-up timings. The budget applies to --compare-engine only.
            progress(f"note: workers use the auto tick budget; {spec!r} sets the in-process engine's only")
        service = None
        try:
            if args.url:
                service = Service(url=args.url.rstrip("/"), metrics_urls=list(args.metrics_url or []))
            else:
                progress(f"starting redis, api and {args.workers} worker(s) (policy {spec})...")
                service = start_service(settings, model_dir, {
                    "backend": args.backend, "device": device, "dtype": args.dtype, "max_batch": args.max_batch,
                    "max_active_requests": args.max_active, "worker_slots": args.max_active,
                    "batching_policy": policy, "intra_op_threads": args.threads, "max_queue": 4096,
                    "max_steps": max(100, args.max_steps), "sync_timeout_s": args.timeout,
                    # A loopback API of its own, no keys: every client waits synchronously from one address.
                    "allow_anonymous": True, "rate_limit_per_minute": 1_000_000,
                    "max_streams_per_key": max(8, args.clients),
                    "max_inflight_per_caller": max(64, args.clients),
                }, args.workers, progress)
            worker_budgets = service.worker_row_budgets()
            warm_up(service.url, bodies[0], headers, args.timeout)
            before = WorkerCounters.scrape(service.metrics_urls) if service.metrics_urls else None
            calibrate = backend is not None and not args.no_calibrate and before is not None
            cal_before = measure_seconds_per_row(backend, 2) if calibrate else None
            progress(f"running {len(bodies)} requests, {args.clients} clients, through {service.url}...")
            cpu_before, client_cpu = service.cpu_seconds(), time.process_time()
            run = asyncio.run(run_load(service.url, bodies, args.clients, args.timeout, headers))
            client_cpu = time.process_time() - client_cpu
            cpu_after = service.cpu_seconds()
            cpu = None
            if cpu_before is not None and cpu_after is not None:
                cpu = {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_after}
                cpu["client"] = round(client_cpu, 2)
            delta = WorkerCounters.scrape(service.metrics_urls).minus(before) if before is not None else None
            cal_after = measure_seconds_per_row(backend, 2) if calibrate else None
        finally:
            if service is not None and not args.url:
                service.close()
        images = run["images"]
        throughput = images / run["wall"]
        mean_batch = per_expert = None
        limit = None
        if delta is not None and sum(delta.calls.values()) > 0:
            mean_batch = sum(delta.rows.values()) / sum(delta.calls.values())
            per_expert = {k: round(delta.rows[k] / delta.calls[k], 2) for k in sorted(delta.calls) if delta.calls[k]}
            if cal_before is not None and cal_after is not None and delta.images > 0:
                # As the engine bench: calibrated just before and just after the run, averaged.
                calibration = Calibration.mean(cal_before, cal_after)
                per_image = {k: v / delta.images for k, v in delta.rows.items() if k in calibration.wall}
                limit = compute_limit(calibration.wall, per_image)
        engine_p50 = percentile(run["engine"], 50) if run["engine"] else None
        result = HttpResult(
            policy=spec, backend=backend.describe() if backend is not None else args.backend,
            throughput_images_per_s=round(throughput, 4),
            latency_p50_s=round(percentile(run["latencies"], 50), 3), latency_p95_s=round(percentile(run["latencies"], 95), 3),
            latency_p99_s=round(percentile(run["latencies"], 99), 3),
            mean_batch_size=round(mean_batch, 2) if mean_batch is not None else None,
            efficiency=round(throughput / limit, 4) if limit else None,
            load=load.label, clients=args.clients, workers=None if args.url else args.workers,
            requests=len(bodies), images=images, failed=run["failed"], wall_s=round(run["wall"], 3),
            engine_latency_p50_s=round(engine_p50, 3) if engine_p50 is not None else None,
            latency_ratio_p50=round(percentile(run["ratios"], 50), 3) if run["ratios"] else None,
            overhead_p50_s=round(percentile(run["overheads"], 50), 3) if run["overheads"] else None,
            queue_wait_p50_s=round(percentile(run["waits"], 50), 3) if run["waits"] else None,
            compute_limit_images_per_s=round(limit, 4) if limit else None,
            mean_batch_size_per_expert=per_expert or {}, url=service.url, errors=run["errors"][:5], cpu_s=cpu,
            worker_row_budget=(worker_budgets[0] if worker_budgets and len(set(worker_budgets)) == 1
                               else worker_budgets),
            images_per_cpu_s=round(images / sum(cpu.values()), 4) if cpu and sum(cpu.values()) > 0 else None,
        )
        if args.compare_engine:
            progress(f"running the engine bench's {spec} policy on the same load in this process...")
            policy_name, budget = parse_policy(spec)
            if budget == "auto" and worker_budgets and len(set(worker_budgets)) == 1:
                # "auto" resolves from each process's own warm-up timings, which a busy
                # machine makes noisy: give the reference engine the workers' budget.
                budget = worker_budgets[0]
            engine_result = run_policy(backend, policy_name, requests, load, args.max_active, max_rows_per_tick=budget)
            result.engine_throughput_images_per_s = engine_result.throughput_images_per_s
            result.engine_bench_latency_p50_s = engine_result.latency_p50_s
            result.engine_mean_batch_size = engine_result.mean_batch_size
            result.engine_row_budget = engine_result.row_budget
            result.engine_images_per_cpu_s = engine_result.throughput_images_per_cpu_s
            if result.images_per_cpu_s and engine_result.throughput_images_per_cpu_s > 0:
                result.images_per_cpu_s_vs_engine = round(
                    result.images_per_cpu_s / engine_result.throughput_images_per_cpu_s, 4
                )
            if engine_result.throughput_images_per_s > 0:
                result.throughput_vs_engine = round(throughput / engine_result.throughput_images_per_s, 4)
            if engine_result.latency_p50_s > 0:
                result.latency_p50_vs_engine = round(result.latency_p50_s / engine_result.latency_p50_s, 4)
        results.append(result)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        log(format_table(results))
    return 0 if all(r.failed == 0 for r in results) else 1


def format_table(results: list[HttpResult]) -> str:
    def f(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    header = ["policy", "backend", "clients", "images/s", "p50 s", "p95 s", "p99 s", "mean batch", "efficiency",
              "engine p50 s", "e2e/engine p50", "vs engine bench (thr, p50)"]
    rows = [
        [r.policy, r.backend, r.clients, f(r.throughput_images_per_s), f(r.latency_p50_s, "{:.2f}"),
         f(r.latency_p95_s, "{:.2f}"), f(r.latency_p99_s, "{:.2f}"), f(r.mean_batch_size, "{:.2f}"),
         f(None if r.efficiency is None else 100 * r.efficiency, "{:.1f}%"), f(r.engine_latency_p50_s, "{:.2f}"),
         f(r.latency_ratio_p50, "{:.3f}"),
         f"{f(r.throughput_vs_engine, '{:.3f}')}, {f(r.latency_p50_vs_engine, '{:.3f}')}"]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
