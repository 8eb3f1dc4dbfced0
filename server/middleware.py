"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer Server-Sent Events).

* :class:`HTTPMetricsMiddleware`: ``ediffi_http_requests_total{endpoint,method,status}``
  and ``ediffi_http_request_duration_seconds{endpoint}``, labelled with the
  matched route's *template* (``/jobs/{job_id}``), ``"unmatched"`` otherwise.
* :class:`RequestBodyGuard`: a hard cap on request bodies (413 without
  reading it when ``Content-Length`` says so, or as soon as a streamed body
  passes it; raised where the endpoint reads its body, so it is counted
  under the endpoint's route), and JSON for the JSON endpoints whatever the ``Content-Type``
  (``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``).
"""

from __future__ import annotations

import time
from typing import Iterable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics

_UNMATCHED = "unmatched"
# Content types a JSON endpoint reads as JSON anyway: none, curl's -d default, plain text.
_LENIENT_CONTENT_TYPES = (b"", b"application/x-www-form-urlencoded", b"text/plain")


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
            method = scope.get("method", "GET")
            self.metrics.http_requests.labels(endpoint=endpoint, method=method, status=str(status_code)).inc()
            self.metrics.http_request_duration.labels(endpoint=endpoint).observe(time.perf_counter() - started)


class _BodyTooLarge(HTTPException):
    pass


class RequestBodyGuard:
    """Caps request bodies at ``max_body_bytes``; reads ``json_paths`` POST bodies as JSON."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, json_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_paths = frozenset(json_paths)

    def _detail(self) -> list[dict[str, object]]:
        return [
            {
                "loc": ["body"],
                "msg": f"request body is larger than {self.max_body_bytes} bytes",
                "type": "too_large",
                "ctx": {"max_bytes": self.max_body_bytes},
            }
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        content_length = None
        content_type_index = None
        for index, (name, value) in enumerate(headers):
            if name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
            elif name == b"content-type":
                content_type_index = index

        if scope.get("method") == "POST" and scope.get("path") in self.json_paths:
            current = headers[content_type_index][1] if content_type_index is not None else b""
            if current.split(b";")[0].strip().lower() in _LENIENT_CONTENT_TYPES:
                if content_type_index is not None:
                    del headers[content_type_index]
                headers.append((b"content-type", b"application/json"))
                scope["headers"] = headers  # in place: outer middleware reads scope["route"] later

        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # no endpoint here reads a body
            return

        received = 0
        limit = self.max_body_bytes
        declared_too_large = content_length is not None and content_length > limit

        async def limited_receive() -> Message:
            nonlocal received
            if declared_too_large:  # refuse before reading a byte of it
                raise _BodyTooLarge(413, detail=self._detail())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler answers 413.
                    raise _BodyTooLarge(413, detail=self._detail())
            return message

        await self.app(scope, limited_receive, send)
