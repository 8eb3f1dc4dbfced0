"""Why a request failed, as data: a :class:`Failure` ``(kind, message, field)``.

A failure is built once, where it happens (the engine, the worker, the
queue), and carried unchanged to the job record, the HTTP status, the
metrics label and the SSE event; no layer parses an error text. Clients
see the stable ``kind`` and a message written for them; an exception's own
text (paths, tensor shapes, GPU memory figures) goes to the logs only.

Torch-free, so the API process can import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any


class FailureKind(str, Enum):
    """Stable failure kinds: label values of ``ediffi_jobs_failed_total`` and the ``kind`` clients see."""

    INVALID_INPUT = "invalid_input"  # the request cannot be run as given; ``field`` names why
    CANCELED = "canceled"  # stopped on request (or the engine stopped)
    TIMEOUT = "timeout"  # did not finish within its deadline
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory even running the request alone
    MAX_DELIVERIES = "max_deliveries"  # its worker crashed too often while running it
    LOST = "lost"  # the queue lost the job's data (a Redis restart without persistence)
    INTERNAL = "internal"  # anything else: a bug or a broken device


#: What a client reads for each kind without a more specific message.
PUBLIC_MESSAGES: dict[FailureKind, str] = {
    FailureKind.INVALID_INPUT: "invalid input",
    FailureKind.CANCELED: "the request was canceled",
    FailureKind.TIMEOUT: "the request did not finish in time",
    FailureKind.OUT_OF_MEMORY: "the device ran out of memory running this request; retry later or ask for fewer images",
    FailureKind.MAX_DELIVERIES: "the job stopped its worker too many times and was given up",
    FailureKind.LOST: "the job's data was lost by the queue; submit it again",
    FailureKind.INTERNAL: "internal error while generating",
}


_FIELD_PART = re.compile(r"[A-Za-z_]\w*|\[\d+\]")


def field_loc(field: str) -> list[str | int]:
    """A dotted field path as a validation ``loc``: ``a.b[0].c`` -> ``["a", "b", 0, "c"]``."""
    return [int(part[1:-1]) if part.startswith("[") else part for part in _FIELD_PART.findall(field)]


class InputError(ValueError):
    """Invalid request input found by the model side; ``field`` is a dotted path such as
    ``paint_with_words.regions[0].phrase``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class QueueFull(Exception):
    """A submission over a capacity limit (the API answers 429 with ``Retry-After``): the one
    such error of every layer, so it lives here, torch-free, at the bottom.

    ``limit`` says which: ``"queue"`` (``max_queue`` unfinished jobs), ``"inputs"`` (the
    ``max_queued_input_bytes`` budget of uploaded inputs), ``"results"`` (the
    ``max_stored_result_bytes`` budget of finished jobs' images) or ``"key"`` (the caller's
    ``max_unfinished_per_key``) in the job queue; ``"engine"`` (an engine's
    ``max_waiting`` requests waiting for admission). ``used`` and ``maximum`` are in the limit's unit.
    """

    _MESSAGES = {
        "queue": "queue full: {used} unfinished jobs, limit {maximum}",
        "inputs": "queued inputs over budget: {used} bytes held, limit {maximum} bytes",
        "key": "too many unfinished jobs for this caller (its API key, or its address without keys): "
               "{used}, limit {maximum}",
        "engine": "engine full: {used} requests waiting for admission, limit {maximum}",
        "results": "stored results over budget: finished jobs hold {used} bytes of images, limit {maximum} "
                   "bytes (they expire after the result TTL)",
    }

    def __init__(self, used: int, maximum: int, retry_after_s: float = 5.0, limit: str = "queue") -> None:
        super().__init__(self._MESSAGES[limit].format(used=used, maximum=maximum))
        self.limit = limit
        self.used = used
        self.maximum = maximum
        self.retry_after_s = retry_after_s

    @property
    def depth(self) -> int:
        """Unfinished jobs, for a full queue (kept for callers of the first version)."""
        return self.used


@dataclass(frozen=True)
class Failure:
    """How a request failed. ``message`` is safe to show a client."""

    kind: FailureKind
    message: str
    field: str | None = None

    @classmethod
    def of(cls, kind: FailureKind) -> "Failure":
        """A failure of ``kind`` with its public message."""
        return cls(kind, PUBLIC_MESSAGES[kind])

    @classmethod
    def invalid_input(cls, field: str, message: str) -> "Failure":
        return cls(FailureKind.INVALID_INPUT, message, field)

    @classmethod
    def max_deliveries(cls, limit: int) -> "Failure":
        return cls(FailureKind.MAX_DELIVERIES, f"exceeded max deliveries ({limit})")

    @property
    def is_engine_fault(self) -> bool:
        """True for failures that say something about the worker's health, not the request."""
        return self.kind in (FailureKind.INTERNAL, FailureKind.OUT_OF_MEMORY)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind.value, "message": self.message}
        if self.field is not None:
            data["field"] = self.field
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Failure":
        return cls(FailureKind(data["kind"]), str(data.get("message") or ""), data.get("field"))

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message
