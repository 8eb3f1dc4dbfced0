"""bench/fairness.py through the real stack (Redis, ``ediffi api``, one worker): another caller's
job, queued behind one caller's backlog, is not served last (with claims in stream order it was:
rank 17 of 17 here; the committed figures are in bench/README.md)."""

from __future__ import annotations

import pytest

from bench.fairness import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_job_behind_another_callers_backlog_is_claimed_at_the_next_free_slot(tiny_model_dir, tmp_path):
    report = run(tiny_model_dir, tmp_path, backlog=16, steps=4, worker_slots=2)
    assert report.statuses == {"succeeded": 17}
    # Two of A's jobs may be out before B submits, and B's claim comes at the first free slot:
    # it finishes among the first few, far from last, and most of A's backlog after it.
    assert report.b_finish_rank <= 6, report
    assert report.a_last_finished_after_b >= 11, report
