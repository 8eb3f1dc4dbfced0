"""`ediffi bench engine`: the synthetic load is reproducible and valid, and
the bench runs every policy and prints the documented JSON (timings are
not asserted)."""

from __future__ import annotations

import json

import pytest

from ediffi.model import build_random_model_dir
from engines import TorchBackend
from bench.engine_bench import LoadConfig, compute_limit, format_table, parse_samplers, run_bench, synthetic_requests

JSON_KEYS = {
    "policy", "backend", "throughput_images_per_s", "latency_p50_s", "latency_p95_s", "latency_p99_s",
    "mean_batch_size", "efficiency",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    return build_random_model_dir(tmp_path_factory.mktemp("bench-model"), seed=1)


def test_synthetic_load_is_reproducible_and_mixed():
    load = LoadConfig(requests=40, min_steps=8, max_steps=32, p_paint=0.5, p_style=0.5, seed=3)
    first, second = synthetic_requests(load, 32), synthetic_requests(load, 32)
    key = lambda r: (r.prompt, r.steps, r.sampler, r.seed, r.guidance_scale, [x.phrase for x in r.regions])  # noqa: E731
    assert [key(r) for r in first] == [key(r) for r in second]
    assert len({r.prompt for r in first}) > 20
    assert {r.sampler for r in first} == {"heun", "euler", "dpmpp_2m"}
    assert all(8 <= r.steps <= 32 for r in first)
    assert any(r.regions for r in first) and any(r.style_image is not None for r in first)
    for r in first:
        r.validate()
        for region in r.regions:
            assert region.phrase.lower() in r.prompt.lower()
    assert [key(r) for r in synthetic_requests(LoadConfig(requests=40, seed=4), 32)] != [key(r) for r in first]


def test_sampler_mix_option():
    load = LoadConfig(requests=12, samplers=parse_samplers("euler, heun"), seed=2)
    assert {r.sampler for r in synthetic_requests(load, 32)} == {"euler", "heun"}
    assert parse_samplers(None) == ("heun", "euler", "dpmpp_2m")  # the default mix
    assert parse_samplers("euler_a") == ("euler_a",)
    with pytest.raises(ValueError, match="ddim"):  # imported checkpoints only; the bench runs the shipped family
        parse_samplers("euler,ddim")


def test_compute_limit_arithmetic():
    # 10 rows on an expert at 0.01 s/row + 5 rows at 0.02 s/row = 0.2 s per image.
    assert compute_limit({"a": 0.01, "b": 0.02}, {"a": 10, "b": 5}) == pytest.approx(5.0)


def test_run_bench_every_policy(bench_model_dir):
    backend = TorchBackend(bench_model_dir, max_batch=8)
    load = LoadConfig(clients=4, requests=6, min_steps=2, max_steps=3, p_paint=0.5, p_style=0.5)
    results = run_bench(backend, ["step", "request", "none"], load, max_active_requests=8)
    assert [r.policy for r in results] == ["step", "request", "none"]
    for r in results:
        assert r.failed == 0 and r.images == 6
        assert r.throughput_images_per_s > 0 and 0 < r.efficiency
        # The bound is stated: efficiency divides by the cost model's limit,
        # which no policy's one-request calls (the pair limit) can exceed.
        assert r.efficiency == pytest.approx(r.throughput_images_per_s / r.compute_limit_images_per_s, rel=0.01)
        assert 0 < r.pair_limit_images_per_s <= r.compute_limit_images_per_s
        assert r.run_compute_limit_images_per_s > 0  # the run's own calibration, kept beside the pooled bound
        assert set(r.cost_model) == {f"{stage}/{expert}" for stage, expert in backend.experts()}
        assert r.latency_p50_s <= r.latency_p95_s <= r.latency_p99_s
        assert JSON_KEYS <= set(r.to_json())
    assert results[2].mean_batch_size <= 2.0  # one request (2 CFG rows) at a time
    assert results[0].mean_batch_size > results[2].mean_batch_size
    table = format_table(results)
    assert "step/none throughput" in table and "efficiency" in table
    assert "step/request throughput" in table and "bound (cost model)" in table


def test_run_bench_poisson(bench_model_dir):
    backend = TorchBackend(bench_model_dir, max_batch=8)
    (result,) = run_bench(backend, ["step"], LoadConfig(requests=4, rate=50.0, min_steps=2, max_steps=2))
    assert result.images == 4 and result.load == "poisson 50/s"


def test_cli_bench_engine_json(bench_model_dir, capsys):
    from cli.main import main

    code = main([
        "bench", "engine", "--model-dir", str(bench_model_dir), "--clients", "2", "--requests", "3",
        "--min-steps", "2", "--max-steps", "2", "--policies", "step,none", "--max-batch", "4",
        "--threads", "1", "--json",
    ])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["policy"] for d in data] == ["step", "none"]
    for d in data:
        assert JSON_KEYS <= set(d)
        assert d["backend"] == "torch:cpu:float32"


def test_cli_bench_engine_profile_prints_the_cost_model(bench_model_dir, capsys):
    from cli.main import main

    code = main(["bench", "engine", "--model-dir", str(bench_model_dir), "--max-batch", "4", "--threads", "1", "--profile"])
    assert code == 0
    out = capsys.readouterr().out
    backend = TorchBackend(bench_model_dir, max_batch=4)
    for stage, expert in backend.experts():
        assert f"{stage}/{expert}: " in out
    assert "ms + " in out and "ms/row" in out and "cheapest per row at" in out and "auto row budget" in out
