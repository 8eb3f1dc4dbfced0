"""Pytest plugin: a real Redis for tests (no mocks), started from the ``redis-server`` binary.

Fixtures:

* ``redis_url`` (session): ``$EDIFFI_REDIS_URL`` if set, else a private
  ``redis-server`` on a free port, without persistence, stopped at the end.
* ``redis_key_prefix``: a fresh key prefix per test, so tests sharing one
  Redis never see each other's keys; its keys are deleted afterwards.
* ``restartable_redis``: a private server of the test's own that the test may
  stop and restart on the same port (Redis down -> 503 -> recovery tests).

Enable with ``pytest_plugins = ["tests.support.redis_server"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REDIS_URL_ENV = "EDIFFI_REDIS_URL"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout_s``; SIGKILL if it lingers; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

class RedisServerProcess:
    """One ``redis-server`` child process on a fixed port, which can be stopped and restarted.

    Persistence is off, so a restart comes back empty, like a crashed cache
    node: the queue must recreate its consumer group by itself.
    """

    def __init__(self, port: int | None = None, data_dir: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not on PATH; the queue tests need a real Redis. "
                "Install it (`apt-get install redis-server`) or set "
                f"{REDIS_URL_ENV}=redis://host:port/db to use a running one."
            )
        self.binary = binary
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ediffi-redis-"))
        self.extra_args = extra_args  # more redis-server options, e.g. ("--maxmemory", "2mb")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        if self.running:
            return
        log_file = self.data_dir / "redis.log"
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.data_dir),
                "--logfile", str(log_file),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        import redis  # here, not at import: the GPU tests load this plugin on machines without redis-py

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    log = log_file.read_text(errors="replace") if log_file.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{log[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout_s} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers) and wait for the port to close."""
        if self._process is None:
            return
        stop_process(self._process, timeout_s=5)
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop, then start again on the same port; the data is gone (no persistence)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis every test may share (use ``redis_key_prefix`` to stay apart)."""
    configured = os.environ.get(REDIS_URL_ENV)
    if configured:
        yield configured
        return
    server = RedisServerProcess()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; the test's keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    except redis.exceptions.ConnectionError:
        pass  # a test may leave its server stopped; nothing to clean then
    finally:
        client.close()


@pytest.fixture
def restartable_redis() -> Iterator[RedisServerProcess]:
    """A private Redis the test can ``stop()``, ``start()`` and ``restart()`` on the same port."""
    server = RedisServerProcess()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
