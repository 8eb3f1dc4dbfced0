"""The seed rule in one place (ediffi.spec.check_seed): image k uses seed + k,
so every image's seed must be in [0, MAX_SEED]. The pipeline applies it to
every request (the worker's and the CLI's), naming the field `seed`."""

from __future__ import annotations

import pytest

from ediffi.failure import InputError
from ediffi.pipeline import GenerationRequest, encode_request
from ediffi.spec import MAX_SEED, check_seed


@pytest.mark.parametrize(("seed", "n"), [(0, 1), (MAX_SEED, 1), (MAX_SEED - 1, 2), (MAX_SEED - 7, 8)])
def test_seeds_within_range_pass(seed, n):
    check_seed(seed, n)


@pytest.mark.parametrize(("seed", "n"), [(MAX_SEED, 2), (MAX_SEED - 6, 8), (MAX_SEED + 1, 1), (-1, 1)])
def test_seeds_beyond_range_name_the_seed(seed, n):
    with pytest.raises(InputError) as caught:
        check_seed(seed, n)
    assert caught.value.field == "seed"


def test_the_pipeline_refuses_a_request_whose_last_seed_overflows(tiny_model):
    with pytest.raises(InputError, match=r"^seed: .*n=2") as caught:
        encode_request(tiny_model, GenerationRequest("a red circle", seed=MAX_SEED, n=2, steps=1))
    assert caught.value.field == "seed"
    assert GenerationRequest("a red circle", seed=MAX_SEED - 1, n=2).image_seeds[-1] == MAX_SEED
