"""Training and evaluation plumbing on tiny settings (the real run is the
shipped model; see README "The shipped model")."""

import json
import math

import numpy as np
import pytest
import torch

from ediffi.evaluate import color_map_for, frechet_distance, paint_scenes
from ediffi.train import TrainConfig, phases, run_training, sample_sigma, world_vocabulary
from ediffi.world import cell_mask, heldout_prompts, heldout_scenes, parse_caption


def test_sigma_sampling_stays_in_the_expert_interval():
    g = torch.Generator().manual_seed(0)
    for lo, hi in [(0.0, 0.4), (0.4, 2.5), (2.5, math.inf)]:
        s = sample_sigma(4000, lo, hi, g)
        assert s.min() >= lo * 0.999 and (s.max() < hi * 1.001)
    # The untruncated distribution has the EDM median exp(P_mean).
    s = sample_sigma(20000, 0.0, math.inf, g)
    assert s.log().median().item() == pytest.approx(-1.2, abs=0.05)
    # The shifted base-stage distribution (more layout-deciding high noise).
    s = sample_sigma(20000, 0.0, math.inf, g, p_mean=0.0, p_std=1.5)
    assert s.log().mean().item() == pytest.approx(0.0, abs=0.05)
    assert s.log().std().item() == pytest.approx(1.5, abs=0.05)
    assert (s > 2.5).float().mean().item() == pytest.approx(0.27, abs=0.02)


def test_expert_tree_children_start_from_parents_and_baseline_matches_updates():
    cfg = TrainConfig()
    tree = phases(cfg)
    base = {p.name: p for p in tree["base"]}
    assert base["base_high"].parent == base["base_lowmid"].parent == "base_root"
    assert base["base_mid"].parent == base["base_low"].parent == "base_lowmid"
    # Children tile their parent's interval.
    assert base["base_high"].sigma_lo == base["base_lowmid"].sigma_hi
    assert base["base_mid"].sigma_lo == base["base_low"].sigma_hi
    expert_updates = sum(p.steps for p in tree["base"])
    baseline = tree["baseline"][0]
    assert base["base_root"].steps + baseline.steps == expert_updates


def test_vocabulary_covers_heldout_prompts():
    vocab = set(world_vocabulary())
    for prompt, _ in heldout_prompts():
        for word in prompt.lower().replace(",", " , ").replace(";", " ; ").replace(":", " : ").split():
            assert word in vocab, word


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.05)


def test_paint_eval_cases_paint_one_cell_per_object_without_positions():
    for scene, cells in paint_scenes(heldout_scenes(20), seed=99):
        assert all(pos is None for _, _, pos in parse_caption(scene.caption))
        cmap = np.asarray(color_map_for(cells))
        assert (cmap[cell_mask(cells[0])] == [255, 0, 0]).all()


@pytest.mark.slow
def test_training_runs_resumes_and_exports(tmp_path):
    from ediffi.cli import main
    from ediffi.model import load_model

    overrides = dict(
        encoder_steps=2, encoder_batch=8, base_root_steps=2, base_split1_steps=1, base_split2_steps=1,
        sr_root_steps=1, sr_split_steps=1, batch=2, checkpoint_every=1, threads=1,
        encoder={"width": 16, "layers": 1, "heads": 2, "projection_dim": 16, "image_size": 16, "patch_size": 8},
        base_net=dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16],
                      num_heads=2, embedding_dim=32, groups=4),
        sr_net=dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                    num_heads=2, embedding_dim=32, groups=4, low_res_channels=3),
    )
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(overrides))
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--config", str(config), "--chains", "base", "sr"]) == 0
    log = [json.loads(line) for line in (run / "train.log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} >= {"encoders", "base_root", "base_high", "base_low", "sr_low"}
    # Finished phases are skipped on a rerun (resumable): nothing new is logged.
    assert main(["train", "--run-dir", str(run), "--config", str(config), "--chains", "base", "sr"]) == 0
    assert len((run / "train.log.jsonl").read_text().splitlines()) == len(log)
    out = tmp_path / "model"
    assert main(["train", "--run-dir", str(run), "--config", str(config), "--export", str(out)]) == 0
    model = load_model(out)
    assert [len(s.experts) for s in model.config.stages] == [3, 2]
    assert model.config.training["phases"]["base_root"]["steps"] == 2
