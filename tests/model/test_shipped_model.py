"""Regression test of the shipped weights (models/default): it is the trained
shapes-world cascade and still draws what a simple prompt asks for at a
fixed seed, puts painted objects in their painted cells (with a style image
too), and `ediffi eval` on a handful of held-out prompts agrees with the
README's quality table. If the weights are retrained, re-check the
expectations below (and the README table)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ediffi.evaluate import COLUMNS, color_map_for
from ediffi.model import load_model
from ediffi.paint import Region
from ediffi.pipeline import GenerationRequest, generate, generate_batch
from ediffi.world import Scene, ShapeObject, analyse, render

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "default"


@pytest.fixture(scope="module")
def shipped():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two on shared cores, as in the other model tests
    yield load_model(SHIPPED)
    torch.set_num_threads(previous)


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


def test_painted_object_without_a_named_position_lands_in_its_painted_cell(shipped):
    """Paint-with-words alone places the object: the prompt names no position;
    unpainted, the model draws it elsewhere (the centre); painted over the
    bottom-right cell at the API's default strength, the analyser finds it there."""
    cell = 8
    unpainted, painted = (
        images[0]
        for images in generate_batch(shipped, [
            GenerationRequest(prompt="a red circle", seed=1, steps=16),
            GenerationRequest(prompt="a red circle", seed=1, steps=16, color_map=color_map_for([cell]),
                              regions=[Region("#ff0000", "red circle")]),
        ])
    )
    before = [(o.color, o.shape, o.cell) for o in analyse(np.asarray(unpainted)).objects]
    after = [(o.color, o.shape, o.cell) for o in analyse(np.asarray(painted)).objects]
    assert ("red", "circle", cell) not in before, before
    assert after == [("red", "circle", cell)], after


def test_style_image_and_paint_with_words_together(shipped):
    """A style reference (a render of another scene, in the night style) and two
    painted phrases in one request: the output has the reference's background
    and each object in its painted cell."""
    reference = render(Scene((ShapeObject("green", "triangle", 4, True),), "night", "a green triangle in the center"))
    request = GenerationRequest(
        prompt="a red circle and a blue square", seed=2, steps=16, style_image=Image.fromarray(reference),
        color_map=color_map_for([0, 8]),  # red over the top-left cell, blue over the bottom-right
        regions=[Region("#ff0000", "red circle"), Region("#0000ff", "blue square")],
    )
    analysis = analyse(np.asarray(generate(shipped, request)[0]))
    assert analysis.style == "night"
    assert sorted((o.color, o.shape, o.cell) for o in analysis.objects) == [("blue", "square", 8), ("red", "circle", 0)]


def readme_eval_row(model: str = "**shipped**") -> dict[str, float]:
    """A row of the README's `ediffi eval` table, by `ediffi.evaluate.COLUMNS` key."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | experts (base/sr) |"))
    titles = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    row = next(line for line in lines[start:] if line.startswith(f"| {model}"))
    cells = dict(zip(titles, (cell.strip().strip("*") for cell in row.strip().strip("|").split("|")), strict=True))
    return {key: float(cells[title].rstrip("%")) / (100 if cells[title].endswith("%") else 1)
            for key, title, _ in COLUMNS}


#: `ediffi eval` sample in the suite: the first 8 held-out prompts (13 objects, 11
#: named positions), 4 painted cases (6 painted objects).
EVAL_PROMPTS, EVAL_PAINTED = 8, 4


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about a minute alone; far longer on a loaded machine
def test_ediffi_eval_on_a_handful_of_prompts_agrees_with_the_readme_table(tmp_path):
    """`ediffi eval` as the README runs it (32 Heun steps, guidance 3, the API's
    default paint strength) on a handful of held-out prompts: every accuracy
    lies within 2 binomial standard deviations, at this sample size, of the
    README table's shipped row (plus one trial's worth), so neither the model,
    the pipeline nor the table can drift far without this failing. (The
    sample is fixed, prompts and seeds, so this is not a fresh draw per run.)"""
    out = tmp_path / "eval.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one torch thread: far faster on shared cores
    command = [sys.executable, "-m", "ediffi", "eval", "--model-dir", str(SHIPPED), "--prompts", str(EVAL_PROMPTS),
               "--paint", str(EVAL_PAINTED), "--speed-requests", "0", "--json-out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    row = report["rows"]["experts"]
    assert row["experts"] == {"base": 3, "sr": 2} and row["n_prompts"] == EVAL_PROMPTS
    readme = readme_eval_row()
    trials = {"object_acc": "n_objects", "position_acc": "n_named_positions", "count_acc": "n_prompts",
              "paint_centroid_hit": "n_paint_objects", "style_match": "n_prompts"}
    for key, count in trials.items():
        p, n = readme[key], row[count]
        slack = 2 * math.sqrt(p * (1 - p) / n) + 1 / n
        assert abs(row[key] - p) <= slack, f"{key}: {row[key]:.3f} over {n}, README {p:.3f} (+-{slack:.3f})"
    # A mean of per-object IoUs in [0, 1] (README 0.395): painted objects fill part of their cell.
    assert abs(row["paint_mean_iou"] - readme["paint_mean_iou"]) <= 0.1, row["paint_mean_iou"]
    assert math.isfinite(row["clip_fd"])  # not comparable to the README's at this sample size
    # The analyser the figures rest on reads real renders perfectly (README: 100%).
    assert report["analyser"] == {"analyser_scene_acc": 1.0, "analyser_style_acc": 1.0}
    assert "| experts | 3/2 |" in result.stdout


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
