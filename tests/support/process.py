"""Real processes for the reliability tests (no tests here): a redis-server with AOF
persistence, ``python -m ediffi api`` and ``python -m ediffi worker`` children, and a
:class:`Cluster` that owns one of each kind plus any number of workers.

Everything is a real child process talking over real sockets; nothing is mocked.
Children get a clean environment (only the ``EDIFFI_*`` values given here, one torch
thread each) and are always killed by :meth:`Cluster.close` (fixture teardown).

Readiness: the API is ready when ``/readyz`` answers 200 (queue reachable and a worker
heartbeat seen); a worker is ready when its own ``/metrics`` shows a heartbeat
(``ediffi_worker_heartbeats_total`` > 0), which it sends only once its engine is built.
A worker's id (``host-pid-xxxxxx``, the ``worker`` field of a job) names its pid, so a
test can find and kill the process that holds a given job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from server.keys import RedisKeys
from tests.support.redis_server import free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = RedisKeys()  # the processes use the default key prefix
TERMINAL = ("succeeded", "failed", "canceled")

#: Worker-side settings every test cluster uses unless it overrides them. The heartbeat
#: (which also renews held jobs) runs several times per claim timeout. The API runs without
#: keys only because these say so (allow_anonymous), with a rate limit no test reaches.
BASE_SETTINGS: dict[str, Any] = {
    "allow_anonymous": True,
    "rate_limit_per_minute": 100000,
    "intra_op_threads": 1,
    "heartbeat_interval_s": 0.5,
    "heartbeat_ttl_s": 3,
    "claim_timeout_s": 3,
    "max_deliveries": 3,
    "result_ttl_s": 600,
    "worker_slots": 4,
    "max_queue": 1000,
    "max_unfinished_per_key": 1000,  # one anonymous client submits the tests' whole load
    "sync_timeout_s": 60,
}


def service_env(redis_url: str, model_dir: Path, settings: dict[str, Any]) -> dict[str, str]:
    """The environment of a child: the parent's minus every ``EDIFFI_*``, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        EDIFFI_REDIS_URL=redis_url,
        EDIFFI_MODEL_DIR=str(model_dir),
        EDIFFI_HOST="127.0.0.1",
    )
    env.update({f"EDIFFI_{name.upper()}": str(value) for name, value in settings.items()})
    return env


# ------------------------------------------------------------------- processes


class ChildProcess:
    """One ``python -m ediffi ...`` (or ``-m module``) child with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, module: str = "ediffi") -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, the way a crash or an OOM kill ends a process, and reap it."""
        self.send(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        stop_process(self.process, timeout_s)
        self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} (pid {self.pid}) log tail ---\n{text[-chars:]}"

    def check_alive(self) -> None:
        if not self.alive:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}")


@contextmanager
def serve_process(model_dir: Path, settings: dict[str, Any], log_dir: Path, timeout_s: float = 120.0):
    """``python -m ediffi serve`` on ``model_dir`` and a free port, without Redis
    (the in-process queue); yields its base URL once /readyz answers 200."""
    env = service_env("", model_dir, settings)
    env.pop("EDIFFI_REDIS_URL")
    port = free_port()
    child = ChildProcess("serve", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            child.check_alive()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, child.log_tail()
            time.sleep(0.2)
        yield url
        child.check_alive()  # the requests did not bring it down
    finally:
        child.stop()


class ApiProcess(ChildProcess):
    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "api") -> None:
        self.port = free_port()
        super().__init__(name, ["api", "--host", "127.0.0.1", "--port", str(self.port)], env, log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 90.0, path: str = "/readyz") -> None:
        """Poll ``path`` (default /readyz: needs a live worker) until it answers 200."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                response = httpx.get(self.url + path, timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: {path} not 200 within {timeout_s} s (last: {last})\n{self.log_tail()}")


class WorkerProcess(ChildProcess):
    #: ``python -m MODULE [COMMAND] --metrics-port P``
    module, command = "ediffi", ["worker"]

    def __init__(self, env: dict[str, str], log_dir: Path, name: str) -> None:
        self.metrics_port = free_port()
        super().__init__(name, [*self.command, "--metrics-port", str(self.metrics_port)], env, log_dir, self.module)
        self.ready = False

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> str:
        return httpx.get(self.metrics_url, timeout=5.0).text

    def poll_ready(self) -> bool:
        """True once the worker's /metrics shows a heartbeat (its engine is built and it claims)."""
        if self.ready:
            return True
        self.check_alive()
        try:
            text = self.scrape()
        except httpx.HTTPError:
            return False
        self.ready = metric_value(text, "ediffi_worker_heartbeats_total") > 0
        return self.ready

    def owns(self, worker_id: str | None) -> bool:
        """Whether a job's ``worker`` field (``host-pid-xxxxxx``) names this process."""
        return bool(worker_id) and worker_id.rsplit("-", 2)[-2] == str(self.pid)


class FaultyWorkerProcess(WorkerProcess):
    """``ediffi worker`` on a device whose every call fails (:mod:`tests.support.fault_injection`)."""

    module, command = "tests.support.fault_injection", []


class HungWorkerProcess(WorkerProcess):
    """``ediffi worker`` on a device that stops answering once serving (:mod:`tests.support.fault_injection`)."""

    module, command = "tests.support.fault_injection", ["--fault", "hung"]


def wait_workers_ready(workers: Iterable[WorkerProcess], timeout_s: float = 120.0) -> None:
    workers = list(workers)
    deadline = time.monotonic() + timeout_s
    while not all(w.poll_ready() for w in workers):
        if time.monotonic() > deadline:
            late = [w for w in workers if not w.ready]
            raise AssertionError(
                f"workers not ready within {timeout_s} s: {[w.name for w in late]}\n"
                + "\n".join(w.log_tail() for w in late)
            )
        time.sleep(0.2)


class PersistentRedis:
    """A private ``redis-server`` with AOF persistence (``appendonly yes``), so a restart
    keeps every accepted job: the setting production needs. ``appendfsync everysec`` is
    Redis's default (a crash may lose the last second; a clean stop loses nothing);
    pass ``fsync="always"`` to lose nothing even on a crash."""

    def __init__(self, fsync: str = "everysec", persistent: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.fsync = fsync
        self.persistent = persistent
        self.data_dir = Path(tempfile.mkdtemp(prefix="ediffi-redis-aof-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", self.fsync] if self.persistent else ["--appendonly", "no"]
        )
        log_file = self.data_dir / "redis.log"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.data_dir), "--logfile", str(log_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    log = log_file.read_text(errors="replace") if log_file.exists() else ""
                    raise AssertionError(f"redis-server exited with {self.process.returncode}:\n{log[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis-server on port {self.port} did not answer PING in {timeout_s} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (what compose and Kubernetes send): Redis flushes the AOF and exits."""
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------- cluster


class Cluster:
    """Redis + one API + workers, all real processes, sharing ``settings`` (EDIFFI_* values)."""

    def __init__(self, model_dir: Path, log_dir: Path, settings: dict[str, Any] | None = None,
                 persistent: bool = True) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.redis_server = PersistentRedis(persistent=persistent)
        self.redis_server.start()
        self.env = service_env(self.redis_server.url, model_dir, self.settings)
        self.workers: list[WorkerProcess] = []
        self._spawned = 0
        self.api: ApiProcess | None = None
        self.http: httpx.Client | None = None
        self.redis = redis.Redis.from_url(self.redis_server.url, socket_connect_timeout=1, socket_timeout=5)

    # -- processes ---------------------------------------------------------
    def start(self, workers: int, ready_timeout_s: float = 120.0) -> "Cluster":
        """Start the API and ``workers`` workers at once; return when all are ready."""
        self.api = ApiProcess(self.env, self.log_dir)
        self.spawn_workers(workers, wait=False)
        self.http = httpx.Client(base_url=self.api.url, timeout=90.0)
        wait_workers_ready(self.workers, timeout_s=ready_timeout_s)
        self.api.wait_ready(timeout_s=ready_timeout_s)
        return self

    def spawn_workers(self, count: int, wait: bool = True) -> list[WorkerProcess]:
        new = []
        for _ in range(count):
            self._spawned += 1
            new.append(WorkerProcess(self.env, self.log_dir, f"worker{self._spawned}"))
        self.workers += new
        if wait:
            wait_workers_ready(new)
        return new

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def ensure_workers(self, count: int) -> list[WorkerProcess]:
        """At least ``count`` live workers, all ready (starting more if needed)."""
        live = self.live_workers()
        if len(live) < count:
            live += self.spawn_workers(count - len(live), wait=False)
        wait_workers_ready(live)
        return live

    def worker_of(self, worker_id: str | None) -> WorkerProcess | None:
        return next((w for w in self.workers if w.owns(worker_id)), None)

    def close(self) -> None:
        """Stop every child: SIGTERM to all at once, SIGKILL whatever is left after 3 s."""
        if self.http is not None:
            self.http.close()
        children = [*self.workers, *([self.api] if self.api else [])]
        for child in children:
            child.send(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
            child.stop()  # reaps and closes the log
        self.redis.close()
        self.redis_server.cleanup()

    def logs(self) -> str:
        return "\n".join(c.log_tail(1500) for c in [*([self.api] if self.api else []), *self.workers])

    # -- jobs --------------------------------------------------------------
    def submit(self, body: dict[str, Any], **headers: str) -> str:
        """POST /generate with ``Prefer: respond-async``; the new job's id."""
        response = self.http.post("/generate", json=body, headers={"Prefer": "respond-async", **headers})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Status of each job, read straight from its Redis hash (cheap to poll)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(KEYS.job(job_id), "status")
            values = pipe.execute()
        return {j: (v.decode() if v else None) for j, v in zip(job_ids, values)}

    def job_hash(self, job_id: str) -> dict[str, str]:
        return {k.decode(): v.decode(errors="replace") for k, v in self.redis.hgetall(KEYS.job(job_id)).items()}

    def wait_terminal(self, job_ids: list[str], timeout_s: float) -> dict[str, str | None]:
        """Wait until every job is terminal; an accepted job whose hash is gone fails at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.statuses(job_ids)
            if all(s in TERMINAL for s in statuses.values()):
                return statuses
            lost = [j for j, s in statuses.items() if s is None]
            if lost:
                raise AssertionError(f"{len(lost)} of {len(job_ids)} accepted jobs are gone (first {lost[0]})")
            if time.monotonic() > deadline:
                counts = Counter(statuses.values())
                raise AssertionError(f"jobs not finished within {timeout_s} s: {dict(counts)}\n{self.logs()}")
            time.sleep(0.1)

    def event_types(self, job_id: str) -> list[str]:
        """Types of every event on the job's stream, oldest first (what SSE replays)."""
        return [fields[b"type"].decode() for _id, fields in self.redis.xrange(KEYS.job_events(job_id))]

    def image_keys(self, job_id: str) -> list[str]:
        return sorted(k.decode() for k in self.redis.scan_iter(match=f"{KEYS.job(job_id)}:image:*", count=1000))

    def holders(self, job_ids: list[str], min_progress: int = 0) -> dict[str, str]:
        """job id -> worker id, for jobs currently running with at least
        ``min_progress`` sampling steps done."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(KEYS.job(job_id), "status", "worker", "progress_step")
            rows = pipe.execute()
        return {
            job_id: row[1].decode()
            for job_id, row in zip(job_ids, rows)
            if row[0] == b"running" and row[1] and int(row[2] or 0) >= min_progress
        }

    def running_in_progress(self, job_ids: list[str]) -> dict[str, str]:
        """Like :meth:`holders`, but only jobs that have made sampling progress."""
        return self.holders(job_ids, min_progress=1)


# --------------------------------------------------------------------- metrics


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` (exactly) whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def metric_names(text: str) -> set[str]:
    """Every sample name in a scrape (``_bucket``/``_sum``/``_count``/``_total`` as exposed)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@contextlib.contextmanager
def ediffi_serve(model_dir: Path, log_path: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 180):
    """``python -m ediffi serve`` on ``model_dir`` (EDIFFI_MODEL_DIR, loopback,
    no keys, as `make serve`); yields its base URL once /readyz answers 200."""
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    child_env.update(EDIFFI_MODEL_DIR=str(model_dir), EDIFFI_ALLOW_ANONYMOUS="true", **(env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ediffi", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ediffi serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ediffi serve not ready after {ready_timeout_s} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        stop_process(proc, timeout_s=20)
