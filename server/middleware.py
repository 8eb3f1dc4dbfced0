"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer Server-Sent Events).

* :class:`HTTPMetricsMiddleware`: ``ediffi_http_requests_total{endpoint,method,status}``
  and ``ediffi_http_request_duration_seconds{endpoint}``. Every label value comes
  from a fixed set, whatever the request says: ``endpoint`` is the matched route's
  *template* (``/jobs/{job_id}``), ``"unmatched"`` otherwise; ``method`` is one of
  :data:`KNOWN_METHODS`, else ``"other"``; ``status`` a registered HTTP status code,
  else its class (``"5xx"``).
* :class:`InflightLimit`: at most ``limit`` requests in flight at once (event streams
  included); beyond, 503 with ``Retry-After`` at once. The probes and ``/metrics``
  are not counted, so they answer however busy the API is. And at most ``per_caller``
  of them from one caller (named from the headers alone, before any byte of a body is
  read); beyond, 429 with ``Retry-After``, so one caller's slow uploads or open
  streams cannot take every slot from the others.
* :class:`RequestGuard`, on the first read of a request body (before any byte of it is
  read): the caller's key (401/403), ``Content-Type: application/json`` on the JSON
  endpoints (415 for anything else: ``text/plain`` and form bodies are what a foreign
  web page can send without a CORS preflight; ``multipart/form-data`` on OpenAI's edits, whose
  callers authenticate by header, which such a page cannot set), and a hard cap on the body (413 when
  ``Content-Length`` says so, or as soon as a streamed body passes it), and a deadline for
  the whole body (408: a slow or stalled body cannot hold an in-flight slot). Raised where
  the endpoint reads its body, so each is counted under the endpoint's route.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import time
from collections import Counter
from http import HTTPStatus
from typing import Callable, Hashable, Iterable

from fastapi import HTTPException, status
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics

_UNMATCHED = "unmatched"
#: The only values of the ``method`` label besides ``"other"``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_KNOWN_STATUS_CODES = frozenset(code.value for code in HTTPStatus) | {499}


def method_label(method: str | None) -> str:
    return method if method in KNOWN_METHODS else "other"


def status_label(code: int) -> str:
    return str(code) if code in _KNOWN_STATUS_CODES else f"{max(0, min(code // 100, 9))}xx"


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            if route is None:
                endpoint = _UNMATCHED
            else:  # the template without convertors: "/jobs/{job_id}/images/{index}.png"
                endpoint = getattr(route, "path_format", None) or getattr(route, "path", None) or "/"
            self.metrics.http_requests.labels(
                endpoint=endpoint, method=method_label(scope.get("method")), status=status_label(status_code)
            ).inc()
            self.metrics.http_request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - started)


async def _send_json(send: Send, code: int, body: dict[str, object], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": code, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class InflightLimit:
    """At most ``limit`` requests in flight; the rest get 503 + ``Retry-After`` without waiting.

    With ``per_caller`` and ``identify_caller``: at most ``per_caller`` of them from one caller; its
    next gets 429 + ``Retry-After`` without waiting, and other callers are unaffected.
    ``identify_caller(request)`` names the caller from the request's headers (no body is read), or
    returns None for a request counted only against ``limit`` (one refused with 401/403 anyway).
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        exempt_paths: Iterable[str] = (),
        retry_after_s: int = 1,
        per_caller: int | None = None,
        identify_caller: Callable[[Request], Hashable | None] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt_paths = frozenset(exempt_paths)
        self.retry_after_s = retry_after_s
        self.per_caller = per_caller
        self.identify_caller = identify_caller
        self.inflight = 0
        #: Requests in flight per caller; a caller with none has no entry.
        self.by_caller: Counter[Hashable] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        name = None
        if self.per_caller is not None and self.identify_caller is not None:
            name = self.identify_caller(Request(scope))
        if name is not None and self.by_caller[name] >= self.per_caller:
            await _send_json(
                send,
                status.HTTP_429_TOO_MANY_REQUESTS,
                {"detail": f"too many requests in flight: at most {self.per_caller} at once per API key "
                 "(per client address without keys); retry when one of yours has finished"},
                {"Retry-After": str(self.retry_after_s)},
            )
            return
        if self.inflight >= self.limit:
            await _send_json(
                send,
                status.HTTP_503_SERVICE_UNAVAILABLE,
                {"detail": f"server busy: {self.limit} requests in flight; retry later"},
                {"Retry-After": str(self.retry_after_s)},
            )
            return
        self.inflight += 1
        if name is not None:
            self.by_caller[name] += 1
        try:
            await self.app(scope, receive, send)
        finally:  # whatever ended the request: response sent, error, disconnect, body deadline, cancellation
            self.inflight -= 1
            if name is not None:
                self.by_caller[name] -= 1
                if self.by_caller[name] <= 0:
                    del self.by_caller[name]


class _RefusedBody(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions from body reading; the handler answers."""


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters such as charset allowed)."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def is_form_data_content_type(value: str | None) -> bool:
    """``multipart/form-data`` (with its boundary parameter)."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    return message.get_content_type() == "multipart/form-data"


def content_encoding_refusal(encoding: str | None, kind: str) -> HTTPException | None:
    """The 415 for a body in a Content-Encoding this server does not decode (RFC 9110 15.5.16), else None."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    return _RefusedBody(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail=f"Content-Encoding {encoding[:40]!r} is not accepted: send the {kind} body uncompressed",
        headers={"Accept-Encoding": "identity"},
    )


def form_data_refusal(content_type: str | None, content_encoding: str | None) -> HTTPException | None:
    """The 415 for a body that must be ``multipart/form-data`` and is not (or is compressed), else None.
    Raised by the endpoint itself: a form reader does not read a body of another type, so this guard
    never sees it."""
    if not is_form_data_content_type(content_type):
        return _RefusedBody(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"the body must be sent as 'Content-Type: multipart/form-data' (got {(content_type or 'none')[:100]!r})",
            headers={"Accept-Post": "multipart/form-data"},
        )
    return content_encoding_refusal(content_encoding, "multipart/form-data")


def _body_refusal(
    status_code: int, message: str, kind: str, ctx: dict, headers: dict[str, str] | None = None
) -> _RefusedBody:
    """A refusal of the request body, in the 422 detail shape (``loc`` body)."""
    detail = [{"loc": ["body"], "msg": message, "type": kind, "ctx": ctx}]
    return _RefusedBody(status_code, detail=detail, headers=headers)


class RequestGuard:
    """Checks a request before its body is read: caller (``check_caller``; on ``json_paths`` and
    ``form_paths``), JSON content type (on ``json_paths``), size."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        json_paths: Iterable[str] = (),
        form_paths: Iterable[str] = (),
        check_caller: Callable[[Request], object] | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        """``check_caller(request)`` raises an HTTPException (401/403) for a caller to refuse.
        ``body_timeout_s``: the whole body must arrive within this long of its first read (else 408), so a
        client that sends a body slowly, or never finishes it, cannot hold an in-flight slot for good."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.json_paths = frozenset(json_paths)
        self.form_paths = frozenset(form_paths)
        self.check_caller = check_caller

    def _too_large(self) -> _RefusedBody:
        return _body_refusal(
            413, f"request body is larger than {self.max_body_bytes} bytes", "too_large",
            {"max_bytes": self.max_body_bytes},
        )

    def _too_slow(self) -> _RefusedBody:
        return _body_refusal(
            status.HTTP_408_REQUEST_TIMEOUT, f"request body not received within {self.body_timeout_s:g} s", "timeout",
            {"timeout_s": self.body_timeout_s}, headers={"Connection": "close"},
        )

    def _refusal(self, scope: Scope) -> HTTPException | None:
        """Why this request's body must not be read (checked on the first read), or None."""
        request = Request(scope)
        if self.check_caller is not None and scope.get("path") in self.json_paths | self.form_paths:
            try:
                self.check_caller(request)
            except HTTPException as exc:
                return _RefusedBody(exc.status_code, detail=exc.detail, headers=exc.headers)
        if scope.get("method") == "POST" and scope.get("path") in self.json_paths:
            content_type = request.headers.get("content-type")
            if not is_json_content_type(content_type):
                return _RefusedBody(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    detail=f"the body must be JSON sent as 'Content-Type: application/json' "
                    f"(got {(content_type or 'none')[:100]!r})",
                    headers={"Accept-Post": "application/json"},
                )
            refusal = content_encoding_refusal(request.headers.get("content-encoding"), "JSON")
            if refusal is not None:
                return refusal
        try:
            content_length = int(request.headers.get("content-length", ""))
        except ValueError:
            content_length = None
        if content_length is not None and content_length > self.max_body_bytes:
            return self._too_large()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # no endpoint here reads another method's body
            return
        received = 0
        checked = False
        body_deadline: float | None = None  # loop time by which the body must have arrived; None: no deadline

        async def guarded_receive() -> Message:
            nonlocal received, checked, body_deadline
            if not checked:  # the first read: refuse before a byte of the body is read
                refusal = self._refusal(scope)
                if refusal is not None:
                    raise refusal
                checked = True
                if self.body_timeout_s is not None:
                    body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s
            try:
                async with asyncio.timeout_at(body_deadline):  # None once the body is in (later reads: a disconnect)
                    message = await receive()
            except TimeoutError:
                raise self._too_slow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
                if not message.get("more_body", False):
                    body_deadline = None
            return message

        await self.app(scope, guarded_receive, send)
