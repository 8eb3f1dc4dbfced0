"""The step scheduler: every batching decision, and nothing else.

It sees requests only through a small abstract view (docs/architecture.md §2, vLLM v1's
scheduler/worker split): an id, an arrival time, an optional deadline, and
the request's *pending evaluation* as a group key (stage, expert, shape) plus
its row count (n conditional + n unconditional rows under classifier-free
guidance). It never touches tensors or a model, so it is tested on CPU with
no model at all.

One tick, as the engine drives it:

1. ``admit(now)``: drop cancelled and expired requests (waiting or active)
   before any compute, then move waiting requests into the active set as the
   policy and the admission limit allow. Returns an `Admission`.
2. The engine prepares the admitted requests (encoding) and reports each
   one's first pending evaluation with ``set_pending``.
3. ``schedule()``: group the pending evaluations of active requests by
   (stage, expert, shape), cut batches of at most the backend's max batch
   (a request's rows are never split), pick the tick's batches per the
   policy and emit a plain `StepPlan`.
4. The executor runs the plan; the engine reports back with
   ``complete(plan, updates)`` each served request's next pending
   evaluation (or ``None`` when it finished).

Policies:

- ``step`` (default): expert-aware step scheduling, most urgent first
  within a fair share. A request's *urgency* is the ticks it will have
  taken if it is served every tick from now on: ticks since it arrived plus
  the evaluations it still needs (`PendingView.remaining`). Serving the most
  urgent first is least-laxity-first under one common latency target
  (earliest deadline first with deadline = arrival + D; laxity = D -
  urgency): the requests that decide the tail (the longest, and the ones
  passed over) run first, and a request that waits grows more urgent by one
  every tick it is not served, so waiting is its own aging. Alone that
  starves short requests beside a long one: a request of 400 evaluations
  stays more urgent than a new 4-evaluation one for ~400 ticks. So a
  request that is *behind its fair share* runs before all the others: one
  that, unless served now, will have taken more ticks since it was admitted
  than its own evaluations times the batches competing this tick (the
  latency of taking turns with them; `_urgency`). Serving it every tick from
  then on keeps it at that bound, so a short request's latency is bounded by
  its own length, not by another client's. Each tick every (stage, expert,
  shape) group offers one batch: its most urgent requests (starved first)
  up to the expert's cheapest batch per row, read off the measured cost
  model (`engines.cost_model`: forward seconds versus batch rows per
  expert). The tick runs the batch holding the most urgent request, and
  with it every other batch already at its expert's cheapest size
  (`FULL_BATCH`; waiting cannot make those cheaper, and the tick's batches
  queue back to back). Requests admitted together keep equal urgencies and
  are served together, so cohorts form and traverse the experts together. A
  request unserved for ``max_wait_ticks`` ticks (starved) runs before
  anything else. Requests join and leave between ticks; a Heun correction
  that lands in another expert joins that expert's group.
- ``request``: request-level dynamic batching, the baseline of
  request-level servers: when the engine is idle, a batch of whole requests
  is formed (up to ``cohort_rows`` rows) and runs to completion before any
  new request is admitted. Within the cohort evaluations are still grouped
  per expert, and every group runs every tick.
- ``none``: one request at a time.

Fairness (``step``): no request waits more than ``max_wait_ticks`` ticks in
a row plus the ticks it takes to serve the other starved requests once
(starved requests run longest-waiting first, all their groups in one tick
within the row budget). The tick's row budget (``max_rows_per_tick``) caps
the rows of a tick; the engine's "auto" budget is the largest batch any
expert still gets cheaper per row at (`auto_row_budget`), None where that
is the backend's max batch.

Measured alternatives (`engines.simulation`, and `ediffi bench engine`;
see bench/README.md): the fair-share tier costs 1.5% of the throughput
over 32 simulated loads (step / request 1.28x against 1.30x on average,
3-8% at steps 8-48, where short requests now take their turns beside
long Heun ones), p95 0.74 against 0.73 of `request`'s, and
cuts a 4-step request beside an n=8, 100-step Heun one from 50-335x its
latency alone to 3.4-19x. Ranking everyone by slowdown (ticks taken / own
evaluations) or by ticks waited since arrival, instead of tiering, gave
short requests about the same but p95 up to 1.39-1.44x `request`'s and up
to 20% less throughput; a fixed multiple of the own evaluations (2-4x,
plus 0-16 ticks) instead of the batches competing failed the p95 target in
3-6 of the 32 loads; offering every batch of a group (not only its first)
broke cohorts (p95 up to 1.16x `request`'s). The best batch by rows per
second relative to its expert's cheapest, aged by its requests'
consecutive waits (the previous default) gave long requests the tail, p95 up to 1.2x `request`'s in
simulation and 1.3-1.5x in the bench at 16 clients; most urgent first beat
it on throughput, p95 and efficiency on every cost curve simulated;
oldest first (first-come-first-served with batching) cut the tail less;
running every group every tick (processor sharing) batches less and gives
long requests the worst tails; first-come-first-served under a small row
budget batches nothing; running, besides the chosen batch, every batch
above 80-90% of its expert's best rate batched less than running only the
full ones.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

from ediffi.failure import QueueFull
from engines.cost_model import CostModel

POLICIES = ("step", "request", "none")

# A batch within this of an expert's cheapest seconds per row counts as
# cheapest; the step policy fills batches up to the largest such size (the
# warm-up timings of a shared machine are noisy; a bigger batch is the
# safer bet).
TARGET_TOLERANCE = 0.05
# A batch at this share of its expert's target rate is full: it runs in
# the same tick as the best batch.
FULL_BATCH = 0.99


@dataclass(frozen=True, order=True)
class GroupKey:
    """What a batch shares: one expert of one stage, at one input shape."""

    stage: str
    expert: str
    shape: tuple[int, ...] = ()

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return f"{self.stage}/{self.expert}{list(self.shape)}"


@dataclass(frozen=True)
class PendingView:
    """A request's next denoiser evaluation, as the scheduler sees it."""

    key: GroupKey
    rows: int
    # Evaluations the request still needs, this one included (1 if unknown).
    remaining: int = 1


@dataclass(frozen=True)
class Group:
    """One batched call: the requests (in priority order) and their row counts."""

    key: GroupKey
    request_ids: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


@dataclass(frozen=True)
class StepPlan:
    """The scheduler's output for one tick: batched calls, in order."""

    tick: int
    groups: tuple[Group, ...]

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(i for g in self.groups for i in g.request_ids)

    @property
    def total_rows(self) -> int:
        return sum(g.total_rows for g in self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)


@dataclass(frozen=True)
class Admission:
    """What happened at the start of a tick: requests that became active
    (to be prepared), and requests dropped before any compute, with why
    ("canceled" or "expired")."""

    admitted: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()


@dataclass
class SchedulerConfig:
    policy: str = "step"
    # Most requests in flight (holding sampler state) at once.
    max_active_requests: int = 32
    # Most requests waiting for admission; None: unbounded.
    max_waiting: int | None = None
    # Row budget of one tick (summed over its batches); None: every pending
    # evaluation runs every tick. At least one batch always runs.
    max_rows_per_tick: int | None = None
    # A request that went this many ticks in a row unserved jumps ahead of
    # every younger one (the no-starvation bound).
    max_wait_ticks: int = 32
    # `request` policy: most rows of one cohort of whole requests.
    cohort_rows: int = 16

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown batching policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_active_requests < 1:
            raise ValueError("max_active_requests must be >= 1")
        if self.max_rows_per_tick is not None and self.max_rows_per_tick < 1:
            raise ValueError("max_rows_per_tick must be >= 1 or None")
        if self.cohort_rows < 1:
            raise ValueError("cohort_rows must be >= 1")
        if self.max_wait_ticks < 1:
            raise ValueError("max_wait_ticks must be >= 1")


@dataclass
class _Entry:
    id: str
    seq: int
    arrival: float
    rows: int
    arrival_tick: int = 0  # the scheduler's tick count when the request was added
    deadline: float | None = None
    pending: PendingView | None = None
    cancelled: bool = False
    waited: int = 0  # ticks in a row with a pending evaluation but not served
    max_waited: int = 0
    admitted_tick: int = 0  # the tick count when it became active
    served: int = 0  # evaluations served so far


@dataclass(frozen=True)
class _Candidate:
    """A group's batch for this tick, as the step policy weighs it."""

    group: Group
    efficiency: float  # rows per second relative to the expert's cheapest batch
    urgency: tuple[int, int]  # of its most urgent request (`StepScheduler._urgency`)
    starved: bool
    longest_wait: int
    oldest_seq: int


@dataclass
class SchedulerStats:
    ticks: int = 0
    admitted: int = 0
    finished: int = 0
    dropped: int = 0
    # The longest any request went with a pending evaluation unserved.
    max_wait_ticks: int = 0
    batches: int = 0
    rows: int = 0


MaxBatch = Callable[[GroupKey], int]


class StepScheduler:
    """Owns the queue and active set; decides admission, drops and batches.

    Single-threaded by design: the engine calls it from its loop only.
    """

    def __init__(
        self, config: SchedulerConfig | None = None, max_batch: MaxBatch | int = 16, cost_model: CostModel | None = None
    ):
        self.config = config or SchedulerConfig()
        self.cost_model = cost_model if cost_model is not None else CostModel()
        self._max_batch: MaxBatch = (lambda key, m=max_batch: m) if isinstance(max_batch, int) else max_batch
        self._waiting: OrderedDict[str, _Entry] = OrderedDict()
        self._active: OrderedDict[str, _Entry] = OrderedDict()
        self._seq = itertools.count()
        self._tick = 0
        self._cohort_open = False
        self._sharing = 1  # batches competing in the tick being planned
        self.stats = SchedulerStats()

    # -- queue state -------------------------------------------------------
    @property
    def policy(self) -> str:
        return self.config.policy

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def waiting_ids(self) -> list[str]:
        return list(self._waiting)

    @property
    def active_ids(self) -> list[str]:
        return list(self._active)

    @property
    def active_rows(self) -> int:
        return sum(e.rows for e in self._active.values())

    @property
    def admission_limit(self) -> int:
        """Most requests active at once: one under the `none` policy, else `max_active_requests`."""
        return 1 if self.config.policy == "none" else self.config.max_active_requests

    def free_capacity(self, held: int, waiting: int) -> int:
        """How many more requests the owner of this scheduler (the engine) may take now, holding
        `held` requests of which `waiting` are not admitted yet (its inbox included): what the
        admission limit leaves, and no more than the `max_waiting` places left. The one answer
        to "how many more"; the worker claims that many jobs."""
        free = self.admission_limit - held
        if self.config.max_waiting is not None:
            free = min(free, self.config.max_waiting - waiting)
        return max(0, free)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting or request_id in self._active

    def add(self, request_id: str, arrival: float, rows: int, deadline: float | None = None) -> None:
        """Queue a request. Raises `QueueFull` at the waiting limit."""
        if request_id in self:
            raise ValueError(f"request {request_id!r} is already scheduled")
        if rows < 1:
            raise ValueError("rows must be >= 1")
        limit = self.config.max_waiting
        if limit is not None and len(self._waiting) >= limit:
            raise QueueFull(len(self._waiting), limit, limit="engine")
        self._waiting[request_id] = _Entry(request_id, next(self._seq), arrival, rows, self._tick, deadline)

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; it is dropped at the next `admit` before
        any compute. Returns whether the request was known."""
        entry = self._waiting.get(request_id) or self._active.get(request_id)
        if entry is None:
            return False
        entry.cancelled = True
        return True

    def remove(self, request_id: str) -> None:
        """Forget a request at once (it failed while being prepared or run)."""
        self._waiting.pop(request_id, None)
        self._active.pop(request_id, None)

    def max_waited(self, request_id: str) -> int:
        entry = self._waiting.get(request_id) or self._active.get(request_id)
        return 0 if entry is None else entry.max_waited

    # -- one tick ----------------------------------------------------------
    def admit(self, now: float) -> Admission:
        """Drop cancelled/expired requests, then admit per the policy."""
        dropped: list[tuple[str, str]] = []
        for queue in (self._waiting, self._active):
            for rid, entry in list(queue.items()):
                reason = None
                if entry.cancelled:
                    reason = "canceled"
                elif entry.deadline is not None and now >= entry.deadline:
                    reason = "expired"
                if reason is not None:
                    del queue[rid]
                    dropped.append((rid, reason))
        self.stats.dropped += len(dropped)

        admitted: list[str] = []
        policy = self.config.policy
        limit = self.config.max_active_requests
        if policy == "step":
            while self._waiting and len(self._active) < limit:
                admitted.append(self._activate())
        elif policy == "none":
            if not self._active and self._waiting:
                admitted.append(self._activate())
        else:  # request-level: a cohort forms only when the engine is idle
            if not self._active and self._waiting:
                rows = 0
                while self._waiting and len(self._active) < limit:
                    nxt = next(iter(self._waiting.values()))
                    if admitted and rows + nxt.rows > self.config.cohort_rows:
                        break
                    rows += nxt.rows
                    admitted.append(self._activate())
        self.stats.admitted += len(admitted)
        return Admission(tuple(admitted), tuple(dropped))

    def _activate(self) -> str:
        rid, entry = self._waiting.popitem(last=False)
        entry.admitted_tick = self._tick
        self._active[rid] = entry
        return rid

    def set_pending(self, request_id: str, view: PendingView | None) -> None:
        """Report an active request's next evaluation (None: it finished)."""
        if view is None:
            self._finish(request_id)
            return
        entry = self._active[request_id]
        entry.pending = view
        entry.rows = view.rows

    def _finish(self, request_id: str) -> None:
        if self._active.pop(request_id, None) is not None:
            self.stats.finished += 1

    def schedule(self) -> StepPlan:
        """Group pending evaluations into batches for this tick."""
        by_key: dict[GroupKey, list[_Entry]] = {}
        for entry in self._active.values():
            if entry.pending is not None and not entry.cancelled:
                by_key.setdefault(entry.pending.key, []).append(entry)
        # Each group's cheapest batch, once per tick; the step policy's batches competing this tick (`_urgency`).
        targets = {key: self._target(key) for key in by_key} if self.config.policy == "step" else {}
        if targets:
            self._sharing = sum(
                -(-sum(e.pending.rows for e in entries) // targets[key]) for key, entries in by_key.items()
            )
        for entries in by_key.values():
            # Starved first, then the most urgent (step) or oldest: a batch cut
            # at its size leaves the least urgent behind, never the same request for long.
            entries.sort(key=self._priority)
        if self.config.policy == "step":
            chosen = self._select_step(by_key, targets)
        else:  # the baselines run every pending evaluation of their cohort
            chosen = [group for key, entries in by_key.items() for group in self._split(key, entries, self._cap(key))]
        self._tick += 1
        return StepPlan(self._tick, tuple(chosen))

    def _cap(self, key: GroupKey) -> int:
        """Most rows of one batch of `key`: the backend's max batch, within
        the tick's row budget."""
        cap = max(1, int(self._max_batch(key)))
        if self.config.max_rows_per_tick is not None:
            cap = min(cap, self.config.max_rows_per_tick)
        return cap

    def _split(self, key: GroupKey, entries: list[_Entry], cap: int) -> list[Group]:
        """Consecutive batches of at most `cap` rows (a request's rows are
        never split; a request larger than the cap runs alone)."""
        groups: list[Group] = []
        chunk: list[_Entry] = []
        rows = 0
        for entry in entries:
            r = entry.pending.rows
            if chunk and rows + r > cap:
                groups.append(self._group(key, chunk))
                chunk, rows = [], 0
            chunk.append(entry)
            rows += r
        if chunk:
            groups.append(self._group(key, chunk))
        return groups

    def _select_step(self, by_key: dict[GroupKey, list[_Entry]], targets: dict[GroupKey, int]) -> list[Group]:
        """The step policy's batches for one tick (see the module docstring):
        the groups of starved requests if any, else the best batch and the
        full ones."""
        candidates = [self._candidate(key, entries, targets[key]) for key, entries in by_key.items()]
        starved = [c for c in candidates if c.starved]
        if starved:
            starved.sort(key=lambda c: -c.longest_wait)
            chosen: list[Group] = []
            budget, used = self.config.max_rows_per_tick, 0
            for c in starved:
                if budget is not None and chosen and used + c.group.total_rows > budget:
                    continue
                chosen.append(c.group)
                used += c.group.total_rows
            return chosen
        if not candidates:
            return []
        # The batch of the most urgent request, and every other batch already
        # at its expert's cheapest size: waiting cannot make those cheaper,
        # and a tick's batches are queued back to back (one device synchronize).
        candidates.sort(key=lambda c: (-c.urgency[0], -c.urgency[1], -c.efficiency, c.oldest_seq))
        chosen, used = [candidates[0].group], candidates[0].group.total_rows
        budget = self.config.max_rows_per_tick
        for c in candidates[1:]:
            if c.efficiency >= FULL_BATCH and (budget is None or used + c.group.total_rows <= budget):
                chosen.append(c.group)
                used += c.group.total_rows
        return chosen

    def _candidate(self, key: GroupKey, entries: list[_Entry], target: int) -> _Candidate:
        """The batch this group would run now: its first requests (starved,
        then most urgent) up to `target`, the expert's cheapest batch per row, with
        its rows per second relative to that cheapest batch and the urgency
        of its most urgent request."""
        cost = self.cost_model.expert(key.stage, key.expert)
        group = self._split(key, entries, target)[0]
        members = entries[: len(group.request_ids)]
        rows = group.total_rows
        efficiency = min(1.0, (rows / cost(rows)) / (target / cost(target)))
        return _Candidate(
            group=group,
            efficiency=efficiency,
            urgency=max(self._urgency(e) for e in members),
            starved=any(e.waited >= self.config.max_wait_ticks for e in members),
            longest_wait=max(e.waited for e in members),
            oldest_seq=min(e.seq for e in members),
        )

    def _target(self, key: GroupKey) -> int:
        """The rows of `key`'s cheapest batch per row (within `TARGET_TOLERANCE`)."""
        return self.cost_model.expert(key.stage, key.expert).best_rows(self._cap(key), TARGET_TOLERANCE)

    def _urgency(self, entry: _Entry) -> tuple[int, int]:
        """(behind its fair share, the ticks it will have taken if served
        every tick from now on); larger runs first. Behind: unless served
        now, it will have taken more ticks since it was admitted than its
        own evaluations times the batches competing this tick (the latency
        of taking turns with them)."""
        remaining = entry.pending.remaining
        fair = self._sharing * (entry.served + remaining)
        behind = int(self._tick - entry.admitted_tick + remaining >= fair)
        return behind, self._tick - entry.arrival_tick + remaining

    def _priority(self, entry: _Entry) -> tuple[int, int, int, int]:
        """Smaller runs first: starved requests (longest wait first), then
        the rest, most urgent first (the baselines: oldest first)."""
        if entry.waited >= self.config.max_wait_ticks:
            return (0, -entry.waited, 0, entry.seq)
        if self.config.policy == "step":
            behind, urgency = self._urgency(entry)
            return (1, -behind, -urgency, entry.seq)
        return (1, 0, 0, entry.seq)

    def _group(self, key: GroupKey, chunk: list[_Entry]) -> Group:
        return Group(key, tuple(e.id for e in chunk), tuple(e.pending.rows for e in chunk))

    def complete(self, plan: StepPlan, updates: Mapping[str, PendingView | None]) -> None:
        """Take back a tick's outcome: each served request's next pending
        evaluation, or None when it finished. Requests absent from
        `updates` keep their pending evaluation (they will be retried)."""
        served = set(plan.request_ids)
        for rid, view in updates.items():
            if rid in self._active:
                self.set_pending(rid, view)
        for entry in self._active.values():
            if entry.id in served:
                entry.waited = 0
                entry.served += 1
            elif entry.pending is not None:
                entry.waited += 1
                entry.max_waited = max(entry.max_waited, entry.waited)
                self.stats.max_wait_ticks = max(self.stats.max_wait_ticks, entry.waited)
        self.stats.ticks += 1
        self.stats.batches += len(plan.groups)
        self.stats.rows += plan.total_rows


def auto_row_budget(cost_model: CostModel, max_batch: int | Callable[[str, str], int]) -> int | None:
    """The "auto" tick budget: the largest of the experts' cheapest batches
    per row (within `TARGET_TOLERANCE`), from the measured cost model. None (no budget) when that is the max batch, as on
    a GPU where a call of 16 rows costs about one of 2, or when nothing was
    measured."""
    if not cost_model:
        return None
    caps = {key: (max_batch(*key) if callable(max_batch) else int(max_batch)) for key in cost_model.experts}
    best = max(
        cost_model.best_rows(stage, expert, caps[(stage, expert)], TARGET_TOLERANCE) for stage, expert in cost_model.experts
    )
    return None if best >= max(caps.values()) else best


__all__ = [
    "auto_row_budget",
    "Admission",
    "Group",
    "GroupKey",
    "PendingView",
    "POLICIES",
    "QueueFull",
    "SchedulerConfig",
    "SchedulerStats",
    "StepPlan",
    "StepScheduler",
]
