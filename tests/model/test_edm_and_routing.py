import math

import pytest
import torch
from pydantic import ValidationError

from ediffi.config import ExpertConfig, StageConfig, UNetConfig
from ediffi.edm import edm_loss_weight, edm_preconditioning
from ediffi.model import ExpertEnsemble


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 1.0, 7.3, 80.0])
def test_edm_coefficients_match_table_1(sigma):
    sd = 0.5
    pre = edm_preconditioning(torch.tensor([sigma]), sd)
    assert pre.c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-6)
    assert pre.c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert pre.c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert pre.c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-6)
    assert edm_loss_weight(torch.tensor(sigma), sd).item() == pytest.approx((sigma**2 + sd**2) / (sigma * sd) ** 2)


def test_preconditioning_is_per_row():
    pre = edm_preconditioning(torch.tensor([0.1, 10.0]), 0.5)
    assert pre.c_skip[0] > 0.9 and pre.c_skip[1] < 0.01


def _expert(name, lo, hi):
    return ExpertConfig(name=name, sigma_lo=lo, sigma_hi=hi, weights=f"{name}.safetensors", network=UNetConfig())


def _stage(experts):
    return StageConfig(name="base", image_size=16, experts=experts)


def test_routing_by_sigma_with_half_open_intervals():
    stage = _stage([_expert("low", 0.0, 0.5), _expert("mid", 0.5, 5.0), _expert("high", 5.0, None)])
    ensemble = ExpertEnsemble(stage, {})
    assert ensemble.route(0.0) == "low"
    assert ensemble.route(0.4999) == "low"
    # A boundary belongs to the higher-noise expert (its sigma_lo).
    assert ensemble.route(0.5) == "mid"
    assert ensemble.route(5.0) == "high"
    assert ensemble.route(1e9) == "high"
    with pytest.raises(ValueError):
        ensemble.route(float("nan"))


def test_single_expert_is_a_plain_model():
    ensemble = ExpertEnsemble(_stage([_expert("only", 0.0, None)]), {})
    assert {ensemble.route(s) for s in (0.0, 0.002, 1.0, 80.0)} == {"only"}


@pytest.mark.parametrize(
    "experts, message",
    [
        ([_expert("a", 0.0, 1.0), _expert("b", 2.0, None)], "gap"),
        ([_expert("a", 0.0, 2.0), _expert("b", 1.0, None)], "overlap"),
        ([_expert("a", 0.1, None)], "gap"),
        ([_expert("a", 0.0, 1.0)], "gap"),
        ([], "at least one expert"),
    ],
)
def test_coverage_validation_rejects_gaps_and_overlaps(experts, message):
    with pytest.raises(ValidationError, match=message):
        _stage(experts)
