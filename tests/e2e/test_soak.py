"""The soak test, short enough for CI (issue 19): 3 workers, jobs mixed with cancels, a worker
killed with SIGKILL every 50 jobs; every job ends exactly once. The full run (1000 jobs, a kill
every 100, Redis memory and the API's RSS sampled) is ``python bench/soak.py --jobs 1000``."""

from __future__ import annotations

import pytest

from bench.soak import run_soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_every_job_ends_exactly_once_through_cancels_and_worker_kills(tiny_model_dir, tmp_path):
    report = run_soak(tiny_model_dir, tmp_path, jobs=150, workers=3, kill_every=50, sample_every=50)
    assert report.kills == 2 and report.cancels_sent > 0
    assert report.exactly_once, report.problems
    assert sum(report.outcomes.values()) == 150
    assert set(report.outcomes) <= {"succeeded", "canceled"}, report.outcomes  # nothing failed
    assert report.outcomes.get("canceled", 0) <= report.cancels_sent
