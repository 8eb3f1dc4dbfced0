"""API keys, the per-caller rate limit and the per-caller cap on open waits.

Every job endpoint needs a key from ``Settings.api_keys``, as ``Authorization:
Bearer <key>`` or ``X-API-Key: <key>``: none -> 401 (with ``WWW-Authenticate:
Bearer``), an unknown one -> 403. The key is checked from the headers before
any byte of a request body is read (:class:`server.middleware.RequestGuard`
calls :func:`caller` on the first body read). ``/healthz``, ``/readyz``,
``/metrics``, ``/docs``, ``/openapi.json`` and ``GET /`` stay open (they carry
no dependency on this module).

Without keys the API refuses to start (:func:`check_access_settings`) unless
``allow_anonymous`` is on; anonymous callers are then told apart, rate-limited
and capped by client address.

A key is never stored or used as a Redis key name: the service works with
:func:`key_id`, a short SHA-256 digest, for job ownership (a key sees only
its own jobs: others' are 404), idempotency scoping and the rate limit.

The rate limit (``rate_limit_per_minute``, a fixed window per key, or per
client address when anonymous, kept by the queue, so in Redis and shared by
all API replicas) counts job submissions
(``POST /generate`` and ``POST /v1/images/generations``); polling and
downloads are not counted. Beyond it: 429 with ``Retry-After`` (seconds to the
next minute).

The per-process caps count under the same name (:func:`limit_key_of`): open
streams and waits (:class:`WaitSlots`) and all requests in flight
(``max_inflight_per_caller``, :class:`server.middleware.InflightLimit`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Iterator

from fastapi import Depends, HTTPException, Request, status

from server.deps import QueueDep, SettingsDep
from server.settings import Settings

#: ``Retry-After`` of a 429 for too many open streams/waits, seconds.
WAITS_RETRY_AFTER_S = 5


class ConfigurationError(ValueError):
    """Settings the API must not start with."""


#: Keys the shipped examples (.env.example, deploy/k8s/secret.example.yaml) start with.
PLACEHOLDER_KEY_PREFIX = "change-me"


def check_access_settings(settings: Settings) -> None:
    """Refuse to serve without API keys unless anonymous access was asked for explicitly,
    and with a key copied unchanged from an example."""
    if not settings.api_keys and not settings.allow_anonymous:
        raise ConfigurationError(
            "no API keys configured: set EDIFFI_API_KEYS (comma-separated keys clients must send), "
            "or EDIFFI_ALLOW_ANONYMOUS=true to serve without authentication (local use only)"
        )
    if any(key.lower().startswith(PLACEHOLDER_KEY_PREFIX) for key in settings.api_keys):
        raise ConfigurationError(
            f"EDIFFI_API_KEYS holds a placeholder ('{PLACEHOLDER_KEY_PREFIX}...'): set real keys, "
            "e.g. openssl rand -hex 24"
        )


def key_id(key: str) -> str:
    """Stable, non-reversible name of an API key (16 hex digits of its SHA-256)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``key_id`` of the presented key, or None when anonymous (keys off)."""

    key_id: str | None = None
    #: Client address of an anonymous caller (rate limit and caps), else None.
    address: str | None = None

    @property
    def limit_key(self) -> str:
        """The name rate limits and caps count under: the key's id, else the client address's digest."""
        if self.key_id is not None:
            return self.key_id
        return "anon-" + key_id(self.address or "unknown")


def presented_key(request: Request) -> str | None:
    """The key in ``Authorization: Bearer`` or ``X-API-Key``, if any."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = request.headers.get("x-api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    return None


def caller(request: Request, settings: Settings) -> Principal:
    """The caller, from the request's headers only; 401/403 when keys are configured and not met."""
    if not settings.api_keys:
        return Principal(address=request.client.host if request.client else None)
    key = presented_key(request)
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = key.encode("utf-8", "surrogateescape")
    # Compare against every key in constant time; no early exit reveals which prefix matched.
    matched = False
    for candidate in settings.api_keys:
        matched |= hmac.compare_digest(given, candidate.encode("utf-8", "surrogateescape"))
    if not matched:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid API key")
    return Principal(key_id=key_id(key))


def limit_key_of(request: Request, settings: Settings) -> str | None:
    """The name the caller's per-process caps count under (:attr:`Principal.limit_key`), from the
    headers only; None for a caller :func:`caller` refuses (its request is a 401/403)."""
    try:
        return caller(request, settings).limit_key
    except HTTPException:
        return None


async def authenticate(request: Request, settings: SettingsDep) -> Principal:
    """Dependency: the caller, or 401/403."""
    return caller(request, settings)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def rate_limited(principal: PrincipalDep, settings: SettingsDep, queue: QueueDep) -> Principal:
    """Dependency of the submitting endpoints: 429 with ``Retry-After`` beyond the caller's rate."""
    if not await queue.rate_limit(principal.limit_key, settings.rate_limit_per_minute):
        retry_after = max(1, math.ceil(60 - time.time() % 60))
        per = "API key" if principal.key_id is not None else "client address"
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"rate limit exceeded: {settings.rate_limit_per_minute} requests per minute per {per}",
            headers={"Retry-After": str(retry_after)},
        )
    return principal


SubmitterDep = Annotated[Principal, Depends(rate_limited)]


class WaitSlots:
    """Open event streams and synchronous waits per caller, capped at ``per_caller`` (one API process).

    Each open wait holds a blocking Redis read in turn; the cap keeps one caller
    from taking every slot of the blocking pool (and every in-flight request).
    """

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._open: Counter[str] = Counter()

    def try_acquire(self, principal: Principal) -> None:
        """Take a slot, or raise 429 with ``Retry-After``."""
        name = principal.limit_key
        if self._open[name] >= self.per_caller:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"too many open event streams and synchronous waits: at most {self.per_caller} at once "
                "per caller; close one, or submit with 'Prefer: respond-async' and poll",
                headers={"Retry-After": str(WAITS_RETRY_AFTER_S)},
            )
        self._open[name] += 1

    def release(self, principal: Principal) -> None:
        name = principal.limit_key
        self._open[name] -= 1
        if self._open[name] <= 0:
            del self._open[name]

    @contextmanager
    def hold(self, principal: Principal) -> Iterator[None]:
        """A slot for the duration of the block (429 if none is free)."""
        self.try_acquire(principal)
        try:
            yield
        finally:
            self.release(principal)

    def open_count(self, principal: Principal) -> int:
        return self._open[principal.limit_key]


async def get_wait_slots(request: Request) -> WaitSlots:
    return request.app.state.wait_slots


WaitSlotsDep = Annotated[WaitSlots, Depends(get_wait_slots)]
