"""The per-caller share of the in-flight requests (``max_inflight_per_caller``), at the ASGI level:
the real app (:func:`server.app.create_app` on an in-process queue) driven with raw ASGI messages,
so that every way a request can end is reached, and its slot is seen to come back each time.
The same cap against a real ``ediffi api`` process with stalled sockets is
``test_one_callers_stalled_uploads_leave_other_callers_served`` in test_api_hardening.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from server.app import create_app
from server.middleware import InflightLimit
from server.queue import InProcessQueue, queue_limits
from server.settings import Settings
from tests.support.api import make_settings, run_async

KEY_A = "key-a-" + "a" * 26
KEY_B = "key-b-" + "b" * 26
BODY = json.dumps({"prompt": "a red circle on the left", "steps": 1}).encode()
PER_CALLER = 2


def scope(method: str, path: str, key: str | None) -> dict[str, Any]:
    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }


class Exchange:
    """One request: ``chunks`` are the body messages the client sends (``partial``: more was announced), then
    it waits forever (a client that stays connected) or, with ``disconnect``, goes away. ``status`` is what
    the app answered, if it did; with ``send_error`` sending the answer fails."""

    def __init__(
        self, chunks: list[bytes] = (), partial: bool = False, disconnect: bool = False, send_error: bool = False
    ) -> None:
        self.messages = [
            {"type": "http.request", "body": chunk, "more_body": partial or k < len(chunks) - 1}
            for k, chunk in enumerate(chunks)
        ]
        self.disconnect = disconnect
        self.send_error = send_error
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""

    async def receive(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        if self.disconnect:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # connected, sending nothing more
        raise AssertionError("unreachable")

    async def send(self, message: dict) -> None:
        if self.send_error:  # the connection broke as the answer went out
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {name.decode(): value.decode() for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def inflight_limit(app: Any) -> InflightLimit:
    """The app's InflightLimit instance (the middleware stack is built on the first request)."""
    layer = app.middleware_stack
    while not isinstance(layer, InflightLimit):
        layer = layer.app
    return layer


@run_async
async def test_every_way_a_request_ends_gives_its_callers_slot_back() -> None:
    settings = make_settings(
        api_keys=[KEY_A, KEY_B], allow_anonymous=False, max_inflight_requests=8,
        max_inflight_per_caller=PER_CALLER, body_timeout_s=0.3,
    )
    queue = InProcessQueue(**queue_limits(settings))
    app = create_app(settings, queue=queue, static_dir=None)

    async def call(method: str, path: str, key: str | None, exchange: Exchange) -> Exchange:
        await app(scope(method, path, key), exchange.receive, exchange.send)
        return exchange

    async def assert_a_has_its_whole_share_and_no_more() -> None:
        """A can hold PER_CALLER requests at once (no slot leaked), and its next is 429 while B is served."""
        limit = inflight_limit(app)
        assert limit.by_caller == {} and limit.inflight == 0, (limit.by_caller, limit.inflight)
        held = [
            asyncio.create_task(call("POST", "/generate", KEY_A, Exchange([b'{"prompt":'], partial=True)))
            for _ in range(PER_CALLER)
        ]
        try:
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in held)
            assert list(limit.by_caller.values()) == [PER_CALLER], limit.by_caller
            refused = await call("GET", "/jobs/" + "0" * 32, KEY_A, Exchange())  # served: 404
            assert refused.status == 429, refused.body
            assert int(refused.headers["retry-after"]) >= 1
            assert f"at most {PER_CALLER} at once" in json.loads(refused.body)["detail"]
            assert (await call("GET", "/v1/models", KEY_B, Exchange())).status == 200
            # A request without a valid key counts against no caller's share: its 401/403 comes as before.
            assert (await call("POST", "/generate", None, Exchange([BODY]))).status == 401
            assert (await call("POST", "/generate", "key-unknown-" + "x" * 20, Exchange([BODY]))).status == 403
            # Probes and /metrics are not counted, and answer however many A holds.
            for path in ("/healthz", "/metrics"):
                assert (await call("GET", path, KEY_A, Exchange())).status == 200, path
        finally:
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
        assert limit.by_caller == {} and limit.inflight == 0, (limit.by_caller, limit.inflight)

    async with app.router.lifespan_context(app):
        # A response sent.
        assert (await call("GET", "/v1/models", KEY_A, Exchange())).status == 200
        await assert_a_has_its_whole_share_and_no_more()  # and a cancelled request (server shutdown) above
        # The body deadline: part of a body, then nothing.
        timed_out = await call("POST", "/generate", KEY_A, Exchange([b'{"prompt":'], partial=True))
        assert timed_out.status == 408, timed_out.body
        await assert_a_has_its_whole_share_and_no_more()
        # The client goes away mid-body.
        try:
            await call("POST", "/generate", KEY_A, Exchange([b'{"prompt":'], partial=True, disconnect=True))
        except Exception:
            pass  # however the app ends it, the slot must come back
        await assert_a_has_its_whole_share_and_no_more()
        # An error out of the app: the connection broke as the answer went out.
        try:
            await call("GET", "/v1/models", KEY_A, Exchange(send_error=True))
        except OSError:
            pass
        else:
            raise AssertionError("the send error did not reach the server")
        await assert_a_has_its_whole_share_and_no_more()
        # A sync wait for a job no worker takes, cancelled (the client's own cancel is tested in test_api.py).
        waiting = asyncio.create_task(
            call("POST", "/generate", KEY_A, Exchange([b'{"prompt": "a fox", ', b'"steps": 1}']))
        )
        await asyncio.sleep(0.2)
        assert not waiting.done() and list(inflight_limit(app).by_caller.values()) == [1]
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await assert_a_has_its_whole_share_and_no_more()
    await queue.close()


def test_the_per_caller_share_is_a_positive_count() -> None:
    assert Settings().max_inflight_per_caller < Settings().max_inflight_requests
    for bad in (0, -1, "many"):
        with pytest.raises(ValidationError, match="max_inflight_per_caller"):
            Settings(max_inflight_per_caller=bad)
