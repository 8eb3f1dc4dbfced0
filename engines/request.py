"""Per-request state in the engine: the `RequestRun` state machine of
`ediffi.pipeline` plus what serving needs around it (id, arrival time,
deadline, cancellation, progress and completion callbacks), the outcome
object handed back, and the LRU cache of prompt embeddings.

All of this is touched inside the engine's ticks only (on the backend's
device thread), except `RequestHandle` (thread-safe: a future plus the latest
progress) and the callbacks, which run inside the tick and must be quick (hand off to a queue or an event loop
with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import torch
from PIL import Image

from ediffi.encoders import Encoders, TextEmbeddings
from ediffi.failure import Failure
from ediffi.pipeline import Conditioning, GenerationRequest, PendingEvaluation, RequestRun
from ediffi.spec import guidance_enabled
from engines.scheduler import GroupKey, PendingView

if TYPE_CHECKING:  # pragma: no cover
    from ediffi.model import EDiffIModel

log = logging.getLogger(__name__)

Status = Literal["succeeded", "failed", "canceled", "expired"]
ProgressCallback = Callable[[int, int], None]


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class RequestOutcome:
    """How a request ended. Timestamps are wall-clock (time.time()) seconds:
    `queued_at` at submit, `started_at` at admission, `finished_at` at the end."""

    id: str
    status: Status
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    failure: Failure | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    evaluations_done: int = 0
    evaluations_total: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def error(self) -> str | None:
        """The failure as one line for people and logs (``field: message``)."""
        return None if self.failure is None else str(self.failure)

    def png_bytes(self) -> list[bytes]:
        """The images as PNG files (encoded on the caller's thread)."""
        return [image_to_png(im) for im in self.images]

    def raise_for_status(self) -> RequestOutcome:
        if not self.ok:
            raise RuntimeError(f"request {self.id} {self.status}: {self.error or ''}".rstrip(": "))
        return self

    @property
    def timings(self) -> dict[str, float | None]:
        return {"queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at}


class RequestHandle:
    """The submitter's side of a request: its id, progress, result and cancel.

    `result()` blocks (thread); `await handle.wait()` from asyncio code.
    Neither raises for a failed or cancelled request: check `outcome.status`.
    """

    def __init__(self, request_id: str, cancel: Callable[[str], bool]):
        self.id = request_id
        self.future: Future[RequestOutcome] = Future()
        self._cancel = cancel
        self._progress = (0, 0)

    @property
    def progress(self) -> tuple[int, int]:
        """(evaluations done, evaluations total); total is 0 until admitted."""
        return self._progress

    def cancel(self) -> bool:
        return self._cancel(self.id)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> RequestOutcome:
        return self.future.result(timeout)

    async def wait(self) -> RequestOutcome:
        return await asyncio.wrap_future(self.future)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"RequestHandle({self.id!r}, progress={self._progress}, done={self.done()})"


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine."""

    id: str
    request: GenerationRequest
    arrival: float  # engine clock (monotonic)
    handle: RequestHandle
    deadline: float | None = None  # engine clock
    on_progress: ProgressCallback | None = None
    on_done: Callable[[RequestOutcome], None] | None = None
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    run: RequestRun | None = None
    pending: PendingEvaluation | None = None

    @property
    def rows(self) -> int:
        """Denoiser rows per evaluation: n, doubled under guidance (scale > 1, as encode_request plans them)."""
        return self.request.n * (2 if guidance_enabled(self.request.guidance_scale) else 1)

    def start(self, model: EDiffIModel, conditioning: Conditioning) -> None:
        self.run = RequestRun(model, self.request, conditioning)
        self.started_at = time.time()
        self.pending = self.run.pending()
        self._report()

    def view(self) -> PendingView | None:
        p = self.pending
        if p is None:
            return None
        remaining = max(1, self.run.evaluations_total - self.run.evaluations_done)
        return PendingView(GroupKey(p.stage, p.expert, tuple(p.inputs.x.shape[1:])), len(p.inputs), remaining)

    def advance(self, denoised: torch.Tensor) -> None:
        self.run.advance(denoised)
        self.pending = self.run.pending()
        self._report()

    def _report(self) -> None:
        done, total = self.run.evaluations_done, self.run.evaluations_total
        self.handle._progress = (done, total)
        if self.on_progress is not None:
            try:
                self.on_progress(done, total)
            except Exception:  # a callback must never take the engine down
                log.exception("progress callback of request %s failed", self.id)

    def finish(self, status: Status, failure: Failure | None = None) -> RequestOutcome:
        images: list[Image.Image] = []
        if status == "succeeded":
            images = self.run.images()
        run = self.run
        outcome = RequestOutcome(
            id=self.id, status=status, images=images, seeds=self.request.image_seeds,
            failure=None if status == "succeeded" else failure,
            queued_at=self.queued_at, started_at=self.started_at, finished_at=time.time(),
            evaluations_done=0 if run is None else run.evaluations_done,
            evaluations_total=0 if run is None else run.evaluations_total,
        )
        self.pending = None
        if self.on_done is not None:
            try:
                self.on_done(outcome)
            except Exception:
                log.exception("completion callback of request %s failed", self.id)
        if not self.handle.future.done():
            self.handle.future.set_result(outcome)
        return outcome


def _row(emb: TextEmbeddings, i: int) -> TextEmbeddings:
    return TextEmbeddings(
        emb.context[i : i + 1], emb.context_mask[i : i + 1], emb.pooled_text[i : i + 1],
        [emb.t5_offsets[i]], [emb.clip_offsets[i]],
    )


class TextEmbeddingCache:
    """LRU cache of prompt embeddings keyed by (prompt, use_t5, use_clip_text).

    Callable like `Encoders.encode_text`, so it plugs into
    `encode_request(..., text_cache=cache)`. `prefetch` encodes the misses of
    many prompts in one batched call per encoder subset (the requests
    admitted in one tick).
    """

    def __init__(self, encoders: Encoders, capacity: int = 1024):
        self.encoders = encoders
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bool, bool], TextEmbeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, key: tuple[str, bool, bool], emb: TextEmbeddings) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = emb
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def prefetch(self, items: Iterable[tuple[str, bool, bool]]) -> int:
        """Encode every missing (prompt, use_t5, use_clip_text) in batches;
        returns how many prompts were encoded."""
        missing: dict[tuple[bool, bool], list[str]] = {}
        for prompt, use_t5, use_clip in items:
            key = (prompt, use_t5, use_clip)
            if key not in self._entries:
                group = missing.setdefault((use_t5, use_clip), [])
                if prompt not in group:
                    group.append(prompt)
        count = 0
        for (use_t5, use_clip), prompts in missing.items():
            emb = self.encoders.encode_text(prompts, use_t5, use_clip)
            for i, prompt in enumerate(prompts):
                self._put((prompt, use_t5, use_clip), _row(emb, i))
            count += len(prompts)
            self.misses += len(prompts)
        return count

    def __call__(self, prompts: list[str], use_t5: bool = True, use_clip_text: bool = True) -> TextEmbeddings:
        rows = []
        for prompt in prompts:
            key = (prompt, use_t5, use_clip_text)
            emb = self._entries.get(key)
            if emb is None:
                emb = _row(self.encoders.encode_text([prompt], use_t5, use_clip_text), 0)
                self.misses += 1
                self._put(key, emb)
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            rows.append(emb)
        if len(rows) == 1:
            return rows[0]
        return TextEmbeddings(
            torch.cat([r.context for r in rows]), torch.cat([r.context_mask for r in rows]),
            torch.cat([r.pooled_text for r in rows]),
            [r.t5_offsets[0] for r in rows], [r.clip_offsets[0] for r in rows],
        )


def text_keys(request: GenerationRequest) -> list[tuple[str, bool, bool]]:
    """The (prompt, use_t5, use_clip_text) entries `encode_request` will ask for."""
    use_t5, use_clip = "t5" in request.encoders, "clip_text" in request.encoders
    keys = [(request.prompt, use_t5, use_clip)]
    if guidance_enabled(request.guidance_scale) and request.negative_prompt:
        keys.append((request.negative_prompt, use_t5, use_clip))
    return keys
