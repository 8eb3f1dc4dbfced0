"""Regression test of the shipped weights (models/default): it is the trained
shapes-world cascade and still draws what a simple prompt asks for at a
fixed seed. If the weights are retrained, re-check the expectation below."""

from pathlib import Path

import numpy as np
import pytest

from ediffi.model import load_model
from ediffi.pipeline import GenerationRequest, generate
from ediffi.world import analyse

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED)


def test_shipped_model_is_the_trained_expert_cascade(shipped):
    cfg = shipped.config
    assert cfg.name == "shapes-ediffi"
    assert [(s.name, s.image_size, len(s.experts)) for s in cfg.stages] == [("base", 32, 3), ("sr", 64, 2)]
    # Every phase of the expert tree trained (the record spans a run that was
    # continued from an earlier one's export, see README).
    steps: dict[str, int] = {}
    run = cfg.training
    while run is not None:
        for phase, record in run["phases"].items():
            steps[phase] = steps.get(phase, 0) + record["steps"]
        run = run.get("continued_from")
    tree = ["encoders", "base_root", "base_high", "base_lowmid", "base_mid", "base_low", "sr_root", "sr_high", "sr_low"]
    assert all(steps.get(phase, 0) > 0 for phase in tree), steps
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 40 * 2**20


def test_shipped_model_draws_a_red_circle_top_left(shipped):
    image = generate(shipped, GenerationRequest(prompt="a red circle in the top left", seed=1, steps=16))[0]
    analysis = analyse(np.asarray(image))
    found = [(o.color, o.shape, o.cell) for o in analysis.objects]
    assert ("red", "circle", 0) in found, found
    assert all(color == "red" for color, _, _ in found), found


def test_shipped_model_training_configs_resolve_to_what_each_run_recorded(shipped):
    """configs/ state each run's recipe as overrides of the one before it
    ("extends"); resolved, each must equal the config that run recorded."""
    import dataclasses
    import json

    from ediffi.train import load_train_config

    configs = SHIPPED.parents[1] / "configs"
    runs, run = [], shipped.config.training
    while run is not None:
        runs.append(run)
        run = run.get("continued_from")
    files = ["shapes-continue-cpu.json", "shapes-continue-gpu.json", "shapes-train-gpu.json"]
    assert len(runs) == len(files)
    for record, name in zip(runs, files):
        assert record["command"].endswith(f"configs/{name}"), record["command"]
        resolved = json.loads(json.dumps(dataclasses.asdict(load_train_config(configs / name))))
        assert resolved == record["train_config"], name
