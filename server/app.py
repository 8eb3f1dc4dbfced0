"""The HTTP API: ``create_app(settings, queue=None)`` builds the FastAPI application.

No model is loaded and no torch is imported here: the API validates
requests, queues them (:mod:`server.queue`) and relays results; workers do
the generation.

Endpoints (docs/architecture.md §4; OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /generate``: sync by default (200 with images), ``Prefer: respond-async`` -> 202
  ``{id, status, links}``; ``Idempotency-Key`` honoured.
* ``GET /jobs/{id}``, ``GET /jobs/{id}/images/{k}.png``, ``GET /jobs/{id}/events`` (SSE),
  ``POST /jobs/{id}/cancel``.
* ``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart; inpainting): the
  OpenAI-compatible subset. ``/sdapi/v1/*``: A1111's txt2img and img2img (with a mask: inpainting).
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics``; ``GET /`` serves ``server/static/``
  when that folder exists (the web UI).

Errors: 422/413 field-level (``{"detail": [{"loc", "msg", "type"}]}``), 401/403
API keys, 404 unknown job, 429 with ``Retry-After`` (queue full, rate limit),
503 with ``Retry-After`` when the queue backend is down (``{"detail": "job
queue unavailable: ..."}``, a generic reason: the details go to the log only);
the queue reconnects by itself, so the API recovers without a restart. Bad
input never yields a 500. 415 for a body on a JSON endpoint that is not sent as
``application/json``. Under ``/v1/`` every error also carries OpenAI's
``{"error": {"message", "type", "param", "code"}}`` beside ``detail`` (:class:`OpenAIErrors`).

Access (see README "Security model"): :func:`create_app` refuses settings without
API keys unless ``allow_anonymous`` is on (:func:`server.auth.check_access_settings`).

Usage::

    app = create_app(Settings())                    # opens make_queue(settings) in its lifespan
    app = create_app(settings, queue=queue)         # embedded serve: share the worker's queue
    app = create_app(settings, queue=q, metrics=m)  # and its Metrics (one registry per process)
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ediffi.capabilities import ModelCapabilities, SizeRule
from server.auth import WaitSlots, caller, check_access_settings, limit_key_of
from server.metrics import Metrics
from server.middleware import HTTPMetricsMiddleware, InflightLimit, RequestGuard
from server.queue import JobQueue, QueueFull, QueueUnavailable, make_queue
from server.routes import a1111, generate, jobs, models, ops
from server.routes.jobs import QUEUE_UNAVAILABLE_DETAIL, UNAVAILABLE_RETRY_AFTER_S
from server.settings import Settings
from server.validation import PayloadTooLarge

#: The shipped model's output canvas (square); pass ``canvas_size`` for another model.
DEFAULT_CANVAS_SIZE = 64
STATIC_DIR = Path(__file__).parent / "static"
_MAX_ECHOED_INPUT_CHARS = 200
#: Endpoints every probe and scraper must reach however busy the API is.
OPERATIONS_PATHS = ("/healthz", "/readyz", "/metrics")
JSON_PATHS = ("/generate", "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")
#: Endpoints whose body is multipart/form-data (OpenAI's image edits, files as parts).
FORM_PATHS = ("/v1/images/edits",)

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """JSON rendered ASCII-only and without NaN: any text (lone surrogates included) can be echoed."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def sanitize_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI-format errors made safe to echo: short scalar inputs only, JSON-able ctx."""
    clean: list[dict[str, Any]] = []
    for error in errors:
        item: dict[str, Any] = {
            "loc": [part if isinstance(part, (int, str)) else str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        if "input" in error:
            value = error["input"]
            if isinstance(value, str):
                if len(value) <= _MAX_ECHOED_INPUT_CHARS:
                    item["input"] = value
            elif value is None or isinstance(value, (bool, int, float)):
                item["input"] = _scalar(value)
        ctx = error.get("ctx")
        if isinstance(ctx, dict) and ctx:
            item["ctx"] = {str(key): _scalar(value) for key, value in ctx.items()}
        clean.append(item)
    return clean


def max_body_bytes(settings: Settings) -> int:
    """Largest accepted request body: as many base64 images at the limit as one request carries (style
    image, colour map, init image and its mask) plus room for the JSON around them."""
    per_image = 4 * (settings.max_image_bytes // 3 + 1) + 1024
    return 4 * per_image + 64 * 1024 + 16 * settings.max_prompt_chars


def _register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return SafeJSONResponse({"detail": sanitize_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 when a body is not decodable at all (e.g. not
        # UTF-8); the API's contract for unreadable input is a field-level 422.
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            error = {"loc": ["body"], "msg": "the body is not valid JSON text (UTF-8)", "type": "json_invalid"}
            return SafeJSONResponse({"detail": [error]}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's input: JSON like every other answer (Starlette's default is
        # plain text), nothing of the exception shown; Starlette re-raises it to be logged.
        return SafeJSONResponse({"detail": "internal server error"}, status_code=500)

    @app.exception_handler(PayloadTooLarge)
    async def payload_too_large(_request: Request, exc: PayloadTooLarge) -> JSONResponse:
        return SafeJSONResponse({"detail": sanitize_errors(exc.errors())}, status_code=413)

    @app.exception_handler(QueueUnavailable)
    async def queue_unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
        log.warning("%s %s: 503, job queue unavailable: %s", request.method, request.url.path, exc)
        return SafeJSONResponse(
            {"detail": QUEUE_UNAVAILABLE_DETAIL},
            status_code=503,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
        return SafeJSONResponse(
            {"detail": f"{exc}; retry later"},
            status_code=429,
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        )


#: Paths whose errors are answered in OpenAI's shape (:class:`OpenAIErrors`).
OPENAI_PATH_PREFIX = "/v1/"
#: ``error.code`` of an OpenAI-shaped error that names no field and no failure kind, by status.
_OPENAI_CODES = {
    401: "invalid_api_key", 403: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
    409: "job_canceled", 410: "gone", 413: "too_large", 415: "unsupported_media_type", 429: "rate_limit_exceeded",
    500: "internal", 503: "service_unavailable", 504: "timeout",
}


def _dotted(loc: Any) -> str | None:
    """A validation ``loc`` as a dotted field name, without its source: ``["body", "a", 0, "b"]`` -> ``a[0].b``."""
    parts = list(loc) if isinstance(loc, (list, tuple)) else []
    if parts and parts[0] in ("body", "header", "query", "path"):
        parts = parts[1:]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def openai_error(status_code: int, body: Any) -> dict[str, Any]:
    """An error body of this API in OpenAI's shape ``{"error": {message, type, param, code}}``.

    ``body`` is ``{"detail": ...}`` as the rest of the API answers: field errors (every one in the
    message, the first one's field as ``param`` and type as ``code``), a string, or a dict with
    ``message`` and optionally ``param`` and ``code``; a failed job's ``kind`` is the code."""
    detail = body.get("detail") if isinstance(body, dict) else body
    try:
        message = HTTPStatus(status_code).phrase
    except ValueError:  # 499 and the like
        message = "error"
    param, code = None, _OPENAI_CODES.get(status_code)
    if isinstance(detail, list) and detail and all(isinstance(error, dict) for error in detail):
        parts = []
        for error in detail:
            name = _dotted(error.get("loc"))
            parts.append(f"{name}: {error.get('msg', '')}" if name else str(error.get("msg", "")))
        message, param, code = "; ".join(parts), _dotted(detail[0].get("loc")), str(detail[0].get("type") or code)
    elif isinstance(detail, dict) and "message" in detail:
        message, param, code = str(detail["message"]), detail.get("param"), detail.get("code", code)
    elif isinstance(detail, str) and detail:
        message = detail
    if isinstance(body, dict) and body.get("kind"):
        code = str(body["kind"])
    kind = "server_error" if status_code >= 500 else "rate_limit_error" if status_code == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIErrors:
    """Answers every error on ``/v1/*`` in OpenAI's shape (:func:`openai_error`), whoever produced
    it: a route, an exception handler, or a middleware refusal before routing (the in-flight limits'
    429/503, the guard's 401/403/408/413/415), with the API's own ``detail`` kept beside ``error``.
    Other paths answer ``{"detail": ...}`` only; a body already in OpenAI's shape, and HEAD, pass as
    they are. Pure ASGI; only error bodies are buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD" or not scope["path"].startswith(OPENAI_PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        answered = False

        async def send_openai_errors(message: Message) -> None:
            nonlocal start, answered
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                answered = True
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            raw = b"".join(chunks)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"detail": raw.decode("utf-8", "replace").strip()}
            if not (isinstance(body, dict) and "error" in body):
                # OpenAI's clients read ``error``; the API's own contract (DESIGN.md: field-level ``detail``,
                # a failed job's ``kind``) stays beside it, so neither kind of client loses anything.
                own = body if isinstance(body, dict) else {"detail": body}
                raw = SafeJSONResponse({**own, **openai_error(start["status"], body)}).body
            headers = [
                (name, value) for name, value in start.get("headers", [])
                if name.lower() not in (b"content-length", b"content-type")
            ]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
            answered = True
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": raw})

        try:
            await self.app(scope, receive, send_openai_errors)
        except Exception:
            # An unhandled error reaches Starlette's outermost handler, outside this wrapper: its
            # 500 would not be in OpenAI's shape, so it is answered here (the handler then sees a
            # started response, sends nothing, and the error is still raised to be logged).
            if not answered:
                answered = True
                raw = SafeJSONResponse({"detail": "internal server error", **openai_error(500, None)}).body
                await send({
                    "type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
                })
                await send({"type": "http.response.body", "body": raw})
            raise


def _limits_in_openapi(app: FastAPI, settings: Settings) -> None:
    """Show the configured limits (max n, steps, prompt length, regions) in ``/openapi.json``."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.get("components", {}).get("schemas", {})
        bounds = {
            "prompt": {"maxLength": settings.max_prompt_chars},
            "negative_prompt": {"maxLength": settings.max_prompt_chars},
            "n": {"maximum": settings.max_n},
            "steps": {"maximum": settings.max_steps},
        }
        for name in ("GenerateRequest", "OpenAIImagesRequest"):
            properties = components.get(name, {}).get("properties", {})
            for field_name, extra in bounds.items():
                if field_name in properties:
                    properties[field_name].update(extra)
        regions = components.get("PaintWithWords", {}).get("properties", {}).get("regions")
        if regions is not None:
            regions["maxItems"] = settings.max_regions
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class WebUIMount(Mount):
    """The web UI's static files at ``/`` (read with GET or HEAD only), yielding to an API path asked
    with another method.

    A mount at ``/`` matches every path fully, so Starlette would hand ``GET /generate``
    to the static files (404) instead of answering 405 with ``Allow: POST``, and
    ``POST /no/such/path`` to them (405, ``Allow: GET, HEAD``) instead of answering 404.
    """

    def __init__(self, app: StaticFiles, api_routes: list[BaseRoute]) -> None:
        super().__init__("/", app=app, name="static")
        self._api_routes = api_routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("method") not in ("GET", "HEAD"):
            return Match.NONE, {}
        if any(route.matches(scope)[0] is Match.PARTIAL for route in self._api_routes if route is not self):
            return Match.NONE, {}
        return super().matches(scope)


def create_app(
    settings: Settings,
    queue: JobQueue | None = None,
    *,
    metrics: Metrics | None = None,
    canvas_size: int = DEFAULT_CANVAS_SIZE,
    capabilities: ModelCapabilities | None = None,
    key_prefix: str | None = None,
    static_dir: Path | None = STATIC_DIR,
) -> FastAPI:
    """Build the API (:class:`~server.auth.ConfigurationError` for settings it must not serve with).

    ``queue``: use this queue (not closed on shutdown); None: the lifespan opens
    ``make_queue(settings, key_prefix=key_prefix)`` and closes it at shutdown.
    ``metrics``: share a :class:`Metrics` (embedded serve); None: a fresh registry of the API's metrics only.
    ``capabilities``: the loaded model's (``GET /v1/models``, and the size and
    style checks of a request); None: a model of the shipped family with a
    square ``canvas_size`` canvas.
    ``static_dir``: mounted at ``/`` if it exists.
    """
    if capabilities is None:
        capabilities = ModelCapabilities(id="ediffi", sizes=SizeRule(canvas_size, canvas_size, True, canvas_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.queue is None
        if owned:
            app.state.queue = make_queue(settings, key_prefix=key_prefix)
        try:
            yield
        finally:
            if owned and app.state.queue is not None:
                await app.state.queue.close()
                app.state.queue = None

    check_access_settings(settings)
    app = FastAPI(
        title="eDiff-I serving",
        version="0.1.0",
        description="Text-to-image generation with an ensemble of expert denoisers (eDiff-I). "
        "Jobs are queued and run by workers; see /docs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.queue = queue
    app.state.metrics = metrics if metrics is not None else Metrics(roles=("api",))
    app.state.capabilities = capabilities
    app.state.wait_slots = WaitSlots(settings.max_streams_per_key)

    _register_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(a1111.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(models.router)
    if static_dir is not None and Path(static_dir).is_dir():
        app.router.routes.append(WebUIMount(StaticFiles(directory=static_dir, html=True), api_routes=app.router.routes))

    # Outermost last: metrics see every response, the guards' 401/413/415/503 included.
    app.add_middleware(
        RequestGuard,
        max_body_bytes=max_body_bytes(settings),
        json_paths=JSON_PATHS,
        form_paths=FORM_PATHS,
        check_caller=lambda request: caller(request, settings),
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(
        InflightLimit,
        limit=settings.max_inflight_requests,
        exempt_paths=OPERATIONS_PATHS,
        per_caller=settings.max_inflight_per_caller,
        identify_caller=lambda request: limit_key_of(request, settings),
    )
    app.add_middleware(OpenAIErrors)  # outside the refusals above, so /v1/* gets OpenAI's shape from them too
    app.add_middleware(HTTPMetricsMiddleware, metrics=app.state.metrics)
    _limits_in_openapi(app, settings)
    return app
