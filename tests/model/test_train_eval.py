"""Training and evaluation plumbing on tiny settings (the real run is the
shipped model; see README "The shipped model")."""

import json
import math

import numpy as np
import pytest
import torch

from ediffi.evaluate import color_map_for, frechet_distance, paint_scenes
from ediffi.train import TrainConfig, phases, sample_sigma, world_vocabulary
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
    from cli.main import main
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


def test_painted_training_region_holds_its_object_and_no_other():
    from ediffi.train import painted_region

    rng = np.random.default_rng(0)
    shapes_seen = set()
    for _ in range(500):
        cell = int(rng.integers(9))
        other = {int(rng.integers(9))} - {cell}
        r0, r1, c0, c1 = painted_region(rng, cell, other)
        assert r0 <= cell // 3 <= r1 and c0 <= cell % 3 <= c1
        assert not any(r0 <= a // 3 <= r1 and c0 <= a % 3 <= c1 for a in other)
        shapes_seen.add((r1 - r0, c1 - c0))
    assert (0, 0) in shapes_seen and len(shapes_seen) > 3  # single cells and larger blocks


@pytest.fixture(scope="module")
def shipped_encoders():
    from pathlib import Path

    from ediffi.config import DEFAULT_MODEL_DIR
    from ediffi.encoders import Encoders
    from ediffi.train import encoders_config

    return Encoders(Path(DEFAULT_MODEL_DIR), encoders_config(TrainConfig()))


def test_painted_training_batch_paints_each_phrase_in_its_own_columns(shipped_encoders):
    from ediffi.train import DenoiserBatches, painted_masks
    from ediffi.world.shapes import cell_bounds

    enc = shipped_encoders
    cfg = TrainConfig(batch=12, pww_train_prob=1.0)
    batch = DenoiserBatches(cfg, "base_root", 5, enc, 32)[3]
    rows = batch["paint_rows"]
    assert (batch["paint_strength"] > 0).all() and (batch["paint_strength"] <= cfg.pww_train_max_strength).all()
    t5 = enc.t5_tokenizer(batch["captions"], padding="max_length", max_length=enc.t5_length, truncation=True)["input_ids"]
    clip = enc.clip_tokenizer(batch["captions"], padding="max_length", max_length=enc.clip_length, truncation=True)["input_ids"]
    from ediffi.world import parse_caption

    for i, caption in enumerate(batch["captions"]):
        mine = rows[rows[:, 0] == i]
        words = [
            enc.t5_tokenizer.convert_ids_to_tokens(t5[i][c]) if c < enc.t5_length
            else enc.clip_tokenizer.convert_ids_to_tokens(clip[i][c - enc.t5_length])
            for c in mine[:, 1].tolist()
        ]
        objects = parse_caption(caption)
        # Each object's colour and shape words, once per tokenizer.
        assert sorted(words) == sorted([w for color, shape, _ in objects for w in (color, shape)] * 2), caption
        assert len(set(mine[:, 2].tolist())) == len(objects)  # one region per object
    pww = painted_masks(batch, len(batch["captions"]), enc.context_length, 32, torch.device("cpu"))
    assert pww.shape == (12, enc.context_length, 32, 32)
    assert pww.sum() == sum(batch["paint_regions"][r].sum() for r in rows[:, 2].tolist())
    # Regions are blocks of whole cells.
    x0, y0, x1, y1 = cell_bounds(4, 32)
    for region in batch["paint_regions"]:
        assert set(region.unique().tolist()) <= {0.0, 1.0} and region.sum() >= (x1 - x0) * (y1 - y0)
    unpainted = DenoiserBatches(TrainConfig(batch=12), "base_root", 5, enc, 32)[3]
    assert len(unpainted["paint_rows"]) == 0 and (unpainted["paint_strength"] == 0).all()
    assert unpainted["captions"] == batch["captions"]  # painting draws after the scenes: same data otherwise


def test_data_workers_give_the_same_batches_as_one_process(shipped_encoders):
    from ediffi.train import DenoiserBatches, step_loader

    data = DenoiserBatches(TrainConfig(batch=4, pww_train_prob=0.5), "sr_root", 6, shipped_encoders, 64)
    in_process = list(step_loader(data, 2, workers=0))
    parallel = list(step_loader(data, 2, workers=2))
    assert len(in_process) == len(parallel) == 4
    for a, b in zip(in_process, parallel):
        assert a["seed"] == b["seed"] and a["captions"] == b["captions"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["reference_pixels"], b["reference_pixels"])
        assert torch.equal(a["paint_rows"], b["paint_rows"]) and torch.equal(a["paint_regions"], b["paint_regions"])
    assert in_process[0]["seed"] == data[2]["seed"]


def test_phase_deadlines_share_the_time_by_steps():
    from ediffi.train import phase_deadlines

    chain = phases(TrainConfig(base_root_steps=600, base_split1_steps=100, base_split2_steps=100))["base"]
    assert phase_deadlines(chain, 1000.0, None) == [None] * 5
    assert phase_deadlines(chain, 1000.0, 2000.0) == pytest.approx([1600.0, 1700.0, 1800.0, 1900.0, 2000.0])


@pytest.mark.slow
def test_time_budget_ends_every_phase_early_and_the_run_still_exports(tmp_path):
    from cli.main import main
    from ediffi.model import load_model

    overrides = dict(
        encoder_steps=1000, encoder_batch=4, base_root_steps=1000, base_split1_steps=1000, base_split2_steps=1000,
        sr_root_steps=1000, sr_split_steps=1000, batch=2, checkpoint_every=1000, threads=1, pww_train_prob=0.5,
        encoder={"width": 16, "layers": 1, "heads": 2, "projection_dim": 16, "image_size": 16, "patch_size": 8},
        base_net=dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16],
                      num_heads=2, embedding_dim=32, groups=4, coord_channels=True),
        sr_net=dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[32],
                    num_heads=2, embedding_dim=32, groups=4, low_res_channels=3),
    )
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(overrides))
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--config", str(config)]
    assert main([*args, "--chains", "base", "sr", "baseline", "--time-budget-s", "0"]) == 0
    log = [json.loads(line) for line in (run / "train.log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"encoders", "base_root", "base_high", "base_lowmid", "base_mid", "base_low",
                                         "sr_root", "sr_high", "sr_low", "baseline"}
    # Past the deadline every phase takes one step, says so, and counts as finished.
    assert all(r["step"] == 1 and r["stopped_at_deadline"] for r in log)
    assert all(r["finished"] for r in log)  # scripts wait on this record (written after the checkpoint)
    out = tmp_path / "model"
    assert main([*args, "--export", str(out)]) == 0
    assert load_model(out).config.training["phases"]["base_root"]["steps"] == 1
    # An exported model can be trained further (as a lent GPU's run was):
    # its phases are seeded from the weights, only the named ones train.
    baseline = tmp_path / "baseline"
    assert main([*args, "--export", str(baseline), "--baseline"]) == 0
    more = tmp_path / "more"
    cont = ["train", "--run-dir", str(more), "--config", str(config)]
    assert main([*cont, "--continue-from", str(out), "--continue-baseline", str(baseline),
                 "--phases", "base_high", "baseline"]) == 0
    assert main([*cont, "--chains", "base", "baseline", "--phases", "base_high", "baseline",
                 "--time-budget-s", "0"]) == 0
    trained = [json.loads(line)["phase"] for line in (more / "train.log.jsonl").read_text().splitlines()]
    assert sorted(trained) == ["base_high", "baseline"]
    again, again_baseline = tmp_path / "again", tmp_path / "again_baseline"
    assert main([*cont, "--export", str(again)]) == 0
    assert main([*cont, "--export", str(again_baseline), "--baseline"]) == 0
    from safetensors.torch import load_file

    def weights(model_dir, name):
        return load_file(str(model_dir / "stages" / name))

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(weights(out, "base/base0.safetensors"), weights(again, "base/base0.safetensors"))  # trained
    assert same(weights(out, "base/base1.safetensors"), weights(again, "base/base1.safetensors"))  # kept
    assert same(weights(out, "sr/sr0.safetensors"), weights(again, "sr/sr0.safetensors"))
    assert not same(weights(baseline, "base/base0.safetensors"), weights(again_baseline, "base/base0.safetensors"))
    # Each export records the run it continued, so the history is complete.
    for earlier, continued in ((out, again), (baseline, again_baseline)):
        record = load_model(continued).config.training
        assert record["phases"].keys() == {"base_high", "baseline"}
        assert record["continued_from"] == load_model(earlier).config.training
    with pytest.raises(RuntimeError, match="already holds checkpoints"):
        main([*cont, "--continue-from", str(out)])
