"""Shared fixtures: a tiny random model directory built once per session
from a config (as diffusers' tests build dummy components), and real Redis."""

from pathlib import Path

import pytest

pytest_plugins = ["tests.support.redis_server", "tests.support.diffusers"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ediffi.model import build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from ediffi.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def shipped_shape_model_dir(tmp_path_factory) -> Path:
    """A tiny random model with the shipped model's shape of options
    (ediffi.model.SHIPPED_SHAPE_SPEC): 3 base and 2 SR experts, 3 levels,
    attention at two resolutions, 4 heads, 24 tokens."""
    from ediffi.model import SHIPPED_SHAPE_SPEC, build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("shipped-shape-model"), SHIPPED_SHAPE_SPEC, seed=0)


@pytest.fixture(scope="session")
def shipped_shape_model(shipped_shape_model_dir):
    from ediffi.model import load_model

    return load_model(shipped_shape_model_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (with `pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): the machine's cores are shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory):
    """Tiny random DeepFloyd IF stage I and stage II diffusers folders."""
    from tests.support.deepfloyd_if import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("tiny-if"))
