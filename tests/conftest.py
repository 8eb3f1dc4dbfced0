"""Shared fixtures: a tiny random model directory built once per session
from a config (as diffusers' tests build dummy components), and real Redis."""

from pathlib import Path

import pytest

pytest_plugins = ["tests.redis_server"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ediffi.model import build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from ediffi.model import load_model

    return load_model(tiny_model_dir)
