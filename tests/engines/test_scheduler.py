"""StepScheduler unit tests: no model, no tensors (vLLM-style). A tiny fake
"engine" drives the scheduler with requests that are just lists of pending
group keys (one per denoiser evaluation)."""

from __future__ import annotations

import random

import pytest

from engines.cost_model import CostModel
from engines.scheduler import (
    GroupKey,
    PendingView,
    QueueFull,
    SchedulerConfig,
    StepPlan,
    StepScheduler,
    auto_row_budget,
)

SHAPE = (3, 16, 16)
A = GroupKey("base", "base0", SHAPE)  # high noise
B = GroupKey("base", "base1", SHAPE)  # low noise
SR = GroupKey("sr", "sr0", (3, 32, 32))


class FakeEngine:
    """Requests are scripts of pending keys; each served evaluation pops one."""

    def __init__(self, scheduler: StepScheduler):
        self.s = scheduler
        self.scripts: dict[str, list[GroupKey]] = {}
        self.rows: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.now = 0.0
        self.plans: list[StepPlan] = []
        self.dropped: list[tuple[str, str]] = []
        self.admitted: list[str] = []

    def add(self, rid: str, script: list[GroupKey], rows: int = 2, deadline: float | None = None) -> None:
        self.scripts[rid] = list(script)
        self.rows[rid] = rows
        self.served[rid] = 0
        self.s.add(rid, self.now, rows, deadline)
        self.now += 1e-3

    def view(self, rid: str) -> PendingView | None:
        script = self.scripts[rid]
        return PendingView(script[0], self.rows[rid], len(script)) if script else None

    def tick(self) -> StepPlan:
        admission = self.s.admit(self.now)
        self.dropped += admission.dropped
        self.admitted += admission.admitted
        for rid in admission.admitted:
            self.s.set_pending(rid, self.view(rid))
        plan = self.s.schedule()
        updates = {}
        for group in plan.groups:
            for rid, rows in zip(group.request_ids, group.rows):
                assert self.scripts[rid][0] == group.key, "request planned on a key it does not pend on"
                assert rows == self.rows[rid]
                self.scripts[rid].pop(0)
                self.served[rid] += 1
                updates[rid] = self.view(rid)
        self.s.complete(plan, updates)
        self.plans.append(plan)
        self.now += 1.0
        return plan

    def run(self, max_ticks: int = 10_000) -> int:
        ticks = 0
        while self.s.has_work():
            self.tick()
            ticks += 1
            assert ticks < max_ticks
        return ticks


def make(policy: str = "step", max_batch=8, **kwargs) -> FakeEngine:
    return FakeEngine(StepScheduler(SchedulerConfig(policy=policy, **kwargs), max_batch=max_batch))


def test_groups_by_expert_and_shape():
    e = make()
    e.add("a1", [A])
    e.add("b1", [B])
    e.add("a2", [A])
    e.add("sr1", [SR])
    e.add("b2", [B])
    e.run()
    groups = {g.key: g.request_ids for plan in e.plans for g in plan.groups}
    assert groups == {A: ("a1", "a2"), B: ("b1", "b2"), SR: ("sr1",)}
    assert sum(len(plan.groups) for plan in e.plans) == 3  # one call per expert
    # Same expert name, different shape: separate batches.
    other_shape = GroupKey("base", "base0", (3, 8, 8))
    e2 = make()
    e2.add("x", [A])
    e2.add("y", [other_shape])
    e2.run()
    assert [g.request_ids for plan in e2.plans for g in plan.groups] == [("x",), ("y",)]


def test_max_batch_caps_rows_and_keeps_cfg_rows_together():
    e = make(max_batch=lambda key: 5 if key == A else 100)
    for i in range(6):
        e.add(f"r{i}", [A], rows=2)
    e.run()
    groups = [g for plan in e.plans for g in plan.groups]
    assert [g.total_rows for g in groups] == [4, 4, 4]  # 2+2 fits in 5; a third request's pair would not
    # Oldest first within the expert's group.
    assert [g.request_ids for g in groups] == [("r0", "r1"), ("r2", "r3"), ("r4", "r5")]
    # A request larger than the cap runs alone (its rows are never split).
    e2 = make(max_batch=3)
    e2.add("big", [A], rows=4)
    e2.add("small", [A], rows=2)
    e2.run()
    assert [g.request_ids for plan in e2.plans for g in plan.groups] == [("big",), ("small",)]


def test_request_policy_runs_every_pending_evaluation_of_its_cohort_each_tick():
    e = make("request", max_batch=4, cohort_rows=100)
    rng = random.Random(0)
    for i in range(12):
        e.add(f"r{i}", [rng.choice([A, B, SR]) for _ in range(rng.randint(2, 9))])
    e.run()
    assert e.s.stats.max_wait_ticks == 0
    for rid, script in e.scripts.items():
        assert not script


def test_fairness_bounded_wait_under_a_row_budget():
    """Overload: a tick budget of one 4-row batch, and a steady stream of new
    requests on expert A (more than the budget serves). The old request on
    expert B is still served, and no active request waits more than
    max_wait_ticks plus the ticks it takes to serve every other active
    request once."""
    active, rows, budget, guard = 8, 2, 4, 3
    e = make(max_batch=4, max_rows_per_tick=budget, max_active_requests=active, max_wait_ticks=guard)
    e.add("old", [B] * 5)
    for t in range(60):
        e.add(f"new{t}a", [A] * 3)
        e.add(f"new{t}b", [A] * 3)
        e.tick()
        assert all(len(g.request_ids) * rows <= budget for g in e.plans[-1].groups)
    assert not e.scripts["old"], "the old request starved"
    bound = guard + -(-active * rows // budget)
    assert 0 < e.s.stats.max_wait_ticks <= bound
    e.run()
    assert all(not s for s in e.scripts.values())


def test_budget_caps_the_tick_and_the_most_urgent_goes_first():
    """With a budget of one request's rows a tick serves one request: the
    most urgent (here the one with most evaluations left) first, and
    everyone within the budget's ticks."""
    e = make(max_batch=8, max_rows_per_tick=2, max_wait_ticks=1000)
    e.add("first", [A, B, SR])
    e.add("second", [A, A])
    e.add("third", [B])
    order = [e.tick().request_ids for _ in range(6)]
    assert all(len(ids) == 1 for ids in order)
    assert order[0] == ("first",)
    assert sorted(ids[0] for ids in order) == ["first"] * 3 + ["second"] * 2 + ["third"]


def test_step_serves_the_most_urgent_request_first_within_its_fair_share():
    """Urgency = ticks since arrival + evaluations left: of requests that
    arrive together, the one with the most work left runs first, until the
    other would fall behind its fair share (its own evaluations times the
    batches competing: here 2 x 2 ticks); from then on it runs first."""
    e = make(max_batch=8, max_rows_per_tick=2, max_wait_ticks=1000)
    e.add("short", [A, A])
    e.add("long", [B] * 5)
    order = [e.tick().request_ids for _ in range(7)]
    # long (urgency 5) runs first; after 2 ticks short would take more than 4 unless served.
    assert order == [("long",), ("long",), ("short",), ("short",), ("long",), ("long",), ("long",)]


def test_step_cuts_a_full_group_keeping_its_most_urgent_requests():
    e = make(max_batch=4)
    for i in range(3):
        e.add(f"short{i}", [A])
    e.add("long", [A] * 6)
    first = e.tick()
    assert first.groups[0].request_ids == ("long", "short0")  # 4 rows: the most urgent, then the oldest
    e.run()
    assert all(not s for s in e.scripts.values())


def test_fairness_bound_random_load():
    rng = random.Random(1)
    keys = [A, B, SR, GroupKey("sr", "sr1", (3, 32, 32))]
    guard = 4
    e = make(max_batch=4, max_rows_per_tick=6, max_active_requests=16, max_wait_ticks=guard)
    for t in range(200):
        if rng.random() < 0.7:
            e.add(f"r{t}", [rng.choice(keys) for _ in range(rng.randint(1, 12))], rows=rng.choice([1, 2]))
        e.tick()
    e.run()
    # At most 16 active requests of <= 2 rows, >= 4 rows served per tick.
    assert e.s.stats.max_wait_ticks <= guard + 16 * 2 // 4
    assert all(not s for s in e.scripts.values())


def cost_model(**curves: dict[int, float]) -> CostModel:
    """Experts of stage "base" named by keyword, {rows: seconds per call}."""
    return CostModel.from_timings({("base", name): {r: [s] for r, s in c.items()} for name, c in curves.items()})


def test_auto_row_budget():
    # GPU-like: a call costs about the same at any batch -> no budget.
    assert auto_row_budget(cost_model(base0={1: 1.0, 2: 1.0, 4: 1.05, 8: 1.1, 16: 1.3}), 16) is None
    # Cheapest per row at 8 rows for one expert, 4 for the other -> 8.
    gpu_then_flat = {1: 1.0, 2: 1.0, 4: 1.1, 8: 1.2, 16: 2.8}
    cache_bound = {1: 1.0, 2: 1.5, 4: 2.0, 8: 4.4, 16: 9.0}
    assert auto_row_budget(cost_model(base0=gpu_then_flat, base1=cache_bound), 16) == 8
    assert auto_row_budget(CostModel(), 16) is None


def test_join_and_leave_between_ticks():
    e = make()
    e.add("long", [A] * 4)
    e.add("short", [A])
    plan = e.tick()
    assert plan.groups[0].request_ids == ("long", "short")
    assert "short" not in e.s.active_ids  # left after its last evaluation
    e.add("late", [A, A])
    plan = e.tick()
    assert plan.groups[0].request_ids == ("long", "late")  # joined the running batch at once
    e.run()
    assert e.s.num_active == 0 and e.s.num_waiting == 0


def test_heun_correction_crossing_an_expert_boundary():
    """A Heun step's correction is evaluated at sigma_{i+1}, which may be in
    the next expert: the request's pending key changes expert mid-step and it
    simply joins that expert's batch next tick."""
    e = make()
    e.add("heun", [A, B, B])  # predictor on A, correction on B
    e.add("on_b", [B, B, B])
    first = e.tick()
    # Equal urgency (3 evaluations left each) and equal batches: the oldest first.
    assert {g.key: g.request_ids for g in first.groups} == {A: ("heun",)}
    second = e.tick()
    # on_b waited one tick (more urgent now, so first) and shares the call: the two traverse B together.
    assert {g.key: g.request_ids for g in second.groups} == {B: ("on_b", "heun")}


def test_cancellation_frees_the_slot_next_tick():
    e = make(max_active_requests=2)
    e.add("a", [A] * 10)
    e.add("b", [A] * 10)
    e.add("c", [A] * 10)
    e.tick()
    assert set(e.s.active_ids) == {"a", "b"} and e.s.waiting_ids == ["c"]
    assert e.s.cancel("a")
    plan = e.tick()
    assert ("a", "canceled") in e.dropped
    assert "a" not in plan.request_ids  # no compute after the cancel
    assert set(plan.request_ids) == {"b", "c"}  # its slot went to the waiting request
    served = e.served["a"]
    e.run()
    assert e.served["a"] == served
    assert not e.s.cancel("a")  # gone


def test_cancelled_while_waiting_never_runs():
    e = make(max_active_requests=1)
    e.add("a", [A] * 3)
    e.add("b", [A] * 3)
    e.s.cancel("b")
    e.run()
    assert e.served["b"] == 0 and ("b", "canceled") in e.dropped


def test_expired_requests_dropped_before_compute():
    e = make(max_active_requests=1)
    e.add("a", [A] * 5)
    e.add("late", [A] * 5, deadline=2.5)  # will still be waiting at t=2.5
    e.run()
    assert ("late", "expired") in e.dropped
    assert e.served["late"] == 0


def test_admission_limit_respected():
    e = make(max_active_requests=3)
    rng = random.Random(2)
    for i in range(10):
        e.add(f"r{i}", [rng.choice([A, B])] * rng.randint(1, 6))
    while e.s.has_work():
        e.tick()
        assert e.s.num_active <= 3
        assert len(e.plans[-1].request_ids) <= 3
    assert len(e.admitted) == 10


def test_admission_is_fifo():
    e = make(max_active_requests=2)
    for i in range(5):
        e.add(f"r{i}", [A] * 2)
    e.run()
    assert e.admitted == [f"r{i}" for i in range(5)]


def test_waiting_queue_limit():
    e = make(max_waiting=2)
    e.add("a", [A])
    e.add("b", [A])
    with pytest.raises(QueueFull):
        e.add("c", [A])


def test_policy_none_runs_one_request_at_a_time():
    e = make("none")
    e.add("a", [A, B])
    e.add("b", [A])
    e.add("c", [B, B, B])
    e.run()
    for plan in e.plans:
        assert len(plan.request_ids) <= 1
    order = [p.request_ids[0] for p in e.plans if p]
    assert order == ["a", "a", "b", "c", "c", "c"]


def test_policy_request_runs_a_cohort_to_completion():
    e = make("request", max_batch=100, cohort_rows=4)
    e.add("a", [A] * 2)
    e.add("b", [A] * 5)
    e.add("c", [A] * 1)  # does not fit the 4-row cohort of a + b
    e.tick()
    assert set(e.admitted) == {"a", "b"}
    e.add("d", [A])  # arrives while the cohort runs
    while e.scripts["b"]:
        plan = e.tick()
        assert set(plan.request_ids) <= {"a", "b"}, "no new request joins a running cohort"
    plan = e.tick()  # the engine went idle: the next cohort forms
    assert set(plan.request_ids) == {"c", "d"}


def test_policy_request_groups_within_the_cohort():
    e = make("request", max_batch=100, cohort_rows=8)
    e.add("a", [A, B])
    e.add("b", [B, B])
    first = e.tick()
    assert {g.key: g.request_ids for g in first.groups} == {A: ("a",), B: ("b",)}
    second = e.tick()
    assert {g.key: g.request_ids for g in second.groups} == {B: ("a", "b")}


@pytest.mark.parametrize("policy", ["step", "request", "none"])
def test_every_policy_serves_everything(policy):
    e = make(policy, max_batch=4, max_active_requests=5, cohort_rows=6)
    rng = random.Random(3)
    for i in range(20):
        e.add(f"r{i}", [rng.choice([A, B, SR]) for _ in range(rng.randint(1, 7))], rows=rng.choice([1, 2]))
    e.run()
    assert all(not s for s in e.scripts.values())
    assert e.s.stats.finished == 20
    for plan in e.plans:
        for group in plan.groups:
            assert group.total_rows <= 4 or len(group.request_ids) == 1


def test_step_needs_fewer_calls_than_request_and_none():
    def calls(policy):
        e = make(policy, max_batch=8, max_active_requests=8, cohort_rows=8)
        rng = random.Random(4)
        for i in range(16):
            e.add(f"r{i}", [rng.choice([A, B, SR]) for _ in range(rng.randint(2, 20))])
        e.run()
        return e.s.stats.batches

    assert calls("step") < calls("request") < calls("none")


def test_unknown_policy_rejected():
    with pytest.raises(ValueError):
        SchedulerConfig(policy="fifo")


@pytest.mark.parametrize("short_key", [B, A], ids=["other-expert", "same-expert-full-batch"])
@pytest.mark.parametrize("delay", [0, 5])
def test_a_short_request_beside_a_long_one_finishes_in_about_its_own_ticks(short_key, delay):
    """A hostile-client review: one client's request of 16 rows and ~400
    evaluations (n=8, 100 Heun steps, guidance) at its expert's cheapest
    batch, and another client's 1-row request of 4 evaluations, admitted
    with it or a few ticks later, that cannot share its batch (another
    expert, or the long one's batch is already at the max batch). Under
    one common latency target the long request stayed the most urgent for
    ~400 ticks and the short one ran only when starvation forced it (one
    evaluation per max_wait_ticks + 1 ticks). Its latency is bounded by its
    own evaluations now, and the long request still runs every tick but
    the few the short one needs."""
    curve = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.6, 16: 2.2}  # cheapest per row at 16 rows
    s = StepScheduler(SchedulerConfig(), max_batch=16, cost_model=cost_model(base0=curve, base1=curve))
    e = FakeEngine(s)
    e.add("long", [A] * 398, rows=16)
    for _ in range(delay):
        e.tick()
    e.add("short", [short_key] * 4, rows=1)
    start = len(e.plans)
    finished = {}
    while s.has_work():
        e.tick()
        for rid in ("long", "short"):
            if rid not in finished and not e.scripts[rid]:
                finished[rid] = len(e.plans)
        assert len(e.plans) < 2000
    short_ticks = finished["short"] - start
    assert short_ticks <= 3 * 4, f"the 4-evaluation request took {short_ticks} ticks beside the long one"
    assert finished["short"] < finished["long"]
    # The long request is not starved in turn: it waits at most a tick per evaluation of the short one.
    assert finished["long"] <= 398 + 4
