"""How much do large uploads slow the health probe? (issue 19 item 5)

Starts a private redis-server and ``python -m ediffi api`` (with one API key) from this
tree, measures ``GET /healthz`` latency idle, then while 6 curl processes each POST three
10 MB JSON bodies to /generate, without a key (``noauth``: refused before the body is read)
or with it (``auth``: read, decoded off the event loop, refused by validation, 413). The
senders are separate processes so their work stays off the measuring client's event loop.
Prints one line: latency quantiles idle and under load, and their ratio.

    PYTHONPATH=$PWD python scripts/bench_probe_latency.py noauth|auth
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ediffi.model import build_random_model_dir
from tests.support.process import BASE_SETTINGS, ApiProcess, PersistentRedis, service_env

KEY = "k" * 32
SENDERS, BODIES_PER_SENDER, BODY_MB = 6, 3, 10


async def probe(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await client.get("/healthz")
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)


async def send(url: str, body_file: Path, headers: dict[str, str], codes: list[str]) -> None:
    header_args = " ".join(f"-H '{name}: {value}'" for name, value in headers.items())
    script = (f"for i in $(seq {BODIES_PER_SENDER}); do curl -s -o /dev/null -w '%{{http_code}}\\n' -X POST "
              f"--data-binary @{body_file} {header_args} {url}/generate; done")
    process = await asyncio.create_subprocess_exec("bash", "-c", script, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    codes.extend(out.decode().split())


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] * 1000


async def measure(url: str, body_file: Path, headers: dict[str, str]) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        idle: list[float] = []
        stop = asyncio.Event()
        task = asyncio.create_task(probe(client, stop, idle))
        await asyncio.sleep(2)
        stop.set()
        await task
        loaded: list[float] = []
        codes: list[str] = []
        stop = asyncio.Event()
        task = asyncio.create_task(probe(client, stop, loaded))
        started = time.perf_counter()
        await asyncio.gather(*(send(url, body_file, headers, codes) for _ in range(SENDERS)))
        took = time.perf_counter() - started
        stop.set()
        await task
    return (
        f"{SENDERS * BODIES_PER_SENDER} x {BODY_MB} MB bodies from {SENDERS} clients in {took:.1f} s, "
        f"answers {sorted(set(codes))}; /healthz idle p50 {quantile(idle, .5):.1f} ms, under load "
        f"p50 {quantile(loaded, .5):.1f} ms p95 {quantile(loaded, .95):.1f} ms max {max(loaded) * 1000:.0f} ms "
        f"(n={len(loaded)}); p95 loaded/idle {quantile(loaded, .95) / quantile(idle, .95):.1f}x"
    )


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "noauth"
    scratch = Path(tempfile.mkdtemp(prefix="ediffi-probe-bench-"))
    model_dir = build_random_model_dir(scratch / "model", seed=0)
    body_file = scratch / "body.json"
    body_file.write_bytes(b'{"prompt": "a red circle", "style_image": "' + b"A" * (BODY_MB << 20) + b'"}')
    headers = {"Content-Type": "application/json"}
    if mode == "auth":
        headers["Authorization"] = f"Bearer {KEY}"
    redis_server = PersistentRedis(persistent=False)
    redis_server.start()
    api = ApiProcess(service_env(redis_server.url, model_dir, {**BASE_SETTINGS, "api_keys": KEY}), scratch)
    try:
        api.wait_ready(path="/healthz")
        print(f"{mode}: {asyncio.run(measure(api.url, body_file, headers))}")
    finally:
        api.stop()
        redis_server.cleanup()


if __name__ == "__main__":
    main()
