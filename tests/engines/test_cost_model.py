"""The forward-cost model (engines/cost_model.py): medians, a monotone
curve, the fitted fixed + per-row line, the cheapest batch and the compute
limit. Plain numbers, no model."""

from __future__ import annotations

import pytest

from engines.cost_model import CostModel, ExpertCost


def test_median_of_timings_resists_a_shared_machines_outliers():
    cost = ExpertCost.from_timings({1: [0.010, 0.011, 0.5], 2: [0.015, 0.9, 0.016], 4: [0.026, 0.025, 0.024]})
    assert cost.seconds == pytest.approx((0.011, 0.016, 0.025))
    assert cost.samples == 3


def test_curve_is_non_decreasing_and_interpolates_between_buckets():
    # Noise made 4 rows look cheaper than 2: the violators are pooled.
    cost = ExpertCost.from_timings({1: [1.0], 2: [3.0], 4: [2.0], 8: [8.0]})
    assert cost.seconds == pytest.approx((1.0, 2.5, 2.5, 8.0))
    assert cost(6) == pytest.approx(2.5 + (8.0 - 2.5) / 2)
    assert cost(16) > cost(8)  # beyond the last bucket: the fitted slope


def test_fitted_line_recovers_fixed_and_per_row_cost():
    exact = {r: [0.2 + 0.05 * r] for r in (1, 2, 4, 8, 16)}
    cost = ExpertCost.from_timings(exact)
    assert cost.fixed_s == pytest.approx(0.2)
    assert cost.per_row_s == pytest.approx(0.05)


def test_cheapest_batch_comes_from_the_points_not_the_line():
    # Per row: 10, 7.5, 6, 5.5, 7 -> cheapest at 8 (a CPU whose cache runs out at 16).
    cost = ExpertCost.from_timings({1: [10.0], 2: [15.0], 4: [24.0], 8: [44.0], 16: [112.0]})
    assert cost.best_rows(16) == 8
    assert cost.best_rows(4) == 4
    # Only measured sizes (and the cap) are candidates.
    assert cost.best_rows(6) == 6 and cost.best_rows(3) == 3
    # With a tolerance, the largest size within it of the cheapest.
    assert cost.best_rows(16, tolerance=0.3) == 16 and cost.best_rows(16, tolerance=0.2) == 8


def test_compute_limit_and_unknown_experts():
    model = CostModel({
        ("base", "a"): ExpertCost.affine(0.0, 0.01),
        ("sr", "b"): ExpertCost.affine(0.16, 0.0),  # 0.01 s per row at 16 rows
    })
    # 10 rows on a at 0.01 s + 10 rows on b at 0.01 s (16-row calls) = 0.2 s per image.
    assert model.compute_limit({("base", "a"): 10, ("sr", "b"): 10}, 16) == pytest.approx(5.0)
    # Capped at 8 rows, b costs 0.02 s per row.
    assert model.compute_limit({("base", "a"): 10, ("sr", "b"): 10}, 8) == pytest.approx(1 / 0.3)
    # An expert that was not measured costs like the mean measured one.
    unknown = model.expert("sr", "c")
    assert unknown.fixed_s == pytest.approx(0.08) and unknown.per_row_s == pytest.approx(0.005)
    # Nothing measured: a call costs the same at any batch (batch all you can).
    assert CostModel().best_rows("base", "x", 16) == 16


def test_table_and_json_name_every_expert():
    model = CostModel.from_timings({("base", "base0"): {1: [0.01], 2: [0.015]}, ("sr", "sr0"): {1: [0.02], 2: [0.03]}})
    table = model.table()
    assert "base/base0" in table and "sr/sr0" in table and "ms/row" in table
    data = model.to_json()
    assert set(data) == {"base/base0", "sr/sr0"}
    assert data["base/base0"]["best_rows"] == 2
