"""Process entry points: `ediffi api`, `ediffi worker`, `ediffi serve`.

Each builds what it needs from the one `Settings` object the CLI made.
`api` loads no model; `worker` loads the engine and serves its own /metrics
port; `serve` runs both in one process and one event loop (the in-process
queue unless EDIFFI_REDIS_URL is set). `api` and `serve` refuse to start
without API keys unless EDIFFI_ALLOW_ANONYMOUS=true, and say so when they
serve anonymously.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable

import uvicorn

from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)


def capabilities(model_dir: Path):
    """What the model can do, read from model.json (no torch), with the file's modification time as
    its ``created`` (stable while the model directory is unchanged, the same on every replica)."""
    from dataclasses import replace

    from ediffi.capabilities import model_capabilities
    from ediffi.config import MODEL_JSON, ModelConfig

    created = int((Path(model_dir) / MODEL_JSON).stat().st_mtime)
    return replace(model_capabilities(ModelConfig.load(model_dir)), created=created)


def build_engine(settings: Settings, model_dir: Path):
    from engines.engine import Engine

    return Engine.from_settings(settings, model_dir=model_dir).start()


EngineFactory = Callable[[Settings, Path], Any]


def quiet_progress_bars(*, load_models: bool) -> None:
    """No tqdm bars from the Hugging Face libraries in a service's log (transformers' "Loading weights"
    per encoder; diffusers' and huggingface_hub's while loading): a log is read line by line, not
    watched. The environment variable covers huggingface_hub, and transformers when imported after it;
    ``load_models`` (worker, serve) switches off transformers' and diffusers' own bars as well (they
    import torch, so the API process, which loads no model, gets the environment variable only).
    The CLI's interactive commands keep their bars."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not load_models:
        return
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            importlib.import_module(module).disable_progress_bar()
        except ImportError:  # pragma: no cover - both are dependencies
            pass


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop) -> None:
    """Call ``stop(signal name)`` on SIGTERM and SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop, sig.name)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass


def check_access(settings: Settings, host: str, port: int) -> None:
    """Exit (code 2, with the reason) on settings the API must not serve with; log the access mode."""
    from server.auth import ConfigurationError, check_access_settings

    try:
        check_access_settings(settings)
    except ConfigurationError as exc:
        refuse(str(exc))
    if settings.api_keys:
        log.info("API keys required on job endpoints (%d configured)", len(settings.api_keys))
    else:
        log.warning(
            "AUTHENTICATION IS OFF (EDIFFI_ALLOW_ANONYMOUS=true): anyone who reaches http://%s:%d may submit "
            "jobs; anonymous callers are rate-limited by client address (%d per minute). Set EDIFFI_API_KEYS "
            "before exposing this port.",
            host,
            port,
            settings.rate_limit_per_minute,
        )


def refuse(reason: str) -> None:
    """Stop a process before it serves (exit 2), with the reason as one line."""
    log.error("refusing to start: %s", reason)
    raise SystemExit(2)


def check_model_dir(model_dir: Path) -> None:
    """The model directory's model.json loads (no torch): a wrong EDIFFI_MODEL_DIR stops the process at once,
    not after minutes of loading or on the first request."""
    from pydantic import ValidationError

    from ediffi.config import ModelConfig

    try:
        ModelConfig.load(model_dir)
    except FileNotFoundError as exc:
        refuse(f"{exc} (--model-dir, else EDIFFI_MODEL_DIR)")
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        refuse(f"model directory {model_dir}: invalid model.json: {fields}")
    except (ValueError, OSError) as exc:
        refuse(f"model directory {model_dir}: unreadable model.json: {exc}")


def check_device(settings: Settings) -> None:
    """EDIFFI_DEVICE names a device this machine has, checked before the model loads."""
    if not settings.device.startswith("cuda"):
        return
    import torch

    index = int(settings.device.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        refuse(f"EDIFFI_DEVICE={settings.device}, but CUDA is not available on this machine (torch {torch.__version__})")
    if index >= torch.cuda.device_count():
        refuse(f"EDIFFI_DEVICE={settings.device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def run_api(settings: Settings, model_dir: Path, host: str, port: int) -> None:
    if not settings.redis_url:
        # The in-process queue of a lone API process has no worker: every job would wait forever.
        refuse("`ediffi api` needs EDIFFI_REDIS_URL, the queue its workers read "
               "(use `ediffi serve` for one process without Redis)")
    check_model_dir(model_dir)
    check_access(settings, host, port)
    quiet_progress_bars(load_models=False)
    asyncio.run(_api_main(settings, model_dir, host, port))


async def _api_main(settings: Settings, model_dir: Path, host: str, port: int) -> None:
    """Serve the API on a queue of its own (opened in this loop), whose counters its /metrics follows:
    the queued jobs the API cancels itself are counted there (server/metrics.py)."""
    from server.app import create_app
    from server.queue import make_queue

    metrics = Metrics(roles=("api",))
    queue = make_queue(settings)
    metrics.follow_queue_counters(queue.counters)
    await queue.warn_if_evicting()
    app = create_app(settings, queue=queue, metrics=metrics, capabilities=capabilities(model_dir))
    try:
        await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).serve()
    finally:
        await queue.close()


#: Exit status of a worker that gave up on its engine (too many engine failures in a row, or a stalled tick).
EXIT_ENGINE_UNHEALTHY = 3


def stop_engine(engine, worker) -> None:
    # A stalled engine's thread is stuck in a device call: joining it would hang the shutdown.
    engine.stop(drain=False, timeout=1.0 if worker.engine_stalled else None)


def exit_now_if_stalled(worker) -> None:
    """Exit at once after a stalled tick: the device thread never returns, and a normal interpreter exit
    waits for it (concurrent.futures joins its threads) for good."""
    if worker.engine_stalled:
        logging.shutdown()
        os._exit(EXIT_ENGINE_UNHEALTHY)


async def _worker_main(
    settings: Settings, model_dir: Path, host: str, metrics_port: int, engine_factory: EngineFactory
) -> bool:
    """Run a worker until it stops; True if it stopped healthy."""
    from prometheus_client import start_http_server

    from server.queue import make_queue
    from server.worker import Worker

    metrics = Metrics(roles=("worker",))  # the API's gauges would read 0 here (server/metrics.py)
    start_http_server(metrics_port, addr=host, registry=metrics.registry)
    log.info("worker metrics on http://%s:%d/metrics", host, metrics_port)
    engine = await asyncio.to_thread(engine_factory, settings, model_dir)
    queue = make_queue(settings)
    await queue.warn_if_evicting()
    worker = Worker(settings, queue, engine, metrics)
    _install_signal_handlers(asyncio.get_running_loop(), worker.stop)
    log.info("worker %s ready (engine %s)", worker.worker_id, engine.name)
    try:
        await worker.run()
    finally:
        stop_engine(engine, worker)
        await queue.close()
        log.info("worker %s stopped", worker.worker_id)
    exit_now_if_stalled(worker)
    return not worker.unhealthy


def run_worker(
    settings: Settings, model_dir: Path, metrics_port: int, engine_factory: EngineFactory = build_engine
) -> None:
    """Run ``ediffi worker``; exits with :data:`EXIT_ENGINE_UNHEALTHY` if it gave up on its engine.
    ``engine_factory(settings, model_dir)`` builds and starts the engine (tests inject faults there)."""
    if not settings.redis_url:
        refuse("`ediffi worker` needs EDIFFI_REDIS_URL (use `ediffi serve` for one process without Redis)")
    check_model_dir(model_dir)
    check_device(settings)
    quiet_progress_bars(load_models=True)
    if not asyncio.run(_worker_main(settings, model_dir, settings.host, metrics_port, engine_factory)):
        raise SystemExit(EXIT_ENGINE_UNHEALTHY)


async def _serve_main(settings: Settings, model_dir: Path, host: str, port: int) -> None:
    from server.app import create_app
    from server.queue import make_queue
    from server.worker import Worker

    metrics = Metrics(roles=("api", "worker"))  # one process, one registry, both roles
    engine = await asyncio.to_thread(build_engine, settings, model_dir)
    queue = make_queue(settings)
    await queue.warn_if_evicting()
    worker = Worker(settings, queue, engine, metrics)
    app = create_app(settings, queue=queue, metrics=metrics, capabilities=capabilities(model_dir))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    worker_task = asyncio.create_task(worker.run())
    # A worker that gave up on its engine takes the server down with it (restarted from outside).
    worker_task.add_done_callback(lambda _task: setattr(server, "should_exit", True))
    try:
        await server.serve()  # returns on SIGINT/SIGTERM (uvicorn's handlers)
    finally:
        worker.stop("server shutdown")
        await worker_task
        stop_engine(engine, worker)
        await queue.close()
        log.info("worker %s stopped", worker.worker_id)
    exit_now_if_stalled(worker)
    if worker.unhealthy:
        raise SystemExit(EXIT_ENGINE_UNHEALTHY)


def run_serve(settings: Settings, model_dir: Path, host: str, port: int) -> None:
    check_model_dir(model_dir)  # all before the model loads
    check_device(settings)
    check_access(settings, host, port)
    quiet_progress_bars(load_models=True)
    asyncio.run(_serve_main(settings, model_dir, host, port))
