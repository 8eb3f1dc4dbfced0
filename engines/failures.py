"""Turning an exception raised while running a request into a :class:`~ediffi.failure.Failure`.

The one place that looks at exception types: input errors keep their field
and message; a device out-of-memory is ``out_of_memory``; everything else is
``internal`` with a generic message (the exception itself is logged by the
caller, never shown to a client).
"""

from __future__ import annotations

import torch

from ediffi.failure import Failure, FailureKind, InputError


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device allocation failure (``torch.OutOfMemoryError``, CUDA's included)."""
    return isinstance(exc, torch.OutOfMemoryError)


def failure_from_exception(exc: BaseException) -> Failure:
    if isinstance(exc, InputError):
        return Failure.invalid_input(exc.field, exc.message)
    if is_out_of_memory(exc):
        return Failure.of(FailureKind.OUT_OF_MEMORY)
    return Failure.of(FailureKind.INTERNAL)


def free_device_memory(device: torch.device | str) -> None:
    """Give the caching allocator's free blocks back after an out-of-memory, so a retry
    (or the next tenant's batch) starts from what is really in use."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
