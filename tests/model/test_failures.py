"""Structured failures and GPU faults (issue 19 item 8, issue 16 point 3).

On CPU, with faults injected into the real torch backend (:mod:`tests.support.fault_injection`):

* an out-of-memory batch is retried split in halves, so the requests that fit still run
  (and give the same images as alone), and only a request too big even alone fails, with
  the stable kind ``out_of_memory`` and no allocator text;
* a worker on a broken device fails a few jobs with ``internal``, then stops claiming and
  exits non-zero; the jobs it did not get are run by a healthy worker.
"""

from __future__ import annotations

import time

import httpx
import pytest

from ediffi.failure import PUBLIC_MESSAGES, Failure, FailureKind, InputError, field_loc
from ediffi.pipeline import GenerationRequest
from engines import Engine, EngineConfig, TorchBackend
from tests.support.fault_injection import BROKEN_DEVICE_TEXT, CUDA_OOM_TEXT, OutOfMemoryAboveRows
from tests.engines.test_engine import PROMPTS, max_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TOLERANCE = 2  # 8-bit levels, as in test_engine


def run_all(engine: Engine, requests: list[GenerationRequest]):
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    return [h.result(0) for h in handles]


def test_out_of_memory_retries_the_batch_in_halves_and_fails_only_the_request_that_does_not_fit(tiny_model):
    requests = [GenerationRequest(PROMPTS[k % len(PROMPTS)], steps=2, seed=k) for k in range(3)]
    too_big = GenerationRequest(PROMPTS[0], steps=2, seed=9, n=3)  # 6 rows with guidance
    alone = [run_all(Engine(TorchBackend(tiny_model, max_batch=8), EngineConfig(max_rows_per_tick=None)), [r])[0]
             for r in requests]

    # Room for 4 rows: two requests (2 rows each with guidance) at a time, never the big one.
    backend = OutOfMemoryAboveRows(tiny_model, max_batch=16, fits_rows=4)
    engine = Engine(backend, EngineConfig(max_rows_per_tick=None))
    outcomes = run_all(engine, [*requests, too_big])

    assert [o.status for o in outcomes] == ["succeeded"] * 3 + ["failed"], [o.failure for o in outcomes]
    assert outcomes[3].failure == Failure.of(FailureKind.OUT_OF_MEMORY)
    assert "GiB" not in outcomes[3].error and CUDA_OOM_TEXT not in outcomes[3].error
    assert backend.out_of_memory_calls > 0 and max(backend.calls) > 4  # the faults did fire
    for batched, single in zip(outcomes[:3], alone):
        assert max_diff(batched.images, single.images) <= TOLERANCE


def test_every_engine_failure_is_structured_and_input_errors_name_their_field(tiny_model):
    engine = Engine(TorchBackend(tiny_model, max_batch=8), EngineConfig())
    for sampler in ("lms", "ddim"):  # unknown; known but for imported checkpoints only
        with pytest.raises(InputError) as error:
            engine.submit(GenerationRequest("a fox", sampler=sampler))
        assert error.value.field == "sampler"
    canceled = engine.submit(GenerationRequest("a fox", steps=50))
    canceled.cancel()
    engine.run_until_idle()
    assert canceled.result(0).failure == Failure.of(FailureKind.CANCELED)
    assert field_loc("paint_with_words.regions[0].phrase") == ["paint_with_words", "regions", 0, "phrase"]
    assert Failure.from_dict(Failure.invalid_input("n", "too many").to_dict()) == Failure.invalid_input("n", "too many")
    assert all(PUBLIC_MESSAGES[kind] for kind in FailureKind)


# ------------------------------------------------------------ real processes


@pytest.fixture
def cluster_factory(tiny_model_dir, tmp_path):
    from tests.support.process import Cluster

    clusters = []

    def make(**settings):
        cluster = Cluster(tiny_model_dir, tmp_path, settings=settings)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


def start_with_faulty_worker(cluster_factory, worker_class, **settings):
    """A cluster (Redis, API) whose only worker is ``worker_class`` (tests.support.process), both ready."""
    from tests.support.process import ApiProcess, wait_workers_ready

    cluster = cluster_factory(**settings)
    worker = worker_class(cluster.env, cluster.log_dir, "faulty-worker")
    cluster.workers.append(worker)
    cluster.api = ApiProcess(cluster.env, cluster.log_dir)
    wait_workers_ready([worker])
    cluster.api.wait_ready()
    cluster.http = httpx.Client(base_url=cluster.api.url, timeout=60.0)
    return cluster, worker


def test_a_worker_on_a_broken_device_stops_after_n_failures_and_exits_non_zero(cluster_factory):
    """Before: the worker kept claiming and failed every job in the queue with the raw CUDA text."""
    from tests.support.process import FaultyWorkerProcess

    limit = 3
    cluster, broken = start_with_faulty_worker(
        cluster_factory, FaultyWorkerProcess, max_consecutive_engine_failures=limit, worker_slots=1
    )
    job_ids = [cluster.submit({"prompt": "a red circle", "steps": 2, "seed": k}) for k in range(limit + 3)]

    deadline = time.monotonic() + 60
    while broken.alive and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not broken.alive, f"the broken worker is still claiming\n{cluster.logs()}"
    assert broken.process.returncode == 3, broken.log_tail()

    statuses = cluster.statuses(job_ids)
    failed = [j for j, s in statuses.items() if s == "failed"]
    assert len(failed) == limit, statuses
    assert all(s in ("failed", "queued") for s in statuses.values()), statuses
    for job_id in failed:
        record = cluster.job_hash(job_id)
        assert record["error_kind"] == "internal" and record["error"] == PUBLIC_MESSAGES[FailureKind.INTERNAL]
        view = cluster.http.get(f"/jobs/{job_id}").json()
        assert view["failure"] == {"kind": "internal", "message": PUBLIC_MESSAGES[FailureKind.INTERNAL], "field": None}
        events = cluster.http.get(f"/jobs/{job_id}/events").text
        assert '"kind":"internal"' in events and "illegal memory" not in events
        assert "illegal memory" not in str(record) + str(view)
    assert BROKEN_DEVICE_TEXT in broken.log_tail(100_000)  # operators still see the cause

    # The jobs it never ran go to a healthy worker; a sync failure answers with its kind.
    cluster.spawn_workers(1)
    final = cluster.wait_terminal(job_ids, timeout_s=120)
    assert sorted(final.values()).count("succeeded") == len(job_ids) - limit
    response = cluster.http.get(f"/jobs/{failed[0]}")
    assert response.status_code == 200 and response.json()["status"] == "failed"


def test_a_worker_whose_device_hangs_exits_and_another_worker_finishes_its_job(cluster_factory):
    """Before: a device call that never returned left the worker alive, heartbeating and renewing its
    claim, so its job was never reclaimed and the pod never restarted."""
    from tests.support.process import HungWorkerProcess

    cluster, hung = start_with_faulty_worker(
        cluster_factory, HungWorkerProcess, engine_stall_timeout_s=3, claim_timeout_s=3, worker_slots=1
    )
    job_id = cluster.submit({"prompt": "a red circle", "steps": 2, "seed": 1})

    deadline = time.monotonic() + 60
    while hung.alive and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not hung.alive, f"the worker on a hung device is still running\n{cluster.logs()}"
    assert hung.process.returncode == 3, hung.log_tail()
    assert "engine stalled" in hung.log_tail(100_000)

    cluster.spawn_workers(1)
    assert cluster.wait_terminal([job_id], timeout_s=120) == {job_id: "succeeded"}
