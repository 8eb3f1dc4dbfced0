"""API keys and the per-key rate limit.

Keys are off when ``Settings.api_keys`` is empty. Otherwise every job
endpoint needs one, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``:
none -> 401 (with ``WWW-Authenticate: Bearer``), an unknown one -> 403.
``/healthz``, ``/readyz``, ``/metrics``, ``/docs``, ``/openapi.json`` and
``GET /`` stay open (they carry no dependency on this module).

A key is never stored or used as a Redis key name: the service works with
:func:`key_id`, a short SHA-256 digest, for job ownership (a key sees only
its own jobs: others' are 404), idempotency scoping and the rate limit.

The rate limit (``rate_limit_per_minute``, a fixed window per key kept by the
queue, so in Redis and shared by all API replicas) counts job submissions
(``POST /generate`` and ``POST /v1/images/generations``); polling and
downloads are not counted. Beyond it: 429 with ``Retry-After`` (seconds to the
next minute).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from server.deps import QueueDep, SettingsDep


def key_id(key: str) -> str:
    """Stable, non-reversible name of an API key (16 hex digits of its SHA-256)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``key_id`` of the presented key, or None when keys are off."""

    key_id: str | None = None


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


async def authenticate(request: Request, settings: SettingsDep) -> Principal:
    """Dependency: the caller, or 401/403 when API keys are configured."""
    if not settings.api_keys:
        return Principal()
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


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def rate_limited(principal: PrincipalDep, settings: SettingsDep, queue: QueueDep) -> Principal:
    """Dependency of the submitting endpoints: 429 with ``Retry-After`` beyond the key's rate."""
    if principal.key_id is None:
        return principal
    if not await queue.rate_limit(principal.key_id, settings.rate_limit_per_minute):
        retry_after = max(1, math.ceil(60 - time.time() % 60))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"rate limit exceeded: {settings.rate_limit_per_minute} requests per minute per API key",
            headers={"Retry-After": str(retry_after)},
        )
    return principal


SubmitterDep = Annotated[Principal, Depends(rate_limited)]
