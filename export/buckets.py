"""Batch buckets: the batch sizes an artifact is built or warmed up for. Shared by the
exporters (TensorRT profiles) and every runtime backend, so it lives in the lower layer."""

from __future__ import annotations


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself: the batch sizes
    a backend warms up (and, with static-shape runtimes, pads to)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return buckets


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows` (the largest if none does)."""
    for b in buckets:
        if rows <= b:
            return b
    return buckets[-1]
