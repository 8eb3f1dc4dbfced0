"""Service settings: one pydantic-settings class, read from ``EDIFFI_*`` variables.

Build it once at the process edge (``Settings()`` in the CLI) and pass it, or
the values it holds, down. Nothing else in the code base reads ``os.environ``:
that keeps every component testable with explicit arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ediffi import spec


class Settings(BaseSettings):
    """Every tunable of the API, the worker and the embedded server."""

    model_config = SettingsConfigDict(
        env_prefix="EDIFFI_",
        env_file=None,
        extra="ignore",
        validate_default=True,
    )

    # --- Queue backend -------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for the job queue (redis://host:port/db). "
        "Unset: the in-process queue (embedded `ediffi serve` only).",
    )

    # --- Model and runtime ---------------------------------------------------
    model_dir: Path | None = Field(
        default=None,
        description="Model directory (model.json, safetensors, tokenizers). "
        "Unset: the caller resolves the repository's models/default.",
    )
    backend: Literal["torch", "onnxruntime", "tensorrt"] = Field(
        default="torch", description="Runtime that executes the denoisers."
    )
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description='Device: "cpu", "cuda" or "cuda:N".',
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Compute dtype of the denoisers."
    )
    onnx_dir: Path | None = Field(
        default=None, description="Directory of exported ONNX graphs and their manifest."
    )
    tensorrt_dir: Path | None = Field(
        default=None, description="Directory of built TensorRT engines and their manifest."
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="CPU threads per operator (torch/onnxruntime); unset: runtime default."
    )

    # --- Engine and batching -------------------------------------------------
    max_batch: int = Field(default=16, ge=1, description="Largest batch of denoiser rows per forward pass.")
    max_active_requests: int = Field(
        default=32, ge=1, description="Most requests the engine keeps in flight at once."
    )
    batching_policy: Literal["step", "request", "none"] = Field(
        default="step",
        description="step: regroup per denoiser evaluation; request: whole requests; none: one at a time.",
    )
    max_rows_per_tick: Literal["auto"] | int | None = Field(
        default="auto",
        description="step policy: most denoiser rows run per tick. auto: the largest batch any expert is still "
        "cheapest per row at, from the cost model measured at warmup; unset/none: no cap below max_batch.",
    )
    worker_slots: int = Field(
        default=8,
        ge=1,
        description="Upper bound on the jobs one worker holds at once (also the KEDA target per worker). How many "
        "it claims is decided by the engine: what its scheduler can still admit (max_active_requests).",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0,
        description="On SIGTERM, how long a worker lets its running jobs finish before releasing the rest to the queue.",
    )
    compile_mode: Literal["none", "cuda_graphs", "torch_compile"] = Field(
        default="none",
        description="torch backend on CUDA: a CUDA graph per batch bucket, or torch.compile per expert; none: eager.",
    )
    trt_batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="TensorRT batch buckets, e.g. 1,2,4,8,16 (largest = max_batch); empty: powers of two up to max_batch.",
    )

    # --- Access control and limits ------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys. The variable may be a comma-separated list or a JSON array. "
        "Empty: the API refuses to start unless allow_anonymous is on.",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without API keys (anyone who reaches the port may submit jobs; they are "
        "rate-limited by client address). Only for a local `make serve`; ignored when api_keys is set.",
    )
    rate_limit_per_minute: int = Field(
        default=60, ge=1, description="Job submissions per minute per API key (per client address when anonymous)."
    )
    max_streams_per_key: int = Field(
        default=8,
        ge=1,
        description="Open event streams plus synchronous waits one API key (or anonymous client address) may "
        "hold at once on one API process; beyond: 429 with Retry-After.",
    )
    max_inflight_requests: int = Field(
        default=256,
        ge=1,
        description="Requests one API process serves at once (streams and waits included; /healthz, /readyz "
        "and /metrics are not counted); beyond: 503 with Retry-After.",
    )
    max_inflight_per_caller: int = Field(
        default=64,
        ge=1,
        description="Of the max_inflight_requests of one API process, how many one API key (or anonymous client "
        "address) may hold at once, uploads, streams and waits included, so that one caller cannot take every "
        "slot from the others; beyond: 429 with Retry-After, before the body is read. Keep it at least "
        "max_streams_per_key.",
    )
    redis_max_connections: int = Field(
        default=64,
        ge=1,
        description="Redis connections of one process for ordinary commands; a command waits for a free one "
        "(up to redis_pool_timeout_s) instead of failing.",
    )
    redis_blocking_connections: int = Field(
        default=32,
        ge=1,
        description="Separate Redis connections for blocking event reads (event streams, synchronous waits), "
        "so that however many are open, ordinary requests and health checks keep theirs.",
    )
    redis_pool_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest a command waits for a free Redis connection before a 503."
    )
    redis_command_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Longest wait for a Redis reply (beyond a blocking read's own block time) before the call "
        "fails as unavailable (503): a Redis that hangs, not only one that is down, gets an answer.",
    )
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Public URL of the API (https://images.example.com), used for absolute image URLs; "
        "unset: URLs are relative (the request's Host header is never used).",
    )
    max_queue: int = Field(
        default=256, ge=1, description="Queue depth (queued + in flight) at which submissions get 429."
    )
    sync_timeout_s: float = Field(
        default=300, gt=0, description="How long a synchronous POST /generate waits for its job."
    )
    max_prompt_chars: int = Field(default=spec.DEFAULT_MAX_PROMPT_CHARS, ge=1, description="Longest accepted prompt.")
    max_n: int = Field(default=spec.DEFAULT_MAX_N, ge=1, description="Most images per request.")
    max_steps: int = Field(default=spec.DEFAULT_MAX_STEPS, ge=1, description="Most sampling steps per request.")
    max_image_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="Largest decoded upload (style image, color map), bytes."
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0,
        description="How long a client may take to send a whole request body (408 after): a slow or stalled body "
        "would otherwise hold one of the max_inflight_requests slots for as long as the connection stays open.",
    )
    max_image_pixels: int = Field(default=1024 * 1024, ge=1, description="Largest upload, width*height.")
    max_regions: int = Field(default=spec.DEFAULT_MAX_REGIONS, ge=1, description="Most paint-with-words regions per request.")
    max_image_side: int = Field(
        default=2048, ge=8, description="Largest width or height a request may ask of a model that takes sizes."
    )

    # --- Job lifecycle -------------------------------------------------------
    result_ttl_s: float = Field(
        default=3600, gt=0, description="How long a finished job, its images and events are kept."
    )
    claim_timeout_s: float = Field(
        default=60,
        gt=0,
        description="A claimed job idle this long (its worker stopped renewing it) is reclaimed by another worker.",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="Deliveries of one job before it is failed instead of retried."
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0, description="How often a worker reports it is alive.")
    heartbeat_ttl_s: float = Field(
        default=10, gt=0, description="A worker whose heartbeat is older than this counts as gone."
    )

    # --- Queue budgets and failure handling (Redis memory, fairness, broken devices) ---
    max_queued_input_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Bytes of uploaded inputs (style images, colour maps) the unfinished jobs may hold in Redis "
        "together; a submission beyond it gets 429. Keep it well under Redis's maxmemory.",
    )
    max_stored_result_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes of result images finished jobs may hold in Redis together (each for result_ttl_s); "
        "while they exceed it, submissions get 429 with Retry-After until the oldest expire. Keep it plus "
        "max_queued_input_bytes well under Redis's maxmemory.",
    )
    max_unfinished_per_key: int = Field(
        default=64,
        ge=1,
        description="Unfinished jobs (queued + running) one API key (or anonymous client) may have; beyond: 429.",
    )
    max_job_age_s: float = Field(
        default=24 * 3600,
        gt=0,
        description="An unfinished job (its record, events, inputs and Idempotency-Key) expires this long after "
        "submission: the bound on how long an unserved job holds Redis memory.",
    )
    engine_stall_timeout_s: float = Field(
        default=600.0, gt=0,
        description="A worker whose engine has been inside one tick this long (a device call that never returns: "
        "a hung GPU) gives its jobs back and exits non-zero, for its orchestrator to restart it. Raise it when "
        "one batch of a large model on a slow device can take longer.",
    )
    max_consecutive_engine_failures: int = Field(
        default=5,
        ge=1,
        description="Engine failures in a row (internal, out_of_memory) after which a worker stops claiming "
        "and exits non-zero, for its orchestrator to restart it.",
    )

    # --- Network -------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the HTTP API binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the HTTP API.")
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="Port of a standalone worker's /metrics endpoint."
    )

    @model_validator(mode="after")
    def _timeouts_outlast_heartbeats(self) -> Settings:
        # A worker renews its claims and heartbeat every heartbeat interval: a timeout no longer than one
        # interval takes jobs from, or declares dead, a healthy worker between two renewals (keep a margin:
        # the defaults are 30x and 5x).
        for name in ("claim_timeout_s", "heartbeat_ttl_s"):
            if getattr(self, name) <= self.heartbeat_interval_s:
                raise ValueError(
                    f"EDIFFI_{name.upper()} ({getattr(self, name):g} s) must be longer than "
                    f"EDIFFI_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g} s)"
                )
        return self

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: object) -> object:
        """A URL redis-py can open (``redis://``, ``rediss://``, ``unix://``), checked here so a typo is one
        line at start-up instead of a failure after the model has loaded. Empty means unset. The message
        never repeats the URL: it may hold a password."""
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str):
            parts = urlsplit(value.strip())
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError("not a Redis URL: it must start with redis://, rediss:// or unix://")
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number in range
            except ValueError:
                raise ValueError("the port of the Redis URL is not a number from 0 to 65535") from None
            if parts.scheme == "unix" and not parts.path:
                raise ValueError("the Redis URL names no socket path (unix:///path/to/redis.sock)")
            return value.strip()
        return value

    @field_validator("max_rows_per_tick", mode="before")
    @classmethod
    def _rows_per_tick(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("allow_anonymous", mode="before")
    @classmethod
    def _empty_flag_is_off(cls, value: object) -> object:
        """``EDIFFI_ALLOW_ANONYMOUS=`` (set but empty) means off, like unset."""
        return False if isinstance(value, str) and not value.strip() else value

    @field_validator("public_base_url", mode="before")
    @classmethod
    def _empty_url_is_unset(cls, value: object) -> object:
        """``EDIFFI_PUBLIC_BASE_URL=`` (as compose passes an unset variable) means no public URL."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trt_batch_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        """Accept ``"k1,k2"`` and ``'["k1","k2"]'`` from the environment, and lists from code."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


def settings_reference() -> str:
    """``docs/settings.md``: every ``EDIFFI_*`` variable with its default and meaning, from the class
    itself (``python -m server.settings > docs/settings.md``; a test keeps the file in step)."""
    lines = [
        "# Settings",
        "",
        "Environment variables of `ediffi api`, `ediffi worker` and `ediffi serve` (one pydantic-settings class,",
        "`server/settings.py`; generated from it by `python -m server.settings > docs/settings.md`). An invalid",
        "value stops the process at start with one line naming the variable.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None or default == []:
            shown = "unset"
        elif isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = str(default)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `EDIFFI_{name.upper()}` | `{shown}` | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
